"""docs/new_method.md, executed: its shell commands run as written, with a smaller training budget."""
import json
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGE = ROOT / 'docs' / 'new_method.md'
# Appended to every training command of the page: a few steps, one seed, one student width, one-layer
# models (compiling is most of a tiny run's time).
_TINY = ('--config.train.num_steps=2 --config.train.warmup_steps=0 --config.train.eval_every=2 '
         '--config.train.log_every=1 --config.report.latency_repeats=1 --config.teacher.num_cross_layers=1 '
         '--config.student.num_layers=1')
BUDGET = {
    'mmkd_jax.main': f'{_TINY} --config.report.seeds=0',
    'mmkd_jax.study': f'{_TINY} --config.study.seeds=0 --config.study.widths=32 --config.study.plots=',
}


def shell_blocks(text: str) -> list[str]:
  return re.findall(r'```bash\n(.*?)```', text, re.S)


def with_budget(block: str) -> str:
  """`block` with BUDGET appended to each `python -m mmkd_jax.main|study` command (continuation lines joined)."""
  lines = block.replace('\\\n', ' ').splitlines()
  out = []
  for line in lines:
    match = re.match(r'\s*python -m (mmkd_jax\.\w+)', line)
    out.append(f'{line} {BUDGET[match.group(1)]}' if match and match.group(1) in BUDGET else line)
  return '\n'.join(out) + '\n'


def test_page_has_the_walk_through():
  text = PAGE.read_text()
  blocks = shell_blocks(text)
  commands = ' '.join(blocks)
  for needed in ('cat > $HOME/my_kd/my_losses.py', 'python -m mmkd_jax.testing', 'python -m mmkd_jax.main',
                 '--config.distill.hparams.smooth_l1.delta=', 'python -m mmkd_jax.study', 'study.md',
                 '--config=configs/arrays.py', '$HOME/my_kd/own/report.md'):
    assert needed in commands, needed
  assert '\n## Your own data\n' in text and 'TODO' not in text
  assert '--config.train.num_steps=2' in with_budget(blocks[2])


@pytest.mark.slow
def test_page_commands_run_as_written(tmp_path):
  """Every shell block, in order, in one bash with HOME in a temporary directory; each must succeed."""
  script = 'set -euo pipefail\n' + ''.join(with_budget(b) for b in shell_blocks(PAGE.read_text()))
  env = {**os.environ, 'HOME': str(tmp_path), 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  env.pop('TFDS_DATA_DIR', None)  # the mfeat data is prepared under the temporary HOME
  result = subprocess.run(['bash', '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'smooth_l1: 7 checks passed' in result.stdout
  assert 'hidden:smooth_l1:1.0' in result.stdout  # report.md, printed by the page
  kd = tmp_path / 'my_kd'
  stored = json.loads((kd / 'run' / 'distilled' / 'run.json').read_text())  # the flag's delta reached the run
  assert stored['distill']['hparams'] == {'smooth_l1': {'delta': 0.5}}
  logged = json.loads((kd / 'run' / 'distilled' / 'seed_0' / 'metrics.jsonl').read_text().splitlines()[-1])
  assert 'distill_hidden_smooth_l1' in logged
  table = (kd / 'study' / 'study.md').read_text()
  assert '| distilled | fou | 32 | hidden | smooth_l1 |' in table and '| hidden | mse |' in table
  cell = json.loads((kd / 'study' / 'cells' / 'fou-w32-hidden-smooth_l1.json').read_text())
  assert cell['fingerprints']['0']['distill']['hparams'] == {'smooth_l1': {'delta': 0.5}}
  own = (kd / 'own' / 'report.md').read_text()  # your own arrays: text+audio teacher, audio student
  assert 'teacher (text + audio)' in own and 'hidden:smooth_l1:1.0' in own
  assert not (ROOT / 'my_losses.py').exists()
