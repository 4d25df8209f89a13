"""Datasets: TFDS builders looked up by name, their task description, and the data config.

Every dataset is a TFDS builder writing array_record files, so grain reads it by random
access (`builder.as_data_source()`). `DATASETS` maps a config name to a factory that takes
the data config (`config.data`) and returns the builder; to add a dataset, import its
module below and register a factory next to the others.
"""
import dataclasses
import os

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmkd_jax import console
from mmkd_jax.data import arrays
from mmkd_jax.data import mfeat
from mmkd_jax.data import mult
from mmkd_jax.data import synthetic
from mmkd_jax.registry import Registry

DATASETS: Registry = Registry('dataset')


def _builder_kwargs(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {'data_dir': os.path.expanduser(config.data_dir), 'file_format': 'array_record'}


@DATASETS.register('mfeat')
def _mfeat(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  return mfeat.Mfeat(**_builder_kwargs(config))


@DATASETS.register('synthetic')
def _synthetic(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder_config = synthetic.make_builder_config(config.synthetic.to_dict())
  return synthetic.Synthetic(config=builder_config, **_builder_kwargs(config))


mult.register(DATASETS)
DATASETS.register('arrays')(arrays.make_builder)


def default_data_config(name: str = 'mfeat') -> ml_collections.ConfigDict:
  """The data section of a training config (`config.data`) for dataset `name`."""
  config = ml_collections.ConfigDict()
  config.name = name
  config.data_dir = os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  config.manual_dir = ''  # Where real-data builders find files that cannot be downloaded.
  # MulT pickles (mosi, mosei_senti, iemocap): word-aligned `*_data.pkl` (True) or `*_data_noalign.pkl`.
  config.aligned = True
  # MulT pickles: set the -inf values of COVAREP audio to 0, as MulT's loader does (else they are refused).
  config.zero_audio_neg_inf = False
  config.synthetic = ml_collections.ConfigDict(synthetic.SyntheticConfig().fields())
  # 'arrays': the user's own modalities and labels, one .npz per split (see docs/own_data.md).
  config.arrays = arrays.default_config()
  return config


def load_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the builder `config.name`, prepared into `config.data_dir` on first use."""
  builder = DATASETS.get(config.name)(config)
  if not builder.is_prepared():
    logging.info('preparing dataset %s in %s (once)', config.name, builder.data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=config.manual_dir or None)
    with console.quiet_stdout():
      builder.download_and_prepare(download_config=download_config)
  return builder


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a model needs to know about a dataset to be built for it.

  Attributes:
    modalities: name -> (sequence length, feature dim), in the builder's order.
    task: 'classification', 'regression' or 'multilabel'.
    num_outputs: classes (classification), regression targets or binary labels.
    label_names: class names for classification, else empty.
  """
  modalities: dict[str, tuple[int, int]]
  task: str
  num_outputs: int
  label_names: tuple[str, ...] = ()


def task_info(builder: tfds.core.DatasetBuilder) -> TaskInfo:
  """Reads the `TaskInfo` off the builder's features: modality `m` has `m` and `m_mask`."""
  features = builder.info.features
  modalities = {name: tuple(features[name].shape) for name in features
                if name + '_mask' in features}
  label = features['label']
  if isinstance(label, tfds.features.ClassLabel):
    return TaskInfo(modalities, 'classification', label.num_classes, tuple(label.names))
  if np.issubdtype(label.np_dtype, np.floating):
    return TaskInfo(modalities, 'regression', int(np.prod(label.shape)))
  return TaskInfo(modalities, 'multilabel', int(np.prod(label.shape)))
