"""A small synthetic multimodal dataset whose label needs every modality.

Each modality m carries a latent class z_m in [0, num_classes): its sequence is a random
prefix of valid tokens, each a fixed class prototype plus Gaussian noise. The label is
(sum_m z_m) mod num_classes, so with independent uniform latents it is uniform given any
proper subset of them: a unimodal model is at chance while a multimodal one can be exact.
It prepares in a fraction of a second, for tests and smoke runs.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mmkd_jax.data.local_builder import LocalCodePath, LocalDatasetInfo
from mmkd_jax.errors import ConfigError

SPLITS = ('train', 'validation', 'test')
# Standard deviation of the noise added to the prototypes (which are standard normal).
NOISE_STD = 1.0


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes and seed of the synthetic data; the name is derived from them (one dir each)."""

  name: str = ''
  num_modalities: int = 2
  seq_len: int = 8
  feat_dim: int = 6
  num_classes: int = 4
  num_train: int = 256
  num_validation: int = 64
  num_test: int = 64
  seed: int = 0

  def __post_init__(self):
    self.name = (
        f'm{self.num_modalities}_len{self.seq_len}_dim{self.feat_dim}_cls{self.num_classes}'
        f'_n{self.num_train}-{self.num_validation}-{self.num_test}_seed{self.seed}')

  def fields(self) -> dict[str, int]:
    """The data fields (not those inherited from `BuilderConfig`) as a plain dict."""
    inherited = {field.name for field in dataclasses.fields(tfds.core.BuilderConfig)}
    return {field.name: getattr(self, field.name)
            for field in dataclasses.fields(self) if field.name not in inherited}

  def split_size(self, split: str) -> int:
    """Number of examples in `split` ('train', 'validation' or 'test')."""
    return getattr(self, f'num_{split}')


def modality_names(config: SyntheticConfig) -> list[str]:
  """'m0', 'm1', ...: the feature names of the modalities."""
  return [f'm{m}' for m in range(config.num_modalities)]


def generate(config: SyntheticConfig) -> dict[str, dict[str, np.ndarray]]:
  """Generates every split: split -> {'m0', 'm0_mask', ..., 'label', 'latents'} arrays.

  Deterministic given `config`; `latents` (N, num_modalities) are the z_m, kept for tests.
  """
  rng = np.random.default_rng(config.seed)
  names = modality_names(config)
  prototypes = rng.standard_normal((len(names), config.num_classes, config.feat_dim))
  data = {}
  for split in SPLITS:
    n = config.split_size(split)
    latents = rng.integers(0, config.num_classes, (n, len(names)))
    arrays = {'label': latents.sum(axis=1) % config.num_classes, 'latents': latents}
    for m, name in enumerate(names):
      lengths = rng.integers(config.seq_len // 2, config.seq_len + 1, n)
      mask = np.arange(config.seq_len) < lengths[:, None]
      noise = NOISE_STD * rng.standard_normal((n, config.seq_len, config.feat_dim))
      values = (prototypes[m, latents[:, m]][:, None, :] + noise) * mask[..., None]
      arrays[name] = values.astype(np.float32)
      arrays[name + '_mask'] = mask
    data[split] = arrays
  return data


class Synthetic(LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """Synthetic sequences for `num_modalities` modalities; label = sum of latents mod classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [SyntheticConfig()]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    features = {}
    for name in modality_names(config):
      features[name] = tfds.features.Tensor(
          shape=(config.seq_len, config.feat_dim), dtype=np.float32)
      features[name + '_mask'] = tfds.features.Tensor(shape=(config.seq_len,), dtype=np.bool_)
    features['label'] = tfds.features.ClassLabel(num_classes=config.num_classes)
    features['index'] = tfds.features.Scalar(dtype=np.int64)
    return LocalDatasetInfo(
        builder=self,
        disable_shuffling=True,  # Keep generation order, the order of `generate`.
        description='Synthetic sequences whose label is the sum of per-modality latents.',
        features=tfds.features.FeaturesDict(features),
    )

  def _split_generators(self, dl_manager):
    """Generates the data in memory; `dl_manager` is unused since nothing is downloaded."""
    del dl_manager
    return {split: self._generate_examples(arrays)
            for split, arrays in generate(self.builder_config).items()}

  def _generate_examples(self, arrays):
    keys = [key for key in arrays if key != 'latents']
    for i in range(len(arrays['label'])):
      example = {key: arrays[key][i] for key in keys}
      example['index'] = i
      yield i, example


def make_builder_config(fields: dict[str, int]) -> SyntheticConfig:
  """The config for `fields`; the default one is the registered instance, which tfds requires."""
  minimum = {'num_modalities': 1, 'seq_len': 1, 'feat_dim': 1, 'num_classes': 2, 'num_train': 1,
             'num_validation': 1, 'num_test': 1}
  for key, low in minimum.items():
    if key in fields and not fields[key] >= low:
      raise ConfigError(f'config.data.synthetic.{key}={fields[key]!r} must be >= {low}')
  config = SyntheticConfig(**fields)
  return Synthetic.builder_configs.get(config.name, config)
