"""Loads pickles of NumPy arrays without letting the file run code.

`pickle.load` calls whatever callables a file names, so a pickle from the internet can
run arbitrary commands. The feature files of the MulT line of work are pickles, so we
read them with an unpickler whose `find_class` resolves only what rebuilding NumPy
arrays and builtin containers needs; any other global fails before it is called.
"""
import codecs
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from mmkd_jax.errors import ConfigError


def _latin1_encode(text: str, encoding: str = 'latin1') -> bytes:
  """`_codecs.encode` limited to latin-1: how protocol <= 2 pickles store bytes."""
  if codecs.lookup(encoding).name != 'iso8859-1':
    raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r} is not allowed')
  return text.encode('latin1')


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
  """The globals a NumPy array pickle may name, under old and new module paths."""
  # Ask NumPy which callables its own pickles use instead of importing private modules.
  reconstruct = np.zeros(1).__reduce__()[0]
  frombuffer = np.zeros(1).__reduce_ex__(5)[0]
  scalar = np.float32(0).__reduce__()[0]
  allowed: dict[tuple[str, str], Callable[..., Any]] = {
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): np.dtype,
      ('_codecs', 'encode'): _latin1_encode,
      ('builtins', 'dict'): dict,
      ('builtins', 'list'): list,
      ('builtins', 'tuple'): tuple,
      ('builtins', 'set'): set,
      ('builtins', 'frozenset'): frozenset,
  }
  # NumPy 1.x wrote `numpy.core.*`, NumPy 2.x writes `numpy._core.*`.
  for package in ('numpy.core', 'numpy._core'):
    allowed[(f'{package}.multiarray', '_reconstruct')] = reconstruct
    allowed[(f'{package}.multiarray', 'scalar')] = scalar
    allowed[(f'{package}.numeric', '_frombuffer')] = frombuffer
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that only rebuilds NumPy arrays, dtypes, scalars and containers."""

  _ALLOWED = _allowed_globals()

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f'refers to {module}.{name}, which is not allowed '
          '(only NumPy arrays and builtin containers are)') from None


def load(path: epath.PathLike) -> Any:
  """Unpickles `path` with `RestrictedUnpickler`.

  Raises a one-line `ValueError` naming the file if it is not a pickle or names a
  global outside the allow-list. Python 2 pickles are decoded as latin-1, as NumPy
  recommends for arrays written by Python 2.
  """
  path = epath.Path(path)
  with path.open('rb') as f:
    try:
      return RestrictedUnpickler(f, encoding='latin1').load()
    except Exception as e:  # A corrupt pickle can fail in many ways; report each alike.
      detail = str(e).splitlines()[0] if str(e) else ''
      raise ConfigError(f'{path.name}: cannot be loaded safely: {type(e).__name__}: {detail}') from e
