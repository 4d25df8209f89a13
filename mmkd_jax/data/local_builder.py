"""Bases for this package's TFDS builders, which are never fetched from a registry or a bucket."""
import inspect

import tensorflow_datasets as tfds
from etils import epath


class LocalCodePath:
  """Gives a builder class its own module file as `code_path`.

  tfds 4.9.10 finds a builder's module via the `importlib_resources` backport, which it does
  not install on Python >= 3.9 (tensorflow/datasets#11212); list this before the tfds base.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that does not look for precomputed metadata on TFDS's GCS bucket.

  None of this package's datasets is there, and tfds 4.9.10 makes an empty temporary
  directory for that lookup on every construction of an unprepared builder and never
  removes it.
  """

  def initialize_from_bucket(self) -> None:
    """Nothing to fetch: the metadata comes from the prepared files or the builder's code."""
