"""grain input pipelines: infinite shuffled training batches and padded evaluation passes.

A split is read once per builder through `builder.as_data_source()` into NumPy arrays
(decoding a TFDS record costs ~0.15 ms, a whole batch from memory a few microseconds) and
kept, read-only, for the builder's lifetime, so the many evaluation passes and runs of a job
do not decode it again; batches are gathered from those arrays by index. Batches are dicts
of NumPy arrays: `m` (B, L, F) float32 and `m_mask` (B, L) bool for each requested modality,
`label` (int32 if integer, float32 if float, with the label's own trailing shape) and
`weight` (B,) float32, 0 for padding.
"""
import functools
import sys
from typing import Iterator, Sequence
import weakref

import grain
import numpy as np
import tensorflow_datasets as tfds

from mmkd_jax.errors import ConfigError

Batch = dict[str, np.ndarray]


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples in `split`, from the builder's metadata (no reading)."""
  return builder.info.splits[split].num_examples


# builder -> split -> every field of the split stacked over its records (read-only arrays).
_SPLITS: 'weakref.WeakKeyDictionary[tfds.core.DatasetBuilder, dict[str, Batch]]' = weakref.WeakKeyDictionary()


def _decode_split(builder: tfds.core.DatasetBuilder, split: str) -> Batch:
  """Every field of `split` stacked in source order, decoded on first use and then cached."""
  cached = _SPLITS.setdefault(builder, {})
  if split not in cached:
    source = builder.as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
    arrays = {key: np.stack([record[key] for record in records]) for key in builder.info.features}
    for value in arrays.values():
      value.flags.writeable = False
    cached[split] = arrays
  return cached[split]


def _read_split(builder: tfds.core.DatasetBuilder, split: str,
                modalities: Sequence[str]) -> Batch:
  """The requested modalities, their masks, the label and a unit weight of `split`, in source order."""
  features = builder.info.features
  missing = [m for m in modalities if m not in features or m + '_mask' not in features]
  if missing:
    raise ConfigError(f'{builder.name} has no modalities {missing}; it has '
                      f'{[name for name in features if name + "_mask" in features]}')
  decoded = _decode_split(builder, split)
  arrays = {key: decoded[key] for m in modalities for key in (m, m + '_mask')}
  label = decoded['label']
  arrays['label'] = label.astype(np.float32 if np.issubdtype(label.dtype, np.floating) else np.int32, copy=False)
  arrays['weight'] = np.ones(len(label), np.float32)
  return arrays


def _take(arrays: Batch, rows: np.ndarray) -> Batch:
  return {key: value[rows] for key, value in arrays.items()}


def train_arrays(builder: tfds.core.DatasetBuilder, modalities: Sequence[str], *, split: str = 'train',
                 row_fields: Batch | None = None) -> Batch:
  """Every training field of `split` in source order: `_read_split`'s and the `row_fields` (more
  per-example arrays, e.g. the teacher's cached outputs)."""
  arrays = _read_split(builder, split, modalities)
  n = len(arrays['label'])
  for key, value in (row_fields or {}).items():
    if key in arrays:
      raise ValueError(f'row field {key!r} has the name of a field of {split}')
    if len(value) != n:
      raise ValueError(f'row field {key!r} has {len(value)} rows; {split} has {n}')
  return {**arrays, **(row_fields or {})}


# One NumPy permutation per (split size, seed, epoch): grain's shuffle permutes index by index, ~2 ms a batch.
@functools.lru_cache(maxsize=128)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(n)


def global_rows(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """The rows of the global batch of `step` (0-based): epochs are permutations of the `n` rows
  from `seed`, cut into global batches (the remainder is dropped)."""
  batches_per_epoch = n // global_batch
  if not batches_per_epoch:
    raise ConfigError(f'the split has {n} examples, fewer than one global batch ({global_batch})')
  epoch, index = divmod(step, batches_per_epoch)
  return _permutation(n, seed, epoch)[index * global_batch:(index + 1) * global_batch]


def train_iterator(builder: tfds.core.DatasetBuilder, modalities: Sequence[str],
                   batch_size: int, seed: int, *, split: str = 'train', shard_index: int = 0,
                   shard_count: int = 1, row_fields: Batch | None = None) -> grain.DatasetIterator:
  """Endless training batches, reshuffled every epoch from `seed`; resumable via get_state.

  Step s is `global_rows(..., s)` of `batch_size * shard_count` examples; shard `shard_index`
  gets its `batch_size` slice of each, so shards are disjoint within an epoch. `row_fields` as
  in `train_arrays`.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  arrays = train_arrays(builder, modalities, split=split, row_fields=row_fields)
  n, global_batch = len(arrays['label']), batch_size * shard_count
  global_rows(n, global_batch, seed, 0)  # fails now, not at the first batch, on a split that is too small

  def batch(step: int) -> Batch:
    rows = global_rows(n, global_batch, seed, step)
    return _take(arrays, rows[shard_index * batch_size:(shard_index + 1) * batch_size])

  # Steps 0, 1, 2, ...: the iterator state is the next step, so a restored one resumes exactly.
  dataset = grain.MapDataset.range(sys.maxsize).map(batch)
  # Gathering from memory is cheap: no reader threads, no prefetch.
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(builder: tfds.core.DatasetBuilder, split: str, modalities: Sequence[str],
                 batch_size: int) -> Iterator[Batch]:
  """One ordered pass over `split`; the last batch is zero padded to `batch_size`, weight 0."""
  arrays = _read_split(builder, split, modalities)
  n = len(arrays['label'])
  for start in range(0, n, batch_size):
    batch = {key: value[start:start + batch_size] for key, value in arrays.items()}
    pad = batch_size - len(batch['label'])
    if pad:
      batch = {key: np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)])
               for key, value in batch.items()}
    yield batch
