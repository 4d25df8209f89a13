"""UCI Multiple Features (mfeat): six views of 2,000 handwritten digits as token sequences.

The data ship with the package (`mfeat/mfeat.npz.xz`, CC BY 4.0, see `mfeat/README.md`), so
preparing needs no download. Each view is standardised with train-split statistics and cut
into tokens of consecutive features, so every view is a (length, features) sequence like
the other multimodal datasets.
"""
import importlib.resources
import io
import lzma

import numpy as np
import tensorflow_datasets as tfds

from mmkd_jax.data.local_builder import LocalCodePath, LocalDatasetInfo

# View -> (number of features, features per token). The last token of a view is zero
# padded; pix tokens of 15 are the rows of its 15x16 image. fou's 76 coefficients make 4
# tokens of 19, each with its own projection (models/tokens.py, docs/mfeat_defaults.md).
VIEWS: dict[str, tuple[int, int]] = {
    'fou': (76, 19),
    'fac': (216, 12),
    'kar': (64, 4),
    'pix': (240, 15),
    'zer': (47, 4),
    'mor': (6, 6),
}
NUM_CLASSES = 10
# Examples per class in each split (70/15/15 of the 200 per class).
PER_CLASS = {'train': 140, 'validation': 30, 'test': 30}
SPLIT_SEED = 0

_CITATION = """\
@misc{duin1998mfeat,
  author = {Duin, Robert P. W.},
  title = {Multiple Features},
  howpublished = {UCI Machine Learning Repository},
  year = {1998},
}
@article{vanbreukelen1998handwritten,
  author = {van Breukelen, Martijn and Duin, Robert P. W. and Tax, David M. J. and
            den Hartog, J. E.},
  title = {Handwritten digit recognition by combined classifiers},
  journal = {Kybernetika},
  volume = {34},
  number = {4},
  pages = {381--386},
  year = {1998},
}
"""


def num_tokens(view: str) -> int:
  """Sequence length of `view` after cutting it into tokens."""
  num_features, chunk = VIEWS[view]
  return -(-num_features // chunk)


def load_packaged() -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Returns the raw (2000, F) float32 views and the (2000,) int64 labels of the package copy."""
  blob = importlib.resources.files(__package__).joinpath('mfeat', 'mfeat.npz.xz').read_bytes()
  with np.load(io.BytesIO(lzma.decompress(blob))) as arrays:
    views = {view: arrays[view] for view in VIEWS}
    labels = arrays['label'].astype(np.int64)
  return views, labels


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Stratified split: each class's rows, permuted by `seed`, cut by `PER_CLASS`; sorted rows."""
  rng = np.random.default_rng(seed)
  parts = {split: [] for split in PER_CLASS}
  for label in range(NUM_CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == label))
    start = 0
    for split, count in PER_CLASS.items():
      parts[split].append(rows[start:start + count])
      start += count
  return {split: np.sort(np.concatenate(rows)) for split, rows in parts.items()}


def standardise(x: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
  """Standardises the columns of `x` with the mean/std of `x[train_rows]` (std 0 -> 1)."""
  train = x[train_rows].astype(np.float64)
  mean, std = train.mean(axis=0), train.std(axis=0)
  std[std == 0] = 1.0
  return ((x - mean) / std).astype(np.float32)


def tokenize(x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts (N, F) features into (N, L, chunk) zero-padded tokens and an (N, L) real-token mask."""
  n, num_features = x.shape
  length = -(-num_features // chunk)
  padded = np.zeros((n, length * chunk), np.float32)
  padded[:, :num_features] = x
  mask = np.arange(length) * chunk < num_features  # A token is real if it has any feature.
  return padded.reshape(n, length, chunk), np.broadcast_to(mask, (n, length)).copy()


class Mfeat(LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """UCI Multiple Features as six token-sequence views with a 1400/300/300 stratified split."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.', '1.1.0': 'fou in 4 tokens of 19 features (was 19 of 4).'}

  def _info(self) -> tfds.core.DatasetInfo:
    features = {}
    for view, (_, chunk) in VIEWS.items():
      length = num_tokens(view)
      features[view] = tfds.features.Tensor(shape=(length, chunk), dtype=np.float32)
      features[view + '_mask'] = tfds.features.Tensor(shape=(length,), dtype=np.bool_)
    features['label'] = tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)])
    features['index'] = tfds.features.Scalar(dtype=np.int64)
    return LocalDatasetInfo(
        builder=self,
        disable_shuffling=True,  # Keep generation order: by original row.
        description=(
            'Six views (fou, fac, kar, pix, zer, mor) of 2,000 handwritten digits, '
            'standardised with train statistics and cut into token sequences.'),
        features=tfds.features.FeaturesDict(features),
        homepage='https://archive.ics.uci.edu/ml/datasets/Multiple+Features',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    """Splits the packaged copy; `dl_manager` is unused since nothing is downloaded."""
    del dl_manager
    views, labels = load_packaged()
    rows = split_indices(labels)
    tokens = {
        view: tokenize(standardise(views[view], rows['train']), chunk)
        for view, (_, chunk) in VIEWS.items()
    }
    return {split: self._generate_examples(tokens, labels, split_rows)
            for split, split_rows in rows.items()}

  def _generate_examples(self, tokens, labels, rows):
    for row in rows:
      example = {'label': labels[row], 'index': row}
      for view, (values, mask) in tokens.items():
        example[view] = values[row]
        example[view + '_mask'] = mask[row]
      yield int(row), example
