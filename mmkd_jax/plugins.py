"""Plug-ins: the user's own modules that register distillation methods, levels or datasets.

`config.plugins` is a comma-separated list of importable module names ('my_kd.losses') or
paths to .py files ('~/my_kd/losses.py'). `load` imports them before the config is checked
(`validation.check_config`; the command line imports them even before the config file is
read, so that `config.distill.hparams` holds a plug-in method's hyperparameters and
`--config.distill.hparams.<method>.<name>=...` can set them). What they register with
`distill.METHODS`, `distill.LEVELS` or `data.DATASETS` is then a valid choice everywhere a
built-in one is: `config.distill.terms`, `config.study.methods` ('all' included), `config.data.name`.
A module that fails to import, or registers a name that is taken, is one `ConfigError` line.
"""
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from mmkd_jax.errors import ConfigError


def _one_line(error: BaseException) -> str:
  return ' '.join(f'{type(error).__name__}: {error}'.split())


def _load_file(entry: str) -> ModuleType:
  """Imports the .py file `entry` as the module named after it (once per process)."""
  path = os.path.abspath(os.path.expanduser(entry))
  if not path.endswith('.py') or not os.path.isfile(path):
    raise ConfigError(f'config.plugins: {entry!r} is not a .py file; give paths to .py files or importable '
                      'module names, comma-separated')
  name = os.path.splitext(os.path.basename(path))[0]
  loaded = sys.modules.get(name)
  if loaded is not None:
    if os.path.abspath(getattr(loaded, '__file__', None) or '') == path:
      return loaded
    raise ConfigError(f'config.plugins: {entry!r} would be imported as {name!r}, the name of the already imported '
                      f'{getattr(loaded, "__file__", None) or "built-in module"}; rename the file')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # registered functions' __module__ names it, as for any import
  try:
    spec.loader.exec_module(module)
  except ConfigError as error:
    del sys.modules[name]
    raise ConfigError(f'config.plugins: {entry!r}: {error}') from None
  except Exception as error:  # whatever the user's module raises: one line naming it
    del sys.modules[name]
    raise ConfigError(f'config.plugins: {entry!r} failed to import: {_one_line(error)}') from None
  return module


def _load_module(entry: str) -> ModuleType:
  try:
    return importlib.import_module(entry)
  except ConfigError as error:
    raise ConfigError(f'config.plugins: {entry!r}: {error}') from None
  except ModuleNotFoundError as error:
    if error.name is not None and (entry + '.').startswith(error.name + '.'):
      raise ConfigError(f'config.plugins: no module named {entry!r} (on sys.path); give importable module names '
                        'or paths to .py files, comma-separated') from None
    raise ConfigError(f'config.plugins: {entry!r} failed to import: {_one_line(error)}') from None
  except Exception as error:  # whatever the user's module raises: one line naming it
    raise ConfigError(f'config.plugins: {entry!r} failed to import: {_one_line(error)}') from None


def load(spec: str) -> list[ModuleType]:
  """Imports every entry of `spec` (see the module docstring); an entry imported before is reused."""
  entries = [s.strip() for s in str(spec or '').split(',') if s.strip()]
  return [_load_file(e) if e.endswith('.py') or os.sep in e else _load_module(e) for e in entries]
