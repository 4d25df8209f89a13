"""The speed benchmark runs end to end at toy sizes (a smoke test: no timing is checked)."""
import importlib.util
import json
import pathlib
import subprocess
import sys

from tests.conftest import write_tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--batch', '4', '--len_a', '3', '--len_b', '5', '--dim_a', '6', '--dim_b', '7', '--d', '8', '--heads', '2',
        '--layers', '1', '--classes', '3', '--rounds', '1', '--steps', '2', '--warmup', '1', '--torch', '0']


def _bench(*args: str) -> dict:
  result = subprocess.run([sys.executable, 'benchmarks/bench.py', *TINY, *args], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=300)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_reports_throughput_flops_and_devices_per_model():
  out = _bench('--cpu_devices', '2', '--cpu_dispatch', 'sync', '--model_devices', 'teacher=1,student=2')
  assert out['info']['jax_devices'] == 2
  assert (out['teacher']['jax_devices'], out['student']['jax_devices']) == (1, 2)
  for model in ('teacher', 'student'):
    for kind in ('train', 'infer'):
      assert out[model][f'{kind}_jax'] > 0 and out[model][f'{kind}_flops_per_step'] > 0
    assert out[model]['compile_first_step_s'] > 0
  # FLOPs count every device: the student's forward pass on two devices is the same work as on one
  # (training also repeats the replicated optimizer update on each device, which dominates at toy sizes).
  single = _bench('--models', 'student')
  assert abs(single['student']['infer_flops_per_step'] / out['student']['infer_flops_per_step'] - 1) < 0.05


def test_bench_rejects_bad_model_devices():
  result = subprocess.run([sys.executable, 'benchmarks/bench.py', *TINY, '--model_devices', 'teacher=3'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "--model_devices: bad entry 'teacher=3'" in result.stderr


def test_quartiles_of_per_round_ratios():
  spec = importlib.util.spec_from_file_location('bench', REPO / 'benchmarks' / 'bench.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == [2.0, 4.0]
  assert bench.quartiles([1.0, 2.0]) == [1.25, 1.75]
  assert bench.quartiles([1.3]) == [1.3, 1.3]


def test_distill_step_bench_times_the_three_arms(tmp_path):
  config = write_tiny_config(tmp_path, 'distill')
  result = subprocess.run([sys.executable, 'benchmarks/distill_step.py', f'--config={config}', '--steps', '2',
                           '--rounds', '2', '--warmup', '1'], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=300)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(out['steps_per_s']) == {'baseline', 'online', 'cached'}
  assert all(v > 0 for v in out['steps_per_s'].values())
  assert out['cached_over_online'] > 0 and out['info']['rounds'] == 2
  assert 'cached / online' in result.stdout
