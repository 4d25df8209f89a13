"""Tests of the MulT pickle builders and the restricted unpickler, on small fake files.

The fakes follow the MulT layout exactly (splits 'train'/'valid'/'test' holding
'text', 'audio', 'vision' (N, L, F) float64, 'labels', 'id') with zero-padded fronts.
"""
import math
import os
import pickle
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmkd_jax.data import mult
from mmkd_jax.data import safe_pickle
from mmkd_jax.errors import ConfigError
from mmkd_jax.registry import Registry

WIDTHS = {'text': 300, 'audio': 5, 'vision': 20}  # The real MOSI widths: not 74/35.
COUNTS = {'train': 24, 'valid': 6, 'test': 8}
ALIGNED = {'text': 12, 'audio': 12, 'vision': 12}
UNALIGNED = {'text': 9, 'audio': 30, 'vision': 21}


def _split(rng, n, lengths, task, label_layout):
  """One split in MulT's layout; each sequence has a random zero-padded front."""
  arrays = {}
  for key, length in lengths.items():
    x = rng.normal(size=(n, length, WIDTHS[key]))
    pad = rng.integers(0, length, size=n)  # At least one real token per example.
    x[np.arange(length) < pad[:, None]] = 0.0
    arrays[key] = x
  if task == 'regression':
    scores = np.round(rng.uniform(-3, 3, size=n), 1)
    scores[:2] = (0.0, 3.0)
    arrays['labels'] = scores.reshape((n,) + label_layout)
  else:
    flags = rng.integers(0, 2, size=(n, 4))
    arrays['labels'] = np.eye(2)[flags] if label_layout == (4, 2) else flags.astype(np.float64)
  arrays['id'] = np.array([[f'video{i}'.encode(), b'0', b'1'] for i in range(n)])
  return arrays


def _data(task='regression', lengths=ALIGNED, label_layout=(1, 1), seed=0):
  rng = np.random.default_rng(seed)
  return {split: _split(rng, n, lengths, task, label_layout) for split, n in COUNTS.items()}


def _write(tmp_path, data, filename='mosi_data.pkl', protocol=pickle.HIGHEST_PROTOCOL):
  manual = tmp_path / 'manual'
  manual.mkdir(exist_ok=True)
  with open(manual / filename, 'wb') as f:
    pickle.dump(data, f, protocol=protocol)


def _config(tmp_path, name='mosi', aligned=True, zero_audio_neg_inf=False):
  return ml_collections.ConfigDict({
      'name': name, 'data_dir': str(tmp_path / 'data'), 'manual_dir': str(tmp_path / 'manual'),
      'aligned': aligned, 'zero_audio_neg_inf': zero_audio_neg_inf})


def _prepare(config):
  builder = mult.make_builder(config)
  builder.download_and_prepare()
  return builder


def _read(builder, split):
  source = builder.as_data_source(split=split)
  records = [source[i] for i in range(len(source))]
  return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def _assert_nothing_prepared(tmp_path):
  data_dir = tmp_path / 'data'
  leftovers = [p for p in data_dir.rglob('*')
               if p.name == 'dataset_info.json' or 'incomplete' in p.name] if data_dir.exists() else []
  assert not leftovers


def _check_split(builder, split, arrays):
  got = _read(builder, split)
  for key in mult.MODALITIES:
    np.testing.assert_array_equal(got[key], arrays[key].astype(np.float32))
    np.testing.assert_array_equal(got[key + '_mask'], np.any(arrays[key] != 0, axis=-1))
    assert got[key].dtype == np.float32 and got[key + '_mask'].dtype == bool
  return got


@pytest.mark.parametrize('aligned,lengths', [(True, ALIGNED), (False, UNALIGNED)])
def test_mosi_prepares_with_shapes_from_the_file(tmp_path, aligned, lengths):
  data = _data(lengths=lengths)
  _write(tmp_path, data, mult.pickle_filename('mosi', aligned))
  builder = _prepare(_config(tmp_path, aligned=aligned))
  features = builder.info.features
  for key, length in lengths.items():
    assert features[key].shape == (length, WIDTHS[key])
    assert features[key + '_mask'].shape == (length,)
  assert builder.builder_config.name == ('aligned' if aligned else 'unaligned')
  for out_split, split in mult.SPLITS.items():
    assert builder.info.splits[out_split].num_examples == COUNTS[split]
    got = _check_split(builder, out_split, data[split])
    np.testing.assert_allclose(got['label'], data[split]['labels'].reshape(-1), rtol=1e-6)
    assert got['label'].dtype.kind == 'f'
  assert 'tensorflow' not in sys.modules


def test_masks_follow_the_front_padding(tmp_path):
  data = _data()
  _write(tmp_path, data)
  got = _read(_prepare(_config(tmp_path)), 'test')
  mask = got['text_mask']
  assert not mask.all() and mask.any(axis=1).all()
  # Zero-padded at the front: once a token is real, the rest are too.
  assert (np.diff(mask.astype(int), axis=1) >= 0).all()


@pytest.mark.parametrize('label_layout', [(4, 2), (4,)])
def test_iemocap_labels_become_four_flags(tmp_path, label_layout):
  data = _data('multilabel', UNALIGNED, label_layout)
  _write(tmp_path, data, 'iemocap_data_noalign.pkl')
  builder = _prepare(_config(tmp_path, 'iemocap', aligned=False))
  assert builder.info.features['label'].shape == (4,)
  labels = data['valid']['labels']
  expected = labels.argmax(-1) if label_layout == (4, 2) else labels
  got = _check_split(builder, 'validation', data['valid'])
  np.testing.assert_array_equal(got['label'], expected)
  assert got['label'].dtype == np.int32
  assert mult.TASKS['iemocap'] == ('multilabel', 4, ('neutral', 'happy', 'sad', 'angry'))


def test_mosei_with_n_by_1_labels_old_protocol_and_no_id(tmp_path):
  data = _data(label_layout=(1,))
  for arrays in data.values():
    del arrays['id']
  _write(tmp_path, data, 'mosei_senti_data.pkl', protocol=2)  # Bytes go through _codecs.
  builder = _prepare(_config(tmp_path, 'mosei_senti'))
  got = _check_split(builder, 'train', data['train'])
  np.testing.assert_allclose(got['label'], data['train']['labels'][:, 0], rtol=1e-6)


def test_numpy_1_pickles_load(tmp_path):
  data = _data()
  # NumPy 1.x names its reconstructors under numpy.core; protocol 2 spells globals as text.
  blob = pickle.dumps(data, protocol=2).replace(b'numpy._core.', b'numpy.core.')
  assert b'numpy.core.multiarray' in blob
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'mosi_data.pkl').write_bytes(blob)
  _check_split(_prepare(_config(tmp_path)), 'train', data['train'])


def test_building_leaves_no_temporary_directories(private_tempdir, tmp_path):
  """tfds makes a temp dir per unprepared builder for its bucket lookup; the MulT builders skip it."""
  _write(tmp_path, _data())
  assert not mult.make_builder(_config(tmp_path)).is_prepared()
  assert list(private_tempdir.iterdir()) == []


def test_prepared_dataset_is_reused_without_the_file(tmp_path):
  data = _data(lengths=UNALIGNED)
  _write(tmp_path, data, 'mosi_data_noalign.pkl')
  _prepare(_config(tmp_path, aligned=False))
  (tmp_path / 'manual' / 'mosi_data_noalign.pkl').unlink()
  builder = _prepare(_config(tmp_path, aligned=False))
  assert builder.info.features['audio'].shape == (UNALIGNED['audio'], WIDTHS['audio'])
  _check_split(builder, 'test', data['test'])


def test_register_and_task_table():
  datasets = Registry('dataset')
  mult.register(datasets)
  assert datasets.names() == ['iemocap', 'mosei_senti', 'mosi']
  assert mult.TASKS['mosi'].task == 'regression' and mult.TASKS['mosi'].num_outputs == 1


def test_missing_file_names_file_and_manual_dir(tmp_path):
  with pytest.raises(ConfigError, match='mosi_data.pkl: not found in the manual dir .*manual'):
    mult.make_builder(_config(tmp_path))
  _assert_nothing_prepared(tmp_path)


def test_conflicting_manual_dir_is_refused(tmp_path):
  _write(tmp_path, _data())
  builder = mult.make_builder(_config(tmp_path))
  other = tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'elsewhere'))
  with pytest.raises(ConfigError, match='differs'):
    builder.download_and_prepare(download_config=other)
  _assert_nothing_prepared(tmp_path)


def _set(split, key, value_fn):
  def mutate(data):
    data[split][key] = value_fn(data[split][key])
  return mutate


def _poke(split, key, index, value):
  def mutate(data):
    data[split][key][index] = value
  return mutate


BAD_FILES = {
    'missing split': (lambda d: d.pop('valid'), "split 'valid' is missing"),
    'missing key': (lambda d: d['valid'].pop('audio'), "split 'valid' key 'audio' is missing"),
    'wrong rank': (_set('valid', 'audio', lambda x: x[:, 0]),
                   r"split 'valid' key 'audio' has rank 2, expected 3 \(N, L, F\)"),
    'fewer vision rows': (_set('valid', 'vision', lambda x: x[:-1]),
                          "split 'valid' key 'vision' has 5 examples but key 'text' has 6"),
    'fewer labels': (_set('test', 'labels', lambda x: x[:-1]),
                     "split 'test' key 'labels' has 7 examples but key 'text' has 8"),
    'fewer ids': (_set('train', 'id', lambda x: x[:-1]),
                  "split 'train' key 'id' has 23 examples"),
    'NaN': (_poke('valid', 'audio', (0, 3, 1), math.nan),
            r"split 'valid' key 'audio' has 1 non-finite values as float32 \(NaN: 1"),
    'Inf': (_poke('test', 'vision', (2, 5, 0), math.inf), r"split 'test' key 'vision' .*\+inf: 1"),
    'overflows float32': (_poke('train', 'text', (1, 11, 7), 1e39),
                          r"split 'train' key 'text' .*\+inf: 1"),
    '-inf audio': (_poke('train', 'audio', (0, 11, 0), -math.inf),
                   "split 'train' key 'audio' .*-inf: 1.*zero_audio_neg_inf"),
    'NaN label': (_poke('valid', 'labels', (0, 0, 0), math.nan),
                  "split 'valid' key 'labels' has non-finite"),
    'label out of range': (_poke('valid', 'labels', (1, 0, 0), 3.5),
                           r"split 'valid' key 'labels' has values in \[.*\], expected \[-3.0, 3.0\]"),
    'label shape': (_set('valid', 'labels', lambda x: np.zeros((len(x), 2))),
                    r"split 'valid' key 'labels' has shape \(6, 2\)"),
    'width differs': (_set('test', 'audio', lambda x: x[:, :, :4]),
                      r"split 'test' key 'audio' has \(L, F\) = \(12, 4\) but split 'train'"),
    'object features': (_set('train', 'text', lambda x: x.astype(object)),
                        "split 'train' key 'text' has dtype object"),
    'list, not array': (_set('train', 'text', lambda x: x.tolist()),
                        "split 'train' key 'text' is a list, expected a numpy array"),
    'split not a dict': (lambda d: d.update(valid=[1, 2]), "split 'valid' is a list"),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_bad_file_fails_with_one_line_and_writes_nothing(tmp_path, case):
  mutate, message = BAD_FILES[case]
  data = _data()
  mutate(data)
  _write(tmp_path, data)
  with pytest.raises(ConfigError, match='^mosi_data.pkl: ' + message) as error:
    _prepare(_config(tmp_path))
  assert '\n' not in str(error.value)
  _assert_nothing_prepared(tmp_path)


def test_not_a_dict_is_refused(tmp_path):
  _write(tmp_path, [np.zeros(3)])
  with pytest.raises(ConfigError, match='^mosi_data.pkl: holds a list, expected a dict'):
    _prepare(_config(tmp_path))


def test_bad_iemocap_pairs_are_refused(tmp_path):
  data = _data('multilabel', ALIGNED, (4, 2))
  data['train']['labels'][0, 2] = (1.0, 1.0)
  _write(tmp_path, data, 'iemocap_data.pkl')
  with pytest.raises(ConfigError, match="^iemocap_data.pkl: split 'train' key 'labels' .* one-hot"):
    _prepare(_config(tmp_path, 'iemocap'))


def test_audio_neg_inf_is_zeroed_only_when_asked(tmp_path):
  data = _data()
  data['train']['audio'][0, -1, 0] = -math.inf
  _write(tmp_path, data)
  builder = _prepare(_config(tmp_path, zero_audio_neg_inf=True))
  assert builder.builder_config.name == 'aligned_zero_audio_neg_inf'
  got = _read(builder, 'train')
  assert got['audio'][0, -1, 0] == 0.0
  np.testing.assert_array_equal(got['audio'][1:], data['train']['audio'][1:].astype(np.float32))


class _Payload:
  """Unpickling this would run a shell command that creates `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


class _Custom:
  """A harmless class that is still not an array."""


@pytest.mark.parametrize('make_value,forbidden', [
    (lambda marker: _Payload(marker), r'(posix|os)\.system'),
    (lambda marker: _Custom(), r'test_mult_data\._Custom'),
    (lambda marker: np.array([_Custom()], dtype=object), r'test_mult_data\._Custom'),
])
def test_code_in_the_pickle_is_never_run(tmp_path, make_value, forbidden):
  marker = tmp_path / 'pwned'
  data = _data()
  data['train']['text'] = make_value(marker)
  _write(tmp_path, data)
  with pytest.raises(ConfigError, match=f'^mosi_data.pkl: cannot be loaded safely: .*{forbidden}, '
                     'which is not allowed') as error:
    _prepare(_config(tmp_path))
  assert '\n' not in str(error.value)
  assert not marker.exists()
  _assert_nothing_prepared(tmp_path)


def test_restricted_unpickler_rejects_builtins_beyond_containers(tmp_path):
  path = tmp_path / 'eval.pkl'
  path.write_bytes(pickle.dumps(_EvalPayload()))
  with pytest.raises(ConfigError, match=r'^eval.pkl: .*builtins\.eval, which is not allowed'):
    safe_pickle.load(path)


class _EvalPayload:

  def __reduce__(self):
    return eval, ('1 + 1',)


def test_truncated_pickle_is_one_line(tmp_path):
  path = tmp_path / 'cut.pkl'
  path.write_bytes(pickle.dumps(_data())[:1000])
  with pytest.raises(ConfigError, match='^cut.pkl: cannot be loaded safely'):
    safe_pickle.load(path)


def test_fixed_file_prepares_after_a_failure(tmp_path):
  data = _data()
  _poke('valid', 'audio', (0, 3, 1), math.nan)(data)
  _write(tmp_path, data)
  with pytest.raises(ConfigError):
    _prepare(_config(tmp_path))
  data['valid']['audio'][0, 3, 1] = 0.5
  _write(tmp_path, data)
  _check_split(_prepare(_config(tmp_path)), 'validation', data['valid'])


def test_failure_while_writing_leaves_no_prepared_dataset(tmp_path, monkeypatch):
  _write(tmp_path, _data())
  write_examples = mult.MultBuilder._generate_examples

  def fail_midway(self, arrays):
    for i, example in enumerate(write_examples(self, arrays)):
      if i == 3:
        raise RuntimeError('disk full')
      yield example

  monkeypatch.setattr(mult.MultBuilder, '_generate_examples', fail_midway)
  with pytest.raises(RuntimeError, match='disk full'):
    _prepare(_config(tmp_path))
  _assert_nothing_prepared(tmp_path)
  monkeypatch.undo()
  builder = _prepare(_config(tmp_path))
  assert builder.info.splits['train'].num_examples == COUNTS['train']


def test_all_padding_example_is_kept_and_logged(tmp_path, caplog):
  data = _data()
  data['test']['vision'][4] = 0.0
  _write(tmp_path, data)
  got = _read(_prepare(_config(tmp_path)), 'test')
  assert not got['vision_mask'][4].any() and got['vision_mask'][3].any()
  assert "split 'test' key 'vision': 1 of 8 examples are all padding" in caplog.text
