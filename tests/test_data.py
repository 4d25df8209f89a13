"""Tests of the data package: the mfeat and synthetic builders and the grain pipelines."""
import os
import pathlib
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmkd_jax import data
from mmkd_jax.data import mfeat
from mmkd_jax.data import pipeline
from mmkd_jax.data import synthetic
from mmkd_jax.errors import ConfigError

CSV_DIR = pathlib.Path('/work/shared/data/mfeat')
SPLITS = ('train', 'validation', 'test')
TOKEN_SHAPES = {'fou': (4, 19), 'fac': (18, 12), 'kar': (16, 4), 'pix': (16, 15),
                'zer': (12, 4), 'mor': (1, 6)}


def _config(data_dir, name, **synthetic_fields):
  config = data.default_data_config(name)
  config.data_dir = str(data_dir)
  config.synthetic.update(synthetic_fields)
  return config


def _read(builder, split):
  """All records of `split` as stacked arrays, in source order."""
  source = builder.as_data_source(split=split)
  records = [source[i] for i in range(len(source))]
  return {key: np.stack([r[key] for r in records]) for key in records[0]}


def _untokenize(tokens, view):
  return tokens.reshape(len(tokens), -1)[:, :mfeat.VIEWS[view][0]]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def mfeat_builder(data_dir):
  return data.load_builder(_config(data_dir, 'mfeat'))


@pytest.fixture(scope='module')
def mfeat_data(mfeat_builder):
  return {split: _read(mfeat_builder, split) for split in SPLITS}


@pytest.fixture(scope='module')
def synthetic_builder(data_dir):
  return data.load_builder(_config(data_dir, 'synthetic', num_modalities=3))


# mfeat.


def test_mfeat_splits_are_stratified_and_disjoint(mfeat_builder, mfeat_data):
  sizes = {split: pipeline.num_examples(mfeat_builder, split) for split in SPLITS}
  assert sizes == {'train': 1400, 'validation': 300, 'test': 300}
  for split, per_class in mfeat.PER_CLASS.items():
    assert len(mfeat_data[split]['label']) == sizes[split]
    np.testing.assert_array_equal(np.bincount(mfeat_data[split]['label']), [per_class] * 10)
  indices = np.concatenate([mfeat_data[split]['index'] for split in SPLITS])
  np.testing.assert_array_equal(np.sort(indices), np.arange(2000))
  _, labels = mfeat.load_packaged()
  for split in SPLITS:
    np.testing.assert_array_equal(labels[mfeat_data[split]['index']], mfeat_data[split]['label'])


def test_mfeat_standardised_with_train_statistics_only(mfeat_data):
  views, _ = mfeat.load_packaged()
  train_rows = mfeat_data['train']['index']
  for view in mfeat.VIEWS:
    train = _untokenize(mfeat_data['train'][view], view)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    std = train.std(axis=0)
    constant = views[view][train_rows].std(axis=0) == 0
    np.testing.assert_allclose(std[~constant], 1, atol=1e-4)
    np.testing.assert_allclose(std[constant], 0, atol=1e-6)
    raw = views[view].astype(np.float64)
    mean, scale = raw[train_rows].mean(axis=0), raw[train_rows].std(axis=0)
    scale[scale == 0] = 1
    for split in ('validation', 'test'):
      rows = mfeat_data[split]['index']
      np.testing.assert_allclose(
          _untokenize(mfeat_data[split][view], view), (raw[rows] - mean) / scale,
          rtol=1e-4, atol=1e-4)
  # The check above can tell train-only statistics from statistics over all rows.
  all_mean = views['fou'].mean(axis=0)
  assert not np.allclose(all_mean, views['fou'][train_rows].mean(axis=0), rtol=1e-4, atol=1e-6)


def test_mfeat_tokens_masks_and_task_info(mfeat_builder, mfeat_data):
  info = data.task_info(mfeat_builder)
  assert info.modalities == TOKEN_SHAPES
  assert list(info.modalities) == list(mfeat.VIEWS)
  assert (info.task, info.num_outputs) == ('classification', 10)
  assert info.label_names == tuple('0123456789')
  test = mfeat_data['test']
  for view, shape in TOKEN_SHAPES.items():
    assert test[view].shape == (300,) + shape and test[view].dtype == np.float32
    assert test[view + '_mask'].shape == (300, shape[0]) and test[view + '_mask'].dtype == bool
    assert test[view + '_mask'].all()  # Every token holds at least one real feature.
  assert (test['zer'][:, -1, 3] == 0).all()  # 47 features: the last token's last is padding.
  assert not (test['zer'][:, -1, :3] == 0).all()


def test_mfeat_pix_tokens_are_image_rows(mfeat_data):
  views, _ = mfeat.load_packaged()
  rows = mfeat_data['train']['index']
  images = mfeat.standardise(views['pix'], rows)[rows].reshape(-1, 16, 15)
  np.testing.assert_allclose(mfeat_data['train']['pix'], images, atol=1e-6)


@pytest.mark.skipif(not CSV_DIR.is_dir(), reason=f'{CSV_DIR} not available')
def test_mfeat_packaged_copy_equals_csvs():
  views, labels = mfeat.load_packaged()
  packaged = pathlib.Path(mfeat.__file__).parent / 'mfeat' / 'mfeat.npz.xz'
  assert packaged.stat().st_size < 2_000_000
  for view, (num_features, _) in mfeat.VIEWS.items():
    table = np.loadtxt(CSV_DIR / f'mfeat-{view}.csv', delimiter=',', skiprows=1,
                       dtype=np.float32)
    assert views[view].shape == (2000, num_features) and views[view].dtype == np.float32
    np.testing.assert_array_equal(views[view], table[:, :-1])
    np.testing.assert_array_equal(labels, table[:, -1])


# Synthetic.


@pytest.mark.parametrize('key, value, low', [('num_train', -5, 1), ('seq_len', 0, 1), ('num_modalities', 0, 1),
                                            ('num_classes', 1, 2)])
def test_synthetic_sizes_out_of_range_name_the_key(key, value, low):
  with pytest.raises(ConfigError, match=rf'^config\.data\.synthetic\.{key}={value} must be >= {low}$'):
    synthetic.make_builder_config({key: value})


def test_synthetic_config_name_and_dict_round_trip():
  config = synthetic.SyntheticConfig(**{'num_modalities': 3, 'seed': 2})
  assert config.name == 'm3_len8_dim6_cls4_n256-64-64_seed2'
  assert synthetic.SyntheticConfig(**config.fields()).name == config.name
  assert synthetic.SyntheticConfig().name != config.name
  fields = data.default_data_config('synthetic').synthetic.to_dict()
  assert fields == synthetic.SyntheticConfig().fields()


def test_synthetic_shapes_and_masks(synthetic_builder):
  info = data.task_info(synthetic_builder)
  assert info.modalities == {'m0': (8, 6), 'm1': (8, 6), 'm2': (8, 6)}
  assert (info.task, info.num_outputs) == ('classification', 4)
  assert {s: pipeline.num_examples(synthetic_builder, s) for s in SPLITS} == {
      'train': 256, 'validation': 64, 'test': 64}
  train = _read(synthetic_builder, 'train')
  for m in info.modalities:
    values, mask = train[m], train[m + '_mask']
    assert values.shape == (256, 8, 6) and values.dtype == np.float32
    assert mask.shape == (256, 8) and mask.dtype == bool
    lengths = mask.sum(axis=1)
    assert lengths.min() >= 4 and lengths.max() <= 8 and len(set(lengths)) > 1
    np.testing.assert_array_equal(mask, np.arange(8) < lengths[:, None])  # A valid prefix.
    assert (values[~mask] == 0).all() and (values[mask] != 0).all()


def test_synthetic_is_deterministic(synthetic_builder):
  config = synthetic.SyntheticConfig(num_modalities=3)
  first, second = synthetic.generate(config), synthetic.generate(config)
  for split in SPLITS:
    for key in first[split]:
      np.testing.assert_array_equal(first[split][key], second[split][key])
    stored = _read(synthetic_builder, split)
    np.testing.assert_array_equal(stored['label'], first[split]['label'])
    np.testing.assert_array_equal(stored['m2'], first[split]['m2'])
  other = synthetic.generate(synthetic.SyntheticConfig(num_modalities=3, seed=1))
  assert not np.array_equal(other['train']['m0'], first['train']['m0'])


def test_synthetic_label_needs_every_modality():
  config = synthetic.SyntheticConfig(num_modalities=3, num_train=12000)
  train = synthetic.generate(config)['train']
  latents, labels = train['latents'], train['label']
  np.testing.assert_array_equal(labels, latents.sum(axis=1) % 4)
  for m in range(3):
    for value in range(4):
      given = labels[latents[:, m] == value]  # The label given one latent is ~uniform.
      np.testing.assert_allclose(np.bincount(given, minlength=4) / len(given), 0.25, atol=0.03)
  # Yet each modality's sequence reveals its own latent (nearest class mean of its tokens).
  for m in range(3):
    mask = train[f'm{m}_mask']
    means = train[f'm{m}'].sum(axis=1) / mask.sum(axis=1, keepdims=True)
    centres = np.stack([means[latents[:, m] == c].mean(axis=0) for c in range(4)])
    predicted = np.argmin(((means[:, None] - centres) ** 2).sum(axis=-1), axis=1)
    assert (predicted == latents[:, m]).mean() > 0.9


# Registry and config.


def test_unknown_dataset_error_lists_choices(tmp_path):
  with pytest.raises(ConfigError) as error:
    data.load_builder(_config(tmp_path, 'nope'))
  message = str(error.value)
  assert '\n' not in message and 'nope' in message
  assert 'mfeat' in message and 'synthetic' in message


def test_default_data_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert data.default_data_config().data_dir == str(tmp_path)
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert data.default_data_config().data_dir == str(pathlib.Path.home() / 'tensorflow_datasets')


def test_building_leaves_no_temporary_directories(private_tempdir, tmp_path):
  """tfds makes a temp dir per unprepared builder for its bucket lookup; ours skip that lookup."""
  for name in ('mfeat', 'synthetic'):  # the MulT builders need their pickles (tests/test_mult_data.py)
    builder = data.DATASETS.get(name)(_config(tmp_path / 'data', name))
    assert not builder.is_prepared(), name
  assert list(private_tempdir.iterdir()) == []


def test_load_builder_reuses_prepared_data(data_dir, synthetic_builder):
  stamps = lambda path: sorted((f.name, os.stat(f).st_mtime_ns) for f in path.iterdir())
  before = stamps(synthetic_builder.data_path)
  builder = data.load_builder(_config(data_dir, 'synthetic', num_modalities=3))
  assert builder.data_path == synthetic_builder.data_path
  assert stamps(builder.data_path) == before


# Pipeline.


def _example_ids(builder, split, modality):
  """Maps each example's `modality` bytes to its position in the split (for identity)."""
  values = _read(builder, split)[modality]
  return {row.tobytes(): i for i, row in enumerate(values)}


def _ids(batch, ids, modality='m0'):
  return [ids[row.tobytes()] for row in batch[modality]]


def test_train_batches_shapes_and_dtypes(mfeat_builder):
  batch = next(pipeline.train_iterator(mfeat_builder, ['fou', 'pix'], 64, seed=0))
  assert set(batch) == {'fou', 'fou_mask', 'pix', 'pix_mask', 'label', 'weight'}
  assert batch['fou'].shape == (64, 4, 19) and batch['fou'].dtype == np.float32
  assert batch['pix'].shape == (64, 16, 15) and batch['pix_mask'].shape == (64, 16)
  assert batch['pix_mask'].dtype == bool
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['weight'], np.ones(64, np.float32))
  with pytest.raises(ConfigError, match='no modalities'):
    pipeline.train_iterator(mfeat_builder, ['fou', 'm0'], 64, seed=0)


def test_train_order_follows_seed_and_epochs_reshuffle(synthetic_builder):
  ids = _example_ids(synthetic_builder, 'train', 'm0')
  steps = lambda seed, n: [_ids(next(it), ids) for it in [pipeline.train_iterator(
      synthetic_builder, ['m0'], 48, seed)] for _ in range(n)]
  first = steps(0, 10)  # 256 examples: 5 batches per epoch, 16 dropped.
  assert first == steps(0, 10)
  assert first[:5] != steps(1, 10)[:5]
  epochs = [sum(first[:5], []), sum(first[5:], [])]
  for epoch in epochs:
    assert len(set(epoch)) == 240
  assert epochs[0] != epochs[1]


def test_train_iterator_resumes_from_state(synthetic_builder):
  iterator = pipeline.train_iterator(synthetic_builder, ['m1', 'm2'], 32, seed=3)
  for _ in range(11):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  restored = pipeline.train_iterator(synthetic_builder, ['m1', 'm2'], 32, seed=3)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_train_shards_are_disjoint(synthetic_builder):
  ids = _example_ids(synthetic_builder, 'train', 'm0')
  shard_steps = []
  for shard in range(2):
    iterator = pipeline.train_iterator(synthetic_builder, ['m0'], 16, seed=0, shard_index=shard,
                                       shard_count=2)
    shard_steps.append([_ids(next(iterator), ids) for _ in range(8)])  # One epoch.
  again = pipeline.train_iterator(synthetic_builder, ['m0'], 16, seed=0, shard_index=1,
                                  shard_count=2)
  assert shard_steps[1] == [_ids(next(again), ids) for _ in range(8)]
  for step in range(8):
    assert len(shard_steps[0][step]) == len(shard_steps[1][step]) == 16
  epoch = [set(sum(steps, [])) for steps in shard_steps]
  assert len(epoch[0]) == len(epoch[1]) == 128 and not epoch[0] & epoch[1]
  with pytest.raises(ValueError):
    pipeline.train_iterator(synthetic_builder, ['m0'], 16, seed=0, shard_index=2, shard_count=2)


def test_row_fields_travel_with_their_examples(synthetic_builder):
  """Per-example arrays in source order (the teacher's cached targets) stay with their rows."""
  ids = _example_ids(synthetic_builder, 'train', 'm0')
  n = len(ids)
  row_fields = {'teacher/row': np.arange(n, dtype=np.int32)}
  iterator = pipeline.train_iterator(synthetic_builder, ['m0'], 48, seed=2, row_fields=row_fields)
  for _ in range(7):  # past the first epoch's end
    batch = next(iterator)
    assert batch['teacher/row'].shape == (48,)
    assert batch['teacher/row'].tolist() == _ids(batch, ids)
  with pytest.raises(ValueError, match=rf"row field 'teacher/row' has {n - 1} rows; train has {n}"):
    pipeline.train_iterator(synthetic_builder, ['m0'], 48, seed=2, row_fields={'teacher/row': np.arange(n - 1)})
  with pytest.raises(ValueError, match="row field 'm0_mask' has the name of a field of train"):
    pipeline.train_iterator(synthetic_builder, ['m0'], 48, seed=2, row_fields={'m0_mask': np.arange(n)})


def test_eval_batches_cover_split_once(synthetic_builder):
  ids = _example_ids(synthetic_builder, 'validation', 'm0')
  batches = list(pipeline.eval_batches(synthetic_builder, 'validation', ['m0', 'm2'], 24))
  assert len(batches) == 3  # 64 = 24 + 24 + 16 real and 8 padding.
  seen = []
  for batch in batches:
    assert set(batch) == {'m0', 'm0_mask', 'm2', 'm2_mask', 'label', 'weight'}
    assert batch['m0'].shape == (24, 8, 6) and batch['label'].shape == (24,)
    real = batch['weight'] == 1
    assert ((batch['weight'] == 0) | real).all()
    for key in batch:
      assert not batch[key][~real].any()  # Padding examples are all zero.
    seen += [ids[row.tobytes()] for row in batch['m0'][real]]
  np.testing.assert_array_equal(batches[-1]['weight'], [1] * 16 + [0] * 8)
  assert seen == list(range(64))


class _FakeBuilder:
  """Just what the pipeline reads from a builder, for labels the real builders lack."""

  name = 'fake'

  def __init__(self, label_feature, labels):
    self.info = types.SimpleNamespace(features=tfds.features.FeaturesDict({
        'a': tfds.features.Tensor(shape=(2, 3), dtype=np.float32),
        'a_mask': tfds.features.Tensor(shape=(2,), dtype=np.bool_),
        'label': label_feature,
    }))
    self._records = [{'a': np.full((2, 3), i, np.float32), 'a_mask': np.ones(2, bool),
                      'label': label} for i, label in enumerate(labels)]

  def as_data_source(self, split):
    del split
    return self._records


@pytest.mark.parametrize('feature, labels, task, dtype, shape, num_outputs', [
    (tfds.features.Tensor(shape=(), dtype=np.float32), np.linspace(-3, 3, 10), 'regression',
     np.float32, (), 1),
    (tfds.features.Tensor(shape=(4,), dtype=np.int64), np.eye(4, dtype=np.int64)[np.arange(10) % 4],
     'multilabel', np.int32, (4,), 4),
])
def test_other_label_kinds(feature, labels, task, dtype, shape, num_outputs):
  builder = _FakeBuilder(feature, labels)
  info = data.task_info(builder)
  assert (info.modalities, info.task, info.num_outputs) == ({'a': (2, 3)}, task, num_outputs)
  batch = next(pipeline.train_iterator(builder, ['a'], 4, seed=0))
  assert batch['label'].dtype == dtype and batch['label'].shape == (4,) + shape
  last = list(pipeline.eval_batches(builder, 'test', ['a'], 4))[-1]
  assert last['label'].shape == (4,) + shape and last['weight'].sum() == 2


def test_splits_are_decoded_once_per_builder(data_dir, monkeypatch):
  # A fresh builder object over the prepared data: nothing of it is cached yet.
  builder = data.load_builder(_config(data_dir, 'synthetic', num_modalities=3))
  opened = []
  original = builder.as_data_source
  monkeypatch.setattr(builder, 'as_data_source', lambda split: opened.append(split) or original(split=split))
  first = list(pipeline.eval_batches(builder, 'validation', ['m0'], 24))
  again = list(pipeline.eval_batches(builder, 'validation', ['m0', 'm2'], 24))
  next(pipeline.train_iterator(builder, ['m1'], 16, seed=0))
  next(pipeline.train_iterator(builder, ['m0', 'm1'], 16, seed=1))
  assert opened == ['validation', 'train']
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['m0'], b['m0'])
  # The cached arrays cannot be changed through a batch that views them.
  with pytest.raises(ValueError, match='read-only'):
    first[0]['m0'][0, 0, 0] = 1.0
