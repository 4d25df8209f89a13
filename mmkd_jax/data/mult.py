"""TFDS builders for the MulT feature pickles of CMU-MOSI, CMU-MOSEI and IEMOCAP.

The MulT line of work (Tsai et al., 2019) ships each benchmark as one pickle: a dict
with splits 'train', 'valid' and 'test', each a dict of arrays 'text' (N, L, F),
'audio' (N, L, F), 'vision' (N, L, F), 'labels' and optionally 'id'. The files cannot
be downloaded here, so the builders read them from the user's manual dir only, with
a restricted unpickler, and validate the whole file before writing a single example.

Widths F and lengths L come from the file (the unaligned files use a different L per
modality). Every example gets, per modality `v`, `v` (L, F) float32 and `v_mask` (L,)
bool, where a token is real when its feature vector is not all zeros (MulT pads
sequences with zero vectors), plus `label`. The 'id' array is checked but not stored.
"""
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmkd_jax import registry
from mmkd_jax.data import safe_pickle
from mmkd_jax.data.local_builder import LocalCodePath, LocalDatasetInfo
from mmkd_jax.errors import ConfigError
from mmkd_jax.metrics import IEMOCAP_EMOTIONS

MODALITIES = ('text', 'audio', 'vision')
# Output split name -> split name inside the pickle.
SPLITS = {'train': 'train', 'validation': 'valid', 'test': 'test'}
SENTIMENT_RANGE = (-3.0, 3.0)


class MultTask(NamedTuple):
  """What a dataset's `label` means: the task kind, model outputs and label names."""
  task: str
  num_outputs: int
  label_names: tuple[str, ...]


TASKS = {
    'mosi': MultTask('regression', 1, ('sentiment',)),
    'mosei_senti': MultTask('regression', 1, ('sentiment',)),
    'iemocap': MultTask('multilabel', len(IEMOCAP_EMOTIONS), IEMOCAP_EMOTIONS),
}


def pickle_filename(name: str, aligned: bool) -> str:
  """The file name MulT's loader uses, e.g. 'mosi_data.pkl' / 'mosi_data_noalign.pkl'."""
  return f'{name}_data.pkl' if aligned else f'{name}_data_noalign.pkl'


def _absolute(path: epath.PathLike) -> epath.Path:
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _instructions(name: str) -> str:
  """Where the user puts the files, shown when one is missing."""
  return (f'Put {pickle_filename(name, True)} (aligned) and/or {pickle_filename(name, False)} '
          '(unaligned), the MulT feature pickles, in the manual dir; see docs/real_data.md.')


def _fail(filename: str, split: str, key: str, problem: str) -> ConfigError:
  return ConfigError(f"{filename}: split '{split}' key '{key}' {problem}")


def _features(filename: str, split: str, key: str, value: np.ndarray,
              zero_neg_inf: bool) -> np.ndarray:
  """Checks one modality array and returns it as float32 (N, L, F)."""
  if value.dtype.kind not in 'biuf':
    raise _fail(filename, split, key, f'has dtype {value.dtype}, expected a numeric array')
  if value.ndim != 3:
    raise _fail(filename, split, key, f'has rank {value.ndim}, expected 3 (N, L, F)')
  if 0 in value.shape:
    raise _fail(filename, split, key, f'has shape {value.shape}, expected no empty axis')
  with np.errstate(over='ignore'):  # Overflow becomes +-inf, reported below.
    value = np.asarray(value, dtype=np.float32)  # No copy when the file is float32.
  if zero_neg_inf:
    neg_inf = np.isneginf(value)
    if neg_inf.any():
      logging.warning("%s: split '%s' key '%s': set %d -inf values to 0 as configured",
                      filename, split, key, int(neg_inf.sum()))
      value[neg_inf] = 0.0
  if not np.isfinite(value).all():
    counts = (int(np.isnan(value).sum()), int(np.isposinf(value).sum()),
              int(np.isneginf(value).sum()))
    hint = ''
    if key == 'audio' and counts[2] and not zero_neg_inf:
      hint = "; MulT's loader sets audio -inf to 0: set data.zero_audio_neg_inf=True to do so"
    raise _fail(filename, split, key,
                f'has {sum(counts)} non-finite values as float32 (NaN: {counts[0]}, '
                f'+inf: {counts[1]}, -inf: {counts[2]}){hint}')
  return value


def _labels(filename: str, split: str, value: np.ndarray, task: str) -> np.ndarray:
  """Checks the labels and returns float32 (N,) scores or int32 (N, C) 0/1 flags."""
  key, n = 'labels', value.shape[0]
  if value.dtype.kind not in 'biuf':
    raise _fail(filename, split, key, f'has dtype {value.dtype}, expected a numeric array')
  if not np.isfinite(value).all():
    raise _fail(filename, split, key, 'has non-finite values')
  if task == 'regression':
    if value.shape not in ((n,), (n, 1), (n, 1, 1)):
      raise _fail(filename, split, key,
                  f'has shape {value.shape}, expected (N,), (N, 1) or (N, 1, 1)')
    low, high = SENTIMENT_RANGE
    if value.min() < low or value.max() > high:
      raise _fail(filename, split, key,
                  f'has values in [{value.min()}, {value.max()}], expected [{low}, {high}]')
    return value.reshape(n).astype(np.float32)
  classes = len(IEMOCAP_EMOTIONS)
  if value.shape == (n, classes, 2):
    if not np.all(((value == 0) | (value == 1)) & (value.sum(axis=-1, keepdims=True) == 1)):
      raise _fail(filename, split, key, 'has (N, 4, 2) entries that are not one-hot pairs')
    return value.argmax(axis=-1).astype(np.int32)  # [0, 1] means the emotion is present.
  if value.shape == (n, classes):
    if not np.all((value == 0) | (value == 1)):
      raise _fail(filename, split, key, 'has (N, 4) values other than 0 and 1')
    return value.astype(np.int32)
  raise _fail(filename, split, key,
              f'has shape {value.shape}, expected (N, {classes}, 2) or (N, {classes})')


def validate(data: Any, filename: str, task: str,
             zero_audio_neg_inf: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """Checks a loaded MulT pickle and converts it to arrays keyed by output split.

  Returns {split: {modality: float32 (N, L, F), modality + '_mask': bool (N, L),
  'label': labels}}. Every problem raises a one-line `ConfigError` naming the file and,
  where there is one, the split and key. With `zero_audio_neg_inf`, -inf audio values
  are set to 0 (as MulT's own loader does) and logged; other non-finite values fail.
  """
  if not isinstance(data, dict):
    raise ConfigError(f"{filename}: holds a {type(data).__name__}, expected a dict of "
                      f"splits {', '.join(map(repr, SPLITS.values()))}")
  for split, arrays in data.items():
    if not isinstance(arrays, dict):
      raise ConfigError(f"{filename}: split {split!r} is a {type(arrays).__name__}, "
                        'expected a dict of arrays')
    for key, value in arrays.items():
      if not isinstance(value, np.ndarray):
        raise _fail(filename, split, key,
                    f'is a {type(value).__name__}, expected a numpy array')
  result = {}
  for out_split, split in SPLITS.items():
    if split not in data:
      raise ConfigError(f"{filename}: split '{split}' is missing "
                        f"(found {', '.join(map(repr, data)) or 'none'})")
    arrays = data[split]
    for key in (*MODALITIES, 'labels'):
      if key not in arrays:
        raise _fail(filename, split, key, f"is missing (found {', '.join(map(repr, arrays))})")
    n = arrays['text'].shape[0] if arrays['text'].ndim else 0
    if n == 0:
      raise _fail(filename, split, 'text', 'has no examples')
    for key in (*MODALITIES, 'labels', 'id'):
      if key in arrays and (arrays[key].ndim == 0 or arrays[key].shape[0] != n):
        count = arrays[key].shape[0] if arrays[key].ndim else 'no'
        raise _fail(filename, split, key, f"has {count} examples but key 'text' has {n}")
    examples = {}
    for key in MODALITIES:
      value = _features(filename, split, key, arrays[key], zero_audio_neg_inf and key == 'audio')
      first = result.get('train', {}).get(key)
      if first is not None and value.shape[1:] != first.shape[1:]:
        raise _fail(filename, split, key, f"has (L, F) = {value.shape[1:]} but split 'train' "
                    f'has {first.shape[1:]}')
      mask = value.any(axis=-1)
      empty = int(np.sum(~mask.any(axis=-1)))
      if empty:
        logging.warning("%s: split '%s' key '%s': %d of %d examples are all padding",
                        filename, split, key, empty, n)
      examples[key], examples[f'{key}_mask'] = value, mask
    examples['label'] = _labels(filename, split, arrays['labels'], task)
    result[out_split] = examples
  return result


@dataclasses.dataclass(eq=False, kw_only=True)
class MultConfig(tfds.core.BuilderConfig):
  """Which file to read (aligned or not) and whether to zero -inf audio values."""
  aligned: bool = True
  zero_audio_neg_inf: bool = False


def _config_name(aligned: bool, zero_audio_neg_inf: bool) -> str:
  return ('aligned' if aligned else 'unaligned') + (
      '_zero_audio_neg_inf' if zero_audio_neg_inf else '')


def _builder_configs() -> list[MultConfig]:
  configs = []
  for aligned in (True, False):
    for zero in (False, True):
      name = _config_name(aligned, zero)
      description = ('Word-aligned' if aligned else 'Unaligned') + ' sequences' + (
          '; -inf audio values set to 0 as in MulT' if zero else '')
      configs.append(MultConfig(name=name, description=description, aligned=aligned,
                                zero_audio_neg_inf=zero))
  return configs


class MultBuilder(LocalCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder; subclasses set `name`. Never downloads anything.

  The features' shapes come from the prepared dataset when it exists, otherwise from
  the pickle, which is then loaded and validated once at construction, so a bad file
  fails before anything is written.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = _builder_configs()

  def __init__(self, *, manual_dir: epath.PathLike | None = None, **kwargs: Any):
    """`manual_dir` defaults to TFDS's `<data_dir>/downloads/manual`."""
    self._manual_dir_arg = manual_dir
    self._validated: dict[str, dict[str, np.ndarray]] | None = None
    super().__init__(**kwargs)
    self._original_state['manual_dir'] = manual_dir  # Survive pickling of the builder.

  @property
  def manual_dir(self) -> epath.Path:
    """The only directory the pickle is read from."""
    if self._manual_dir_arg:
      return _absolute(self._manual_dir_arg)
    return _absolute(self.data_dir_root / 'downloads' / 'manual')

  @property
  def pickle_path(self) -> epath.Path:
    """The file this builder's config reads, inside `manual_dir`."""
    return self.manual_dir / pickle_filename(self.name, self.builder_config.aligned)

  def _load(self) -> dict[str, dict[str, np.ndarray]]:
    """Loads and validates the pickle once; later calls reuse the result."""
    if self._validated is None:
      path = self.pickle_path
      if not path.exists():
        raise ConfigError(f'{path.name}: not found in the manual dir {self.manual_dir}; '
                          + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
      data = safe_pickle.load(path)
      self._validated = validate(data, path.name, TASKS[self.name].task,
                                 self.builder_config.zero_audio_neg_inf)
    return self._validated

  def _info(self) -> tfds.core.DatasetInfo:
    task = TASKS[self.name]
    if (self.data_path / 'features.json').exists():
      features = tfds.features.FeatureConnector.from_config(self.data_path)
    else:
      train = self._load()['train']
      spec = {}
      for key in MODALITIES:
        length, width = train[key].shape[1:]
        spec[key] = tfds.features.Tensor(shape=(length, width), dtype=np.float32)
        spec[f'{key}_mask'] = tfds.features.Tensor(shape=(length,), dtype=np.bool_)
      if task.task == 'regression':
        spec['label'] = tfds.features.Scalar(dtype=np.float32)
      else:
        spec['label'] = tfds.features.Tensor(shape=(task.num_outputs,), dtype=np.int32)
      features = tfds.features.FeaturesDict(spec)
    return LocalDatasetInfo(
        builder=self,
        description=(f'{self.name} from the MulT feature pickles; {task.task} over '
                     f"{', '.join(task.label_names)}."),
        features=features,
        homepage='https://github.com/yaohungt/Multimodal-Transformer',
        # Keep the file's order, so example i of a split is row i of the pickle. (A
        # `disable_shuffling` class attribute is ignored by tfds 4.9.10.)
        disable_shuffling=True,
    )

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None,
                           **kwargs: Any) -> None:
    """Prepares from `manual_dir` only, with TFDS's GCS look-up switched off."""
    config = download_config or tfds.download.DownloadConfig()
    if config.manual_dir is not None and _absolute(config.manual_dir) != self.manual_dir:
      raise ConfigError(f'download_config.manual_dir {config.manual_dir} differs from the '
                        f"builder's manual dir {self.manual_dir}; pass it to the builder")
    config = dataclasses.replace(config, manual_dir=self.manual_dir, try_download_gcs=False)
    super().download_and_prepare(download_config=config, **kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Iterator[tuple[int, dict[str, np.ndarray]]]]:
    del dl_manager  # Its manual_dir is `self.manual_dir` (see download_and_prepare).
    # Everything was validated by `_load` before the first example is generated.
    data = self._load()
    self._validated = None  # The generators keep what they need; free the rest.
    return {split: self._generate_examples(arrays) for split, arrays in data.items()}

  def _generate_examples(self, arrays: dict[str, np.ndarray]
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for i in range(arrays['label'].shape[0]):
      yield i, {key: value[i] for key, value in arrays.items()}


class Mosi(MultBuilder, skip_registration=True):
  """CMU-MOSI sentiment intensity, regression in [-3, 3]."""
  name = 'mosi'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(name)


class MoseiSenti(MultBuilder, skip_registration=True):
  """CMU-MOSEI sentiment intensity, regression in [-3, 3]."""
  name = 'mosei_senti'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(name)


class Iemocap(MultBuilder, skip_registration=True):
  """IEMOCAP four emotions (neutral, happy, sad, angry), each present or not."""
  name = 'iemocap'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(name)


BUILDERS: dict[str, type[MultBuilder]] = {
    builder.name: builder for builder in (Mosi, MoseiSenti, Iemocap)}


def make_builder(data_config: ml_collections.ConfigDict) -> MultBuilder:
  """The builder for `data_config.name`; call `download_and_prepare()` on it to prepare.

  Reads `data_dir`, `manual_dir` (default: TFDS's `<data_dir>/downloads/manual`),
  `aligned` (default True) and `zero_audio_neg_inf` (default False) from the config.
  """
  if data_config.name not in BUILDERS:
    raise ConfigError(f'unknown MulT dataset {data_config.name!r}; valid choices: '
                      f"{', '.join(BUILDERS)}")
  aligned = data_config.get('aligned', True)
  zero = data_config.get('zero_audio_neg_inf', False)
  if not isinstance(aligned, bool) or not isinstance(zero, bool):
    raise ConfigError('data.aligned and data.zero_audio_neg_inf must be booleans')
  data_dir, manual_dir = data_config.get('data_dir'), data_config.get('manual_dir')
  return BUILDERS[data_config.name](
      data_dir=os.path.expanduser(data_dir) if data_dir else None,
      manual_dir=manual_dir or None,
      config=_config_name(aligned, zero),
      file_format='array_record',
  )


def register(datasets: registry.Registry) -> None:
  """Registers `make_builder` under 'mosi', 'mosei_senti' and 'iemocap'."""
  for name in BUILDERS:
    datasets.register(name)(make_builder)
