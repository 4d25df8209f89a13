"""Command-line plumbing shared by `mmkd_jax.main` and `mmkd_jax.study`: bad input ends in one line.

A missing config file, an override of a key the config does not have, and `errors.ConfigError`
(config checks, registries, refused workdirs, bad data files) print `mmkd_jax: error: ...` and
exit with status 2 instead of a traceback; any other exception, the project's own internal
`ValueError`s included, is a bug or an environment fault and keeps its traceback.
"""
import contextlib
import glob
import importlib.util
import os
import sys
from typing import Callable, Iterator, NoReturn

from absl import app, flags
import ml_collections

from mmkd_jax import console, plugins
from mmkd_jax.errors import ConfigError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def fail(message: str) -> NoReturn:
  """Ends the process with the one-line error `message`."""
  sys.stderr.write(f'mmkd_jax: error: {message}\n')
  sys.exit(2)


def _config_spec(argv: list[str]) -> str | None:
  """The value given to --config (as `--config=v` or `--config v`), or None."""
  for i, token in enumerate(argv):
    if token.startswith('--config='):
      return token[len('--config='):]
    if token == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(path: str, argument: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('mmkd_jax_cli_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _missing_file(spec: str, path: str) -> str:
  found = sorted(glob.glob(os.path.join(os.path.dirname(path) or '.', '*.py')))
  return f'--config={spec!r}: no such file; config files there: {", ".join(map(os.path.basename, found)) or "none"}'


def explain_override_error(argv: list[str], path: str, argument: str) -> str | None:
  """The one-line reason a command line failed to parse where it overrides a `--config.<key>` that
  the config at `path` (`get_config(argument)`) lacks; None otherwise."""
  config = _load_config(path, argument)
  for token in argv:
    if not token.startswith('--config.'):
      continue
    key = token[len('--config.'):].partition('=')[0]
    node, prefix = config, 'config'
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = ', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else 'none'
        hint = ('; a plug-in method has its hyperparameters there once --config.plugins imports it'
                if prefix == 'config.distill.hparams' else '')
        return f'--config.{key}: {prefix} has no key {part!r} in {path}; its keys: {keys}{hint}'
      node, prefix = node[part], f'{prefix}.{part}'
  return None


def _plugins_spec(argv: list[str], path: str | None, argument: str) -> str:
  """The last `--config.plugins` of `argv`, else the `plugins` field of the config file at `path`."""
  given = [argv[i + 1] if token == '--config.plugins' and i + 1 < len(argv) else token.partition('=')[2]
           for i, token in enumerate(argv) if token.partition('=')[0] == '--config.plugins']
  if given:
    return given[-1]
  if path is None:
    return ''
  try:
    return str(_load_config(path, argument).get('plugins', ''))
  except Exception:  # a faulty config file: the flag parsing below reports it
    return ''


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with config errors in one line.

  `config.plugins` is imported first (from `--config.plugins`, else from the config file), so
  that the config file sees what they register (their methods' `config.distill.hparams`) and
  overrides of those keys parse.
  """
  spec = _config_spec(argv)
  path, _, argument = (spec or '').partition(':')
  if spec is not None and not os.path.isfile(path):
    fail(_missing_file(spec, path))
  try:
    plugins.load(_plugins_spec(argv, path if spec is not None else None, argument))
  except ConfigError as error:
    fail(str(error))
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:  # e.g. --config.train.num_steps=abc
    fail(str(_innermost_config_error(error) or error))
  except Exception:  # config_flags raises AttributeError, KeyError, ... depending on the fault
    reason = explain_override_error(argv, path, argument) if spec is not None else None
    if reason is None:
      raise
    fail(reason)


def _innermost_config_error(error: BaseException) -> ConfigError | None:
  """The ConfigError a config file's get_config raised, which config_flags wraps with its traceback."""
  found = None
  while error is not None:
    if isinstance(error, ConfigError):
      found = error
    error = error.__cause__ or error.__context__
  return found


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Turns a `ConfigError` (bad input the user fixes) into a one-line error; everything else
  propagates with its traceback."""
  try:
    yield
  except ConfigError as error:
    fail(str(error))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with the parsing above, and `main`'s ConfigErrors in one line."""
  def guarded(argv: list[str]) -> None:
    console.configure()
    with one_line_errors():
      main(argv)
  app.run(guarded, flags_parser=parse_flags)
