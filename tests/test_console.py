"""The main job's console: its own lines by default, the full log with --verbosity=1."""
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import write_tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _main(config: str, workdir: pathlib.Path, *extra: str) -> list[str]:
  done = subprocess.run([sys.executable, '-m', 'mmkd_jax.main', f'--config={config}', f'--workdir={workdir}',
                         '--config.job=distill', '--config.report.seeds=0,1', *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  return (done.stdout + done.stderr).splitlines()


@pytest.mark.slow
def test_default_console_has_the_jobs_lines_only_and_verbosity_gives_the_full_log(tmp_path):
  config = write_tiny_config(tmp_path, job='distill', num_steps=6, log_every=3)
  lines = _main(config, tmp_path / 'quiet')
  assert lines[0].startswith('preparing dataset synthetic in ')
  for run in ('teacher', 'student/seed_{0,1}', 'distilled/seed_{0,1}'):  # one line per population
    progress = [line for line in lines if re.fullmatch(rf'\[{re.escape(run)}\] step [36]/6 loss .* steps/s \| '
                                                       r'ETA \d+:\d\d:\d\d', line)]
    assert len(progress) == 2, (run, lines)
  assert not [line for line in lines if line.startswith('[student/seed_0] step')]
  job = [line for line in lines if line.startswith('run ')]
  assert [re.sub(r'ETA .*', 'ETA', line) for line in job] == [
      'run 1/3: teacher (m0,m1) | job ETA', 'run 2/3: baseline students (m0; seeds 0,1, one population) | job ETA',
      'run 3/3: distilled students (hidden:mse:1.0; seeds 0,1, one population) | job ETA'], lines
  assert job[0].endswith('job ETA -') and all(re.search(r'ETA \d+:\d\d:\d\d$', line) for line in job[1:])
  assert lines.index(job[1]) < lines.index(next(line for line in lines if line.startswith('[student/seed_{0,1}]')))
  assert lines[-1] == f'report written to {tmp_path / "quiet" / "report.md"}'
  assert not [line for line in lines if re.match(r'[IWE]\d{4} ', line) or 'libtpu' in line or '%|' in line]
  assert len(lines) <= 40

  verbose = _main(config, tmp_path / 'verbose', '--config.job=teacher', '--verbosity=1')
  assert any(re.match(r'I\d{4} .*\] \[teacher\] step 3/6 loss', line) for line in verbose)
  assert any("backend 'cpu'" in line for line in verbose)
