"""A base for this package's TFDS builders, which are never fetched from a registry."""
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
