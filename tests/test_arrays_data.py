"""Tests of the 'arrays' builder: the user's own modalities and labels from one .npz per split."""
import io
import math

import numpy as np
import pytest

from configs import default
from mmkd_jax import data, train
from mmkd_jax.data import arrays
from mmkd_jax.errors import ConfigError
from tests.conftest import shrink

COUNTS = {'train': 48, 'validation': 16, 'test': 16}
# (L, F) per modality: unequal lengths and widths.
SHAPES = {'text': (5, 12), 'audio': (9, 4), 'video': (7, 6)}


def _labels(rng, task, n):
  if task == 'classification':
    return rng.integers(0, 3, n)
  if task == 'regression':
    return rng.uniform(-3, 3, (n, 1))
  return rng.integers(0, 2, (n, 3))


def _dataset(task='classification', seed=0):
  """split -> arrays of 3 modalities; 'audio' has a mask with a random number of real positions."""
  rng = np.random.default_rng(seed)
  result = {}
  for split, n in COUNTS.items():
    split_arrays = {m: rng.normal(size=(n,) + shape) for m, shape in SHAPES.items()}
    split_arrays['audio_mask'] = np.arange(SHAPES['audio'][0]) < rng.integers(1, 10, n)[:, None]
    split_arrays['label'] = _labels(rng, task, n)
    result[split] = split_arrays
  return result


def _write(directory, dataset):
  directory.mkdir(exist_ok=True)
  for split, split_arrays in dataset.items():
    np.savez(directory / f'{split}.npz', **split_arrays)


def _config(tmp_path, **options):
  config = data.default_data_config('arrays')
  config.data_dir = str(tmp_path / 'data')
  config.arrays.path = str(tmp_path / 'own')
  config.arrays.update(options)
  return config


def _read(builder, split):
  source = builder.as_data_source(split=split)
  return {key: np.stack([np.asarray(source[i][key]) for i in range(len(source))])
          for key in builder.info.features}


def _assert_nothing_prepared(tmp_path):
  data_dir = tmp_path / 'data'
  assert not data_dir.exists() or not [p for p in data_dir.rglob('*') if p.is_file()]


@pytest.mark.parametrize('task, labels_of, num_outputs', [
    ('classification', lambda y: y, 3),
    ('regression', lambda y: y.reshape(-1).astype(np.float32), 1),
    ('multilabel', lambda y: y.astype(np.int32), 3),
])
def test_each_label_kind_loads_with_its_task(tmp_path, task, labels_of, num_outputs):
  dataset = _dataset(task)
  _write(tmp_path / 'own', dataset)
  builder = data.load_builder(_config(tmp_path))  # task 'auto': read off the labels
  info = data.task_info(builder)
  assert info.modalities == SHAPES
  assert (info.task, info.num_outputs) == (task, num_outputs)
  for split, expected in dataset.items():
    got = _read(builder, split)
    np.testing.assert_array_equal(got['label'], labels_of(expected['label']))
    for m in SHAPES:
      np.testing.assert_array_equal(got[m], expected[m].astype(np.float32))
    np.testing.assert_array_equal(got['audio_mask'], expected['audio_mask'])
    assert got['text_mask'].all() and got['video_mask'].all()  # No mask in the file: all real.
    np.testing.assert_array_equal(got['index'], np.arange(COUNTS[split]))


def test_class_count_and_names_from_the_config(tmp_path):
  _write(tmp_path / 'own', _dataset())
  builder = data.load_builder(_config(tmp_path, num_classes=5))
  assert data.task_info(builder).num_outputs == 5
  builder = data.load_builder(_config(tmp_path, label_names='neg,neu,pos'))
  assert data.task_info(builder).label_names == ('neg', 'neu', 'pos')


def test_integer_labels_as_regression_when_asked(tmp_path):
  dataset = _dataset()
  _write(tmp_path / 'own', dataset)
  builder = data.load_builder(_config(tmp_path, task='regression'))
  assert data.task_info(builder).task == 'regression'
  np.testing.assert_array_equal(_read(builder, 'test')['label'], dataset['test']['label'])


def test_changed_files_are_prepared_again_and_unchanged_reused(tmp_path):
  _write(tmp_path / 'own', _dataset(seed=0))
  first = data.load_builder(_config(tmp_path))
  assert data.load_builder(_config(tmp_path)).data_path == first.data_path
  changed = _dataset(seed=1)
  _write(tmp_path / 'own', changed)
  second = data.load_builder(_config(tmp_path))
  assert second.data_path != first.data_path
  np.testing.assert_array_equal(_read(second, 'train')['text'], changed['train']['text'].astype(np.float32))


def _set(split, key, value_fn):
  def mutate(dataset):
    dataset[split][key] = value_fn(dataset[split][key])
  return mutate


def _poke(split, key, index, value):
  def mutate(dataset):
    dataset[split][key] = dataset[split][key].astype(np.result_type(dataset[split][key], value))
    dataset[split][key][index] = value
  return mutate


BAD_FILES = {
    'missing split file': (lambda d: d.pop('validation'), {},
                           'validation.npz: not found in .*; expected train.npz, validation.npz, test.npz there'),
    'missing modality': (lambda d: d['validation'].pop('video'), {},
                         "validation.npz: key 'video' is missing, expected it as in train.npz"),
    'extra modality': (lambda d: d['test'].update(extra=d['test']['text']), {},
                       "test.npz: key 'extra' is not in train.npz"),
    'missing label': (lambda d: d['train'].pop('label'), {}, "train.npz: key 'label' is missing"),
    'unequal N': (_set('test', 'video', lambda x: x[:-1]), {},
                  "test.npz: key 'video' has 15 examples but key 'text' has 16"),
    'fewer labels': (_set('validation', 'label', lambda x: x[:-1]), {},
                     "validation.npz: key 'label' has 15 examples, expected 16"),
    'NaN': (_poke('validation', 'audio', (0, 3, 1), math.nan), {},
            r"validation.npz: key 'audio' has 1 non-finite values as float32 \(NaN: 1, inf: 0\)"),
    'inf': (_poke('train', 'text', (2, 1, 0), -math.inf), {}, r"train.npz: key 'text' .*inf: 1\)"),
    'overflows float32': (_poke('train', 'video', (1, 0, 0), 1e39), {}, r"train.npz: key 'video' .*inf: 1\)"),
    'wrong rank': (_set('test', 'audio', lambda x: x[:, 0]), {},
                   r"test.npz: key 'audio' has rank 2 \(shape \(16, 4\)\), expected 3 \(N, L, F\)"),
    'length differs': (_set('test', 'text', lambda x: x[:, :4]), {},
                       r"test.npz: key 'text' has \(L, F\) = \(4, 12\), expected \(5, 12\) as in train.npz"),
    'label out of range': (_poke('validation', 'label', 2, 3), {'num_classes': 3},
                           r"validation.npz: key 'label' has class ids in \[0, 3\], expected \[0, 2\]"),
    'negative class id': (_set('test', 'label', lambda y: y - 1), {},
                          r"test.npz: key 'label' has class ids in \[-1, 1\], expected \[0, 2\]"),
    'float classes': (_set('train', 'label', lambda y: y.astype(np.float32)), {'task': 'classification'},
                      "train.npz: key 'label' has dtype float32, expected integer class ids"),
    'label NaN': (_poke('train', 'label', 0, math.nan), {},
                  "train.npz: key 'label' has non-finite values"),
    'mask shape': (_set('train', 'audio_mask', lambda x: x[:, :5]), {},
                   r"train.npz: key 'audio_mask' has shape \(48, 5\), expected \(48, 9\)"),
    'mask values': (_set('test', 'audio_mask', lambda x: x * 2), {},
                    "test.npz: key 'audio_mask' has values other than True/False"),
    'orphan mask': (lambda d: d['train'].update(speech_mask=np.ones((48, 3), bool)), {},
                    "train.npz: key 'speech_mask' has no modality 'speech' to mask"),
    'reserved name': (lambda d: d['train'].update(weight=np.ones((48, 2, 2))), {},
                      "train.npz: key 'weight' is not a usable modality name"),
    'object array': (_set('train', 'video', lambda x: x.astype(object)), {},
                     "train.npz: key 'video' cannot be read without pickle"),
    'regression shape': (_set('train', 'label', lambda y: np.zeros((48, 2))), {'task': 'regression'},
                         r"train.npz: key 'label' has shape \(48, 2\), expected \(48,\) or \(48, 1\)"),
    'multilabel values': (lambda d: [a.update(label=np.full((len(a['label']), 3), 2 if s == 'test' else 1))
                                     for s, a in d.items()], {},
                          "test.npz: key 'label' has values other than 0 and 1"),
    'too few classes': (lambda d: [a.update(label=np.zeros_like(a['label'])) for a in d.values()], {},
                        "train.npz: key 'label' has only class 0, expected at least 2 classes"),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_bad_file_is_refused_in_one_line_and_writes_nothing(tmp_path, case):
  mutate, options, message = BAD_FILES[case]
  dataset = _dataset()
  mutate(dataset)
  _write(tmp_path / 'own', dataset)
  with pytest.raises(ConfigError, match='^' + message) as error:
    data.load_builder(_config(tmp_path, **options))
  assert '\n' not in str(error.value)
  _assert_nothing_prepared(tmp_path)


def _npy_bytes(value):
  buffer = io.BytesIO()
  np.save(buffer, value)
  return buffer.getvalue()


@pytest.mark.parametrize('write', [
    lambda path: path.write_bytes(b'not a zip file'),
    lambda path: path.write_bytes(_npy_bytes(np.zeros((16, 2, 2)))),  # One .npy array, not a .npz.
])
def test_file_that_is_not_a_npz_is_one_line(tmp_path, write):
  _write(tmp_path / 'own', _dataset())
  write(tmp_path / 'own' / 'test.npz')
  with pytest.raises(ConfigError, match=r'^test.npz: is not a .npz \(zip\) archive, expected named arrays'):
    data.load_builder(_config(tmp_path))
  _assert_nothing_prepared(tmp_path)


@pytest.mark.parametrize('options, message', [
    ({'path': ''}, 'config.data.arrays.path is empty'),
    ({'path': '/nonexistent/own'}, "config.data.arrays.path='/nonexistent/own' is not a directory"),
    ({'task': 'ranking'}, "config.data.arrays.task='ranking' is unknown; valid choices: auto, classification"),
    ({'num_classes': -1}, 'config.data.arrays.num_classes=-1 must be an integer >= 2, or 0'),
    ({'num_classes': 1}, 'config.data.arrays.num_classes=1 must be an integer >= 2, or 0'),
    ({'label_names': 'a,b'}, 'config.data.arrays.label_names has 2 names, expected 3'),
    ({'label_names': 'a,a,b'}, "config.data.arrays.label_names='a,a,b' repeats a name"),
    ({'task': 'regression', 'num_classes': 3}, 'config.data.arrays.num_classes=3 is set, but the task is regression'),
])
def test_bad_options_are_refused_in_one_line(tmp_path, options, message):
  _write(tmp_path / 'own', _dataset())
  with pytest.raises(ConfigError, match='^' + message):
    data.load_builder(_config(tmp_path, **options))
  _assert_nothing_prepared(tmp_path)


def test_fixed_file_prepares_after_a_failure(tmp_path):
  dataset = _dataset()
  _poke('validation', 'audio', (0, 3, 1), math.nan)(dataset)
  _write(tmp_path / 'own', dataset)
  with pytest.raises(ConfigError):
    data.load_builder(_config(tmp_path))
  dataset['validation']['audio'][0, 3, 1] = 0.5
  _write(tmp_path / 'own', dataset)
  builder = data.load_builder(_config(tmp_path))
  np.testing.assert_array_equal(_read(builder, 'validation')['audio'],
                                dataset['validation']['audio'].astype(np.float32))


def test_failure_while_writing_leaves_no_prepared_dataset(tmp_path, monkeypatch):
  _write(tmp_path / 'own', _dataset())
  write_examples = arrays.Arrays._generate_examples

  def fail_midway(self, split_arrays):
    for i, example in enumerate(write_examples(self, split_arrays)):
      if i == 3:
        raise RuntimeError('disk full')
      yield example

  monkeypatch.setattr(arrays.Arrays, '_generate_examples', fail_midway)
  with pytest.raises(RuntimeError, match='disk full'):
    data.load_builder(_config(tmp_path))
  assert not list((tmp_path / 'data').rglob('dataset_info.json'))
  monkeypatch.undo()
  assert data.load_builder(_config(tmp_path)).info.splits['train'].num_examples == COUNTS['train']


def _job_config(tmp_path, job):
  config = shrink(default.get_config(), str(tmp_path / 'data'))
  config.job = job
  config.data.name = 'arrays'
  config.data.arrays.path = str(tmp_path / 'own')
  config.teacher.modalities = 'text,audio,video'
  config.student.modality = 'audio'
  return config


@pytest.mark.slow
def test_distill_job_on_three_modalities_of_unequal_lengths(tmp_path):
  """A regression task (classification on own arrays: docs/new_method.md, run by tests/test_docs.py)."""
  _write(tmp_path / 'own', _dataset('regression'))
  config = _job_config(tmp_path, 'distill')
  config.distill.terms = 'hidden:mse:1.0,logits:l1:1.0,attention:mse:0.1'
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert np.isfinite(results['teacher']['test']['mae'])
  for arm in ('student', 'distilled'):
    assert np.isfinite(results[arm]['mean']['mae'])
  report = (tmp_path / 'work' / 'report.md').read_text()
  assert 'teacher (text + audio + video)' in report and 'ridge' in report


@pytest.mark.slow
def test_teacher_job_on_multilabel_flags(tmp_path):
  _write(tmp_path / 'own', _dataset('multilabel'))
  results = train.train_and_evaluate(_job_config(tmp_path, 'teacher'), str(tmp_path / 'work'))
  assert set(results['test']) == {f'label{i}_{m}' for i in range(3) for m in ('acc', 'f1')}
