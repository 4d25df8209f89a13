"""The README's shell commands, run as a new user would type them, so that the README stays true.

Every line of a fenced `bash` block is a command (`\\` continues a line, `&&` chains commands). Install
steps and the test command are left out: CI has just run them. A training command keeps its own
overrides but gets a tiny budget (`TINY`, for the fields its config has) and a temporary workdir. A
block whose fence follows `<!-- test_readme: skip, <why> -->` is not run. Each `$ ` line of a `console`
block is run as written and must print the lines below it.
"""
import dataclasses
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / 'README.md'
SKIP = re.compile(r'<!--\s*test_readme:\s*skip\b')


def _first(value: str) -> str:
  return value.split(',')[0]


# Config fields shrunk where a command's config has them: a value, or a function of the command's value
# (else the config's). The study keeps its methods and its first level (a method that does not fit it is
# skipped with a note, as in any grid).
TINY = {'train.num_steps': '4', 'train.warmup_steps': '1', 'report.seeds': _first, 'report.latency_repeats': '2',
        'teacher.num_cross_layers': '1', 'student.num_layers': '1',  # compiling is most of a tiny run's time
        'study.seeds': _first, 'study.modalities': _first, 'study.widths': _first, 'study.levels': _first}
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Command:
  kind: str  # 'run' (exit status 0 expected) or 'console' (prints `expected`)
  argv: tuple[str, ...]
  expected: tuple[str, ...] = ()


def fenced_blocks(text: str) -> list[tuple[str, list[str], str]]:
  """(language, lines, the line before the opening fence) of each fenced block of `text`."""
  lines, blocks, i = text.splitlines(), [], 0
  while i < len(lines):
    opening = re.fullmatch(r'```(\w*)\s*', lines[i])
    if opening is None:
      i += 1
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == '```')
    blocks.append((opening.group(1), lines[i + 1:end], lines[i - 1].strip() if i else ''))
    i = end + 1
  return blocks


def split_commands(line: str) -> list[list[str]]:
  """The simple commands of one shell line, split at `&&` and `;`, comments dropped."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  commands, current = [], []
  for token in lexer:
    if token in ('&&', ';'):
      commands.append(current)
      current = []
    elif token and set(token) <= set('|&<>()'):
      raise ValueError(f'test_readme cannot run {token!r} in: {line}')
    else:
      current.append(token)
  return [c for c in commands + [current] if c]


def _is_setup(argv: list[str]) -> bool:
  """Installing, activating a virtualenv, or the test command: what CI runs before this test."""
  if argv[0] in ('.', 'source', 'pip', 'pip3'):
    return True
  return argv[0] in ('python', 'python3') and len(argv) > 2 and argv[1] == '-m' and argv[2] in ('venv', 'pip',
                                                                                                 'pytest')


def readme_commands(text: str) -> list[Command]:
  """Every command of `text`'s `bash` and `console` blocks that this test runs."""
  found = []
  for language, lines, before in fenced_blocks(text):
    if SKIP.match(before):
      continue
    if language == 'bash':
      for line in re.sub(r'\\\n', ' ', '\n'.join(lines)).splitlines():
        found += [Command('run', tuple(argv)) for argv in split_commands(line) if not _is_setup(argv)]
    elif language == 'console':
      for line in lines:
        if line.startswith('$ '):
          (argv,) = split_commands(line[2:])
          found.append(Command('console', tuple(argv)))
        elif found and found[-1].kind == 'console' and line.strip():
          found[-1] = dataclasses.replace(found[-1], expected=found[-1].expected + (line,))
  return found


def _load_config(spec: str) -> ml_collections.ConfigDict:
  path, _, argument = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('readme_config', ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, object]:
  """(whether `config` has the dotted `key`, its value)."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _flag_name(token: str) -> str:
  return token.partition('=')[0]


def prepare(argv: tuple[str, ...], workdir: pathlib.Path, shrink: bool) -> list[str]:
  """`argv` with this interpreter, its own workdir and, if `shrink`, the `TINY` budget."""
  if argv[0] not in ('python', 'python3') or len(argv) < 3 or argv[1] != '-m' or not argv[2].startswith('mmkd_jax.'):
    raise ValueError(f'test_readme has no rule to run {shlex.join(argv)!r}; mark its block '
                     '`<!-- test_readme: skip, <why> -->` or teach tests/test_readme.py to shrink it')
  args = list(argv[3:])
  for i, token in enumerate(args):  # `--flag value` -> `--flag=value`
    if token in ('--workdir', '--config') and i + 1 < len(args):
      args[i:i + 2] = [f'{token}={args[i + 1]}', '']
  args = [a for a in args if a and _flag_name(a) != '--workdir']
  if shrink:
    spec = next(a.partition('=')[2] for a in args if _flag_name(a) == '--config')
    config = _load_config(spec)
    given = {_flag_name(a): a.partition('=')[2] for a in args}
    tiny = {}
    for key, value in TINY.items():
      found, default = _lookup(config, key)
      if found:
        flag = f'--config.{key}'
        tiny[flag] = value(given.get(flag, str(default))) if callable(value) else value
    args = [a for a in args if _flag_name(a) not in tiny] + [f'{k}={v}' for k, v in tiny.items()]
  return [sys.executable, '-m', argv[2], *args, f'--workdir={workdir}']


def _command_id(command: Command) -> str:
  config = next((a.partition('=')[2] for a in command.argv if a.startswith('--config=')), '')
  return f'{command.kind}:{command.argv[2] if len(command.argv) > 2 else command.argv[0]}:{config}'


COMMANDS = readme_commands(README.read_text())


def test_parser_finds_chains_continuations_skips_and_console_output():
  text = '\n'.join([
      '```bash',
      'python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m mmkd_jax.main \\',
      "  --config=configs/distill.py --workdir=/tmp/a   # a comment",
      'python -m pytest -q',
      '```',
      '<!-- test_readme: skip, needs files -->',
      '```bash',
      'python -m mmkd_jax.main --config=configs/mosi_distill.py',
      '```',
      '```console',
      '$ python -m mmkd_jax.main --config=configs/distill.py --config.x=1',
      'mmkd_jax: error: one line',
      '```',
  ])
  assert readme_commands(text) == [
      Command('run', ('python', '-m', 'mmkd_jax.main', '--config=configs/distill.py', '--workdir=/tmp/a')),
      Command('console', ('python', '-m', 'mmkd_jax.main', '--config=configs/distill.py', '--config.x=1'),
              ('mmkd_jax: error: one line',)),
  ]


def test_prepare_replaces_budget_and_workdir_only_where_the_config_has_them(tmp_path):
  argv = ('python', '-m', 'mmkd_jax.main', '--config', 'configs/distill.py', '--workdir', '/tmp/x',
          '--config.train.num_steps=1000', '--config.report.seeds=0,1,2,3,4', '--config.student.modality=zer')
  got = prepare(argv, tmp_path, shrink=True)
  assert got[:3] == [sys.executable, '-m', 'mmkd_jax.main']
  assert got[3:] == ['--config=configs/distill.py', '--config.student.modality=zer', '--config.train.num_steps=4',
                     '--config.train.warmup_steps=1', '--config.report.seeds=0', '--config.report.latency_repeats=2',
                     '--config.teacher.num_cross_layers=1', '--config.student.num_layers=1',
                     f'--workdir={tmp_path}']  # no study.seeds: configs/distill.py has no study
  study = prepare(('python', '-m', 'mmkd_jax.study', '--config=configs/study.py', '--config.study.widths=48,16'),
                  tmp_path, shrink=True)
  assert {'--config.study.seeds=0', '--config.study.modalities=fou', '--config.study.widths=48',
          '--config.study.levels=logits'} <= set(study)
  assert not any(a.startswith('--config.study.methods') for a in study)
  with pytest.raises(ValueError, match='no rule'):
    prepare(('bash', 'launch/local_multiprocess.sh'), tmp_path, shrink=True)


def test_readme_has_runnable_commands():
  kinds = {c.kind for c in COMMANDS}
  assert kinds == {'run', 'console'}, COMMANDS
  assert any(c.argv[:3] == ('python', '-m', 'mmkd_jax.main') for c in COMMANDS if c.kind == 'run')


@pytest.fixture(scope='module')
def environment(tmp_path_factory) -> dict[str, str]:
  """This interpreter first on PATH, this checkout importable, one dataset directory for all commands."""
  env = dict(os.environ)
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH', '')) if p)
  env['TFDS_DATA_DIR'] = str(tmp_path_factory.mktemp('tfds'))
  return env


@pytest.mark.slow
@pytest.mark.parametrize('command', COMMANDS, ids=[_command_id(c) for c in COMMANDS])
def test_readme_command(command, environment, tmp_path):
  argv = prepare(command.argv, tmp_path / 'workdir', shrink=command.kind == 'run')
  result = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
  output = (result.stdout + result.stderr).splitlines()
  shown = f'{shlex.join(argv)}\n' + '\n'.join(output[-40:])
  if command.kind == 'run':
    assert result.returncode == 0, shown
  else:
    position = 0
    for line in command.expected:  # each expected line, in order, among what the command printed
      assert line in output[position:], f'missing line: {line}\n{shown}'
      position = output.index(line, position) + 1
