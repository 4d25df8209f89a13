"""A TFDS builder for the user's own multimodal arrays: one .npz file per split.

`config.data.arrays.path` is a directory holding `train.npz`, `validation.npz` and
`test.npz` (written with `np.savez`). Each file holds, for N examples:

- `<modality>`: (N, L, F) real numbers, one key per modality; L and F may differ
  between modalities but not between splits;
- `<modality>_mask`: optional (N, L) booleans (or 0/1), True at real positions;
  without it every position is real;
- `label`: (N,) integer class ids (classification), (N,) or (N, 1) floats
  (regression), or (N, K) 0/1 flags (multilabel).

The task is `config.data.arrays.task`, or read off the train labels when it is
'auto': integers of shape (N,) or (N, 1) are classes, integers or booleans of shape
(N, K) with K > 1 are multilabel flags, floats are regression targets. Every file is
loaded and checked before anything is written; each problem raises one
`ConfigError` line naming the file, the key and what was expected. The prepared
dataset's name includes a digest of the files' bytes and the task options, so
changed files are prepared afresh and unchanged ones are reused.
"""
import dataclasses
import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmkd_jax.data.local_builder import LocalCodePath, LocalDatasetInfo
from mmkd_jax.errors import ConfigError

SPLITS = ('train', 'validation', 'test')
TASKS = ('auto', 'classification', 'regression', 'multilabel')
LABEL = 'label'
MASK_SUFFIX = '_mask'
# Batch fields the pipeline and builder add; a modality may not take these names.
RESERVED = (LABEL, 'index', 'weight')
# Modality names become model parameter and config names: letters, digits, underscores.
_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_]*$')

SplitArrays = dict[str, np.ndarray]


def split_filename(split: str) -> str:
  """'train.npz', 'validation.npz' or 'test.npz'."""
  return f'{split}.npz'


def _fail(filename: str, key: str, problem: str) -> ConfigError:
  return ConfigError(f"{filename}: key '{key}' {problem}")


def _listing(keys) -> str:
  return ', '.join(map(repr, keys)) or 'none'


def split_path(directory: str, split: str) -> str:
  """The file of `split` in `directory`; a missing one is refused in one line."""
  path = os.path.join(directory, split_filename(split))
  if not os.path.isfile(path):
    raise ConfigError(f'{split_filename(split)}: not found in {directory}; expected '
                      f"{', '.join(map(split_filename, SPLITS))} there (see docs/own_data.md)")
  return path


def read_npz(path: str) -> SplitArrays:
  """All arrays of the .npz file at `path`, refusing pickled objects; one line per failure."""
  filename = os.path.basename(path)
  # Anything but a zip archive numpy would read as one .npy array or try to unpickle.
  if not zipfile.is_zipfile(path):
    raise ConfigError(f'{filename}: is not a .npz (zip) archive, expected named arrays written '
                      'with np.savez')
  try:
    npz = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
    raise ConfigError(f'{filename}: cannot be read as a .npz file ({error}), expected named '
                      'arrays written with np.savez') from None
  arrays = {}
  with npz:
    for key in npz.keys():
      try:
        arrays[key] = npz[key]
      except ValueError:  # Object arrays need pickle, which is never allowed.
        raise _fail(filename, key, 'cannot be read without pickle (an object array), expected a '
                    'numeric array') from None
      except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise _fail(filename, key, f'cannot be read ({error}), expected an array written by '
                    'np.savez') from None
  return arrays


def _features(filename: str, key: str, value: np.ndarray) -> np.ndarray:
  """Checks one modality array and returns it as float32 (N, L, F)."""
  if value.dtype.kind not in 'biuf':
    raise _fail(filename, key, f'has dtype {value.dtype}, expected real numbers')
  if value.ndim != 3:
    raise _fail(filename, key, f'has rank {value.ndim} (shape {value.shape}), expected 3 (N, L, F)')
  if 0 in value.shape:
    raise _fail(filename, key, f'has shape {value.shape}, expected no empty axis')
  with np.errstate(over='ignore'):  # Overflow becomes +-inf, reported below.
    value = np.asarray(value, dtype=np.float32)
  if not np.isfinite(value).all():
    raise _fail(filename, key, f'has {int(np.sum(~np.isfinite(value)))} non-finite values as '
                f'float32 (NaN: {int(np.isnan(value).sum())}, inf: {int(np.isinf(value).sum())}), '
                'expected finite numbers')
  return value


def _mask(filename: str, key: str, value: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Checks a modality's mask against its (N, L) and returns it as bool."""
  if value.shape != shape:
    raise _fail(filename, key, f'has shape {value.shape}, expected {shape} (N, L of its modality)')
  if value.dtype.kind not in 'biuf' or not np.all((value == 0) | (value == 1)):
    raise _fail(filename, key, 'has values other than True/False (or 1/0), expected a boolean mask')
  return value.astype(bool)


def infer_task(labels: np.ndarray) -> str:
  """The task that labels of this dtype and shape mean when `task` is 'auto'."""
  if labels.dtype.kind == 'f':
    return 'regression'
  if labels.ndim == 2 and labels.shape[1] > 1:
    return 'multilabel'
  return 'classification'


def _labels(filename: str, value: np.ndarray, task: str, n: int) -> np.ndarray:
  """Checks the labels of one file for `task`; returns int64 (N,), float32 (N,) or int32 (N, K)."""
  if value.dtype.kind not in 'biuf':
    raise _fail(filename, LABEL, f'has dtype {value.dtype}, expected numbers')
  if value.ndim == 0 or value.shape[0] != n:
    count = value.shape[0] if value.ndim else 'no'
    raise _fail(filename, LABEL, f'has {count} examples, expected {n} like the modalities')
  if not np.isfinite(value).all():
    raise _fail(filename, LABEL, 'has non-finite values, expected finite numbers')
  if task == 'classification':
    if value.dtype.kind not in 'iu':
      raise _fail(filename, LABEL, f'has dtype {value.dtype}, expected integer class ids for '
                  'classification (or set data.arrays.task)')
    if value.shape not in ((n,), (n, 1)):
      raise _fail(filename, LABEL, f'has shape {value.shape}, expected ({n},) class ids')
    return value.reshape(n).astype(np.int64)
  if task == 'regression':
    if value.shape not in ((n,), (n, 1)):
      raise _fail(filename, LABEL, f'has shape {value.shape}, expected ({n},) or ({n}, 1): one '
                  "regression target per example (for 0/1 flags set data.arrays.task='multilabel')")
    return value.reshape(n).astype(np.float32)
  if value.ndim != 2:
    raise _fail(filename, LABEL, f'has shape {value.shape}, expected ({n}, K) 0/1 flags for multilabel')
  if not np.all((value == 0) | (value == 1)):
    raise _fail(filename, LABEL, 'has values other than 0 and 1, expected 0/1 flags for multilabel')
  return value.astype(np.int32)


def _split_arrays(filename: str, raw: SplitArrays, task: str) -> SplitArrays:
  """Checks one split's arrays and returns modalities (float32), masks (bool) and labels."""
  if LABEL not in raw:
    raise _fail(filename, LABEL, f'is missing (found {_listing(raw)}), expected the labels')
  modalities = [key for key in raw if key != LABEL and not key.endswith(MASK_SUFFIX)]
  if not modalities:
    raise ConfigError(f'{filename}: holds no modality, expected (N, L, F) arrays next to '
                      f"'{LABEL}' (found {_listing(raw)})")
  for key in raw:
    if key.endswith(MASK_SUFFIX) and key[:-len(MASK_SUFFIX)] not in modalities:
      raise _fail(filename, key, f"has no modality '{key[:-len(MASK_SUFFIX)]}' to mask "
                  f'(modalities: {_listing(modalities)})')
  for key in modalities:
    if not _NAME.match(key) or key in RESERVED:
      raise _fail(filename, key, 'is not a usable modality name, expected letters, digits and '
                  f"underscores, starting with a letter, other than {_listing(RESERVED)}")
  result = {}
  first = modalities[0]
  for key in modalities:
    value = _features(filename, key, raw[key])
    n = result[first].shape[0] if result else value.shape[0]
    if value.shape[0] != n:
      raise _fail(filename, key, f"has {value.shape[0]} examples but key '{first}' has {n}")
    mask_key = key + MASK_SUFFIX
    if mask_key in raw:
      mask = _mask(filename, mask_key, raw[mask_key], value.shape[:2])
    else:
      mask = np.ones(value.shape[:2], bool)
    empty = int(np.sum(~mask.any(axis=1)))
    if empty:
      logging.warning("%s: key '%s': %d of %d examples have no real position", filename,
                      mask_key, empty, n)
    result[key], result[mask_key] = value, mask
  result[LABEL] = _labels(filename, raw[LABEL], task, result[first].shape[0])
  return result


@dataclasses.dataclass(frozen=True)
class Options:
  """What the labels mean: the task and, for classification, classes and their names."""
  task: str = 'auto'
  num_classes: int = 0  # 0: the largest class id in any split, plus one.
  label_names: tuple[str, ...] = ()


def options_from_config(config: ml_collections.ConfigDict) -> Options:
  """Checks `config.data.arrays`' task options; one `ConfigError` line per bad value."""
  section = config.arrays
  if section.task not in TASKS:
    raise ConfigError(f'config.data.arrays.task={section.task!r} is unknown; valid choices: '
                      f"{', '.join(TASKS)}")
  if not isinstance(section.num_classes, int) or section.num_classes < 0 or section.num_classes == 1:
    raise ConfigError(f'config.data.arrays.num_classes={section.num_classes!r} must be an integer '
                      '>= 2, or 0 to infer it from the labels')
  names = tuple(name.strip() for name in section.label_names.split(',') if name.strip())
  if len(set(names)) != len(names):
    raise ConfigError(f'config.data.arrays.label_names={section.label_names!r} repeats a name')
  return Options(section.task, section.num_classes, names)


def validate(raw: dict[str, SplitArrays], options: Options) -> tuple[dict[str, SplitArrays], Options]:
  """Checks the arrays of every split together; returns them converted and the resolved options.

  `raw` maps each split to its file's arrays. The resolved options have a concrete task
  and, for classification, the number of classes. Every problem raises a one-line
  `ConfigError` naming the file and key.
  """
  task = options.task
  if task == 'auto':
    train = raw['train']
    if LABEL not in train:
      raise _fail(split_filename('train'), LABEL,
                  f'is missing (found {_listing(train)}), expected the labels')
    task = infer_task(train[LABEL])
  result = {split: _split_arrays(split_filename(split), raw[split], task) for split in SPLITS}
  reference = result['train']
  for split in SPLITS[1:]:
    filename, arrays = split_filename(split), result[split]
    for key in reference:
      if key not in arrays:
        raise _fail(filename, key, f'is missing, expected it as in train.npz (found {_listing(arrays)})')
    for key in arrays:
      if key not in reference:
        raise _fail(filename, key, f'is not in train.npz, expected the same keys as train.npz '
                    f'({_listing(reference)})')
      if key != LABEL and not key.endswith(MASK_SUFFIX):
        if arrays[key].shape[1:] != reference[key].shape[1:]:
          raise _fail(filename, key, f'has (L, F) = {arrays[key].shape[1:]}, expected '
                      f'{reference[key].shape[1:]} as in train.npz')
    if task == 'multilabel' and arrays[LABEL].shape[1] != reference[LABEL].shape[1]:
      raise _fail(filename, LABEL, f'has {arrays[LABEL].shape[1]} flags per example, expected '
                  f'{reference[LABEL].shape[1]} as in train.npz')
  num_classes, names = options.num_classes, options.label_names
  if task == 'classification':
    if not num_classes:
      num_classes = 1 + max(int(result[s][LABEL].max()) for s in SPLITS)
    if names and len(names) != num_classes:
      raise ConfigError(f'config.data.arrays.label_names has {len(names)} names, expected '
                        f'{num_classes}, one per class (set data.arrays.num_classes for classes '
                        'absent from the files)')
    if num_classes < 2:
      raise _fail(split_filename('train'), LABEL, 'has only class 0, expected at least 2 classes')
    for split in SPLITS:
      labels = result[split][LABEL]
      if labels.min() < 0 or labels.max() >= num_classes:
        raise _fail(split_filename(split), LABEL, f'has class ids in [{labels.min()}, {labels.max()}], '
                    f'expected [0, {num_classes - 1}] ({num_classes} classes)')
  elif names:
    raise ConfigError(f'config.data.arrays.label_names is set, but names are for classification and '
                      f'the task is {task}')
  elif num_classes:
    raise ConfigError(f'config.data.arrays.num_classes={num_classes} is set, but the task is {task}; '
                      'leave it 0')
  return result, Options(task, num_classes, names)


def digest(directory: str, options: Options) -> str:
  """A short hex digest of the split files' bytes and the options: the prepared dataset's identity."""
  hasher = hashlib.sha256(repr(options).encode())
  for split in SPLITS:
    with open(split_path(directory, split), 'rb') as f:
      hasher.update(hashlib.file_digest(f, 'sha256').digest())
  return hasher.hexdigest()[:16]


@dataclasses.dataclass(eq=False, kw_only=True)
class ArraysConfig(tfds.core.BuilderConfig):
  """The directory of split files and the task options; the name carries their digest."""
  path: str = ''
  options: Options = Options()


class Arrays(LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """The user's own modalities and labels from one .npz per split. Never downloads anything.

  Feature shapes come from the prepared dataset when it exists, otherwise from the
  files, which are then loaded and validated once at construction, so a bad file fails
  before anything is written.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, **kwargs: Any):
    self._validated: dict[str, SplitArrays] | None = None
    self._options: Options | None = None
    super().__init__(**kwargs)

  def _load(self) -> tuple[dict[str, SplitArrays], Options]:
    """Loads and validates every split file once; later calls reuse the result."""
    if self._validated is None:
      config = self.builder_config
      raw = {split: read_npz(split_path(config.path, split)) for split in SPLITS}
      self._validated, self._options = validate(raw, config.options)
    return self._validated, self._options

  def _info(self) -> tfds.core.DatasetInfo:
    if (self.data_path / 'features.json').exists():
      features = tfds.features.FeatureConnector.from_config(self.data_path)
    else:
      arrays, options = self._load()
      train, spec = arrays['train'], {}
      for key, value in train.items():
        if key == LABEL:
          continue
        dtype = np.bool_ if key.endswith(MASK_SUFFIX) else np.float32
        spec[key] = tfds.features.Tensor(shape=value.shape[1:], dtype=dtype)
      if options.task == 'classification':
        spec[LABEL] = (tfds.features.ClassLabel(names=options.label_names) if options.label_names
                       else tfds.features.ClassLabel(num_classes=options.num_classes))
      elif options.task == 'regression':
        spec[LABEL] = tfds.features.Scalar(dtype=np.float32)
      else:
        spec[LABEL] = tfds.features.Tensor(shape=train[LABEL].shape[1:], dtype=np.int32)
      spec['index'] = tfds.features.Scalar(dtype=np.int64)
      features = tfds.features.FeaturesDict(spec)
    return LocalDatasetInfo(
        builder=self,
        description=f'Multimodal arrays from {self.builder_config.path}.',
        features=features,
        # Keep the files' order, so example i of a split is row i of its file.
        disable_shuffling=True,
    )

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None,
                           **kwargs: Any) -> None:
    """Prepares from the split files, with TFDS's GCS look-up switched off."""
    config = dataclasses.replace(download_config or tfds.download.DownloadConfig(),
                                 try_download_gcs=False)
    super().download_and_prepare(download_config=config, **kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Iterator[tuple[int, SplitArrays]]]:
    del dl_manager  # Nothing is downloaded.
    # Everything was validated by `_load` before the first example is generated.
    arrays, _ = self._load()
    self._validated = None  # The generators keep what they need; free the rest.
    return {split: self._generate_examples(arrays[split]) for split in SPLITS}

  def _generate_examples(self, arrays: SplitArrays) -> Iterator[tuple[int, SplitArrays]]:
    for i in range(arrays[LABEL].shape[0]):
      example = {key: value[i] for key, value in arrays.items()}
      example['index'] = i
      yield i, example


def make_builder(data_config: ml_collections.ConfigDict) -> Arrays:
  """The builder for `data_config.arrays`; call `download_and_prepare()` on it to prepare."""
  options = options_from_config(data_config)
  path = data_config.arrays.path
  if not path:
    raise ConfigError("config.data.arrays.path is empty; give the directory holding "
                      f"{', '.join(map(split_filename, SPLITS))} (see docs/own_data.md)")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ConfigError(f'config.data.arrays.path={data_config.arrays.path!r} is not a directory; give '
                      f"the one holding {', '.join(map(split_filename, SPLITS))}")
  name = f'{options.task}_{digest(path, options)}'
  config = ArraysConfig(name=name, path=path, options=options,
                        description=f'Arrays from {path}.')
  data_dir = data_config.get('data_dir')
  return Arrays(config=config, data_dir=os.path.expanduser(data_dir) if data_dir else None,
                file_format='array_record')


def default_config() -> ml_collections.ConfigDict:
  """The `config.data.arrays` section."""
  return ml_collections.ConfigDict({
      # Directory holding train.npz, validation.npz and test.npz (see docs/own_data.md).
      'path': '',
      # 'classification', 'regression', 'multilabel', or 'auto' to read it off the train labels.
      'task': 'auto',
      # Classification: number of classes; 0 = the largest class id in any split, plus one.
      'num_classes': 0,
      # Classification: comma-separated class names, in class-id order ('' = '0', '1', ...).
      'label_names': '',
  })
