#!/usr/bin/env python3
"""Speed of the distilled train step with the teacher run online vs its targets read from the batch.

Usage: python benchmarks/distill_step.py --config=configs/distill.py [--config.a.b=value ...]
       [--steps 100] [--rounds 5] [--warmup 10]

Times three arms of the project's own train step (`step.make_train_step`, jitted) on the
config's data and models: the baseline student (task loss only), the distilled student with
the teacher run in every step (`config.distill.cache_teacher=False`) and the distilled student
reading the teacher's targets from the batch (`step.teacher_targets`, the default). The
teacher has random parameters: its values do not change the work. Each round times `--steps`
steps of every arm in turn (the batches are placed on the devices beforehand, and each step
blocks until its metrics are ready); prints steps/s (median over rounds), the per-round ratios
cached/online and cached/baseline (median over rounds) and one JSON line.
"""
import json
import pathlib
import statistics
import sys
import time

from absl import app, flags
import jax
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmkd_jax import data, distill, runtime, step, validation  # noqa: E402
from mmkd_jax.data import pipeline  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'a configs/*.py file (job distill); fields as --config.a.b=v',
                                lock_config=True)
flags.DEFINE_integer('steps', 100, 'timed steps per arm and round')
flags.DEFINE_integer('rounds', 5, 'rounds; the arms alternate within each')
flags.DEFINE_integer('warmup', 10, 'untimed steps per arm before the first round')
flags.mark_flags_as_required(['config'])

ARMS = ('baseline', 'online', 'cached')


def build_arms(config) -> dict:
  """Arm -> (jitted step, initial state, teacher params, device batches) on `config`'s data."""
  builder = data.load_builder(config.data)
  info = data.task_info(builder)
  validation.check_against_data(config, info)
  mesh = step.create_mesh(config)
  sharding, replicated = NamedSharding(mesh, PartitionSpec('data')), NamedSharding(mesh, PartitionSpec())
  teacher = step.create_model(config, info, 'teacher')
  student = step.create_model(config, info, 'student')
  modalities = step.batch_modalities(student, teacher)
  teacher_params = jax.device_put(
      step.init_params(teacher, jax.random.key(1), step.dummy_batch(info, modalities)), replicated)
  terms = distill.parse_terms(config.distill.terms)
  arms = {}
  for arm in ARMS:
    distilled = arm != 'baseline'
    state, dist = step.create_train_state(config, student, info, modalities if distilled else [student.modality],
                                           tuple(jax.random.split(jax.random.key(0))),
                                           (teacher, teacher_params) if distilled else None, terms)
    row_fields = None
    if arm == 'cached':
      dist, row_fields = step.teacher_targets(student, dist, state.params['model'], teacher_params, builder, info,
                                               config.train.eval_batch_size, mesh, float('inf'))
    arm_modalities = modalities if arm == 'online' else step.batch_modalities(student)
    iterator = pipeline.train_iterator(builder, arm_modalities, config.train.batch_size, seed=0,
                                       row_fields=row_fields)
    batches = [step.shard_local_batch(next(iterator), sharding) for _ in range(8)]
    train_step = jax.jit(step.make_train_step(student, info.task, dist, mesh), donate_argnums=0)
    arms[arm] = [train_step, jax.device_put(state, replicated), teacher_params if dist else None, batches]
  return arms


def run_steps(arm: list, count: int) -> list[float]:
  """Per-step seconds of `count` steps; the arm's state advances."""
  train_step, state, teacher_params, batches = arm
  rng, times = jax.random.key(0), []
  for i in range(count):
    start = time.perf_counter()
    state, metrics = train_step(state, batches[i % len(batches)], rng, teacher_params)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  arm[1] = state
  return times


def main(argv):
  del argv
  config = FLAGS.config
  validation.check_config(config)
  runtime.configure_host(config)
  arms = build_arms(config)
  compile_s = {}
  for name, arm in arms.items():
    compile_s[name] = run_steps(arm, 1)[0]
    run_steps(arm, FLAGS.warmup)
  rates = {name: [] for name in arms}
  for _ in range(FLAGS.rounds):
    for name, arm in arms.items():
      rates[name].append(1.0 / statistics.median(run_steps(arm, FLAGS.steps)))
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(rates[a], rates[b]))
  result = {
      'steps_per_s': {name: statistics.median(values) for name, values in rates.items()},
      'compile_first_step_s': compile_s,
      'cached_over_online': ratio('cached', 'online'),
      'cached_over_baseline': ratio('cached', 'baseline'),
      'info': {'config': {'data': config.data.name, 'terms': config.distill.terms,
                          'batch_size': config.train.batch_size}, 'devices': jax.device_count(),
               'rounds': FLAGS.rounds, 'steps': FLAGS.steps, 'jax': jax.__version__},
  }
  for name in arms:
    print(f"{name:9s} {result['steps_per_s'][name]:8.1f} steps/s   compile + first step "
          f'{compile_s[name]:5.1f} s')
  print(f"cached / online   {result['cached_over_online']:.2f}x (median of per-round ratios)")
  print(f"cached / baseline {result['cached_over_baseline']:.2f}x")
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
