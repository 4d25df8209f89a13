#!/usr/bin/env python3
"""Throughput of population training: the default job's student arm trained three ways.

Usage: python benchmarks/throughput.py [--config=configs/distill.py] [--config.a.b=value ...]
       [--steps 200] [--warmup 20]

In one process, on the config's data and baseline student (task loss only):
  * sequential: seeds 0, 1, 2 one after another, each its own population of one,
  * a population of 3 (seeds 0-2) and a population of 10 (seeds 0-9), one program each,
each through the training loop (`loop.train_population`: K steps per call, the non-finite
guard, logging, one validation and checkpoint at the end) for `--steps` steps after `--warmup`
untimed ones (compilation), both rounded up to whole calls. Prints member-steps/s of each, the populations' ratios
to sequential, and the loop's efficiency: the sequential loop's steps/s divided by those of
the bare jitted step (`step.make_train_step`, one call per step on batches already on the
device, no host reads), timed in the same run. One JSON line at the end.
"""
import json
import pathlib
import sys
import tempfile
import time

from absl import app, flags
import jax
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmkd_jax import checkpoint, data, loop, runtime, step, validation, writer  # noqa: E402
from mmkd_jax.data import pipeline  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', str(pathlib.Path(__file__).resolve().parents[1] / 'configs/distill.py'),
                                'a configs/*.py file; fields as --config.a.b=v', lock_config=True)
flags.DEFINE_integer('steps', 200, 'timed steps per arm')
flags.DEFINE_integer('warmup', 20, 'untimed steps per arm before the timed ones (compilation)')


def loop_steps_per_second(config, builder, info, seeds: tuple[int, ...], directory: str) -> float:
  """Steps/s of the population of `seeds` through the training loop (each step trains every member)."""
  arm = loop.build_arm(config, 'student', seeds, builder, info, [f'seed_{s}' for s in seeds])
  arm.batches = loop.train_batches(arm, builder, info, seeds)
  manager = checkpoint.create_manager(f'{directory}/checkpoints')
  writers = [writer.MetricWriter(f'{directory}/seed_{s}', 0) for s in seeds]
  loop.train_population(arm, manager, writers, FLAGS.warmup)
  jax.block_until_ready(arm.carry)
  start = time.perf_counter()
  loop.train_population(arm, manager, writers, FLAGS.warmup + FLAGS.steps)
  jax.block_until_ready(arm.carry)
  manager.wait_until_finished()
  seconds = time.perf_counter() - start
  manager.close()
  for w in writers:
    w.close()
  return FLAGS.steps / seconds


def bare_steps_per_second(config, builder, info) -> float:
  """Steps/s of one model's jitted step called once per step on batches already on the device."""
  mesh = step.create_mesh(config)
  model = step.create_model(config, info, 'student')
  state, _ = step.create_train_state(config, model, info, [model.modality], tuple(jax.random.split(jax.random.key(0))),
                                     None, ())
  train_step = jax.jit(step.make_train_step(model, info.task, None, mesh), donate_argnums=0)
  iterator = pipeline.train_iterator(builder, [model.modality], config.train.batch_size, seed=0)
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  batches = [step.shard_local_batch(next(iterator), sharding) for _ in range(16)]
  rng = jax.random.key(0)
  for i in range(FLAGS.warmup):
    state, metrics = train_step(state, batches[i % len(batches)], rng)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(FLAGS.steps):
    state, metrics = train_step(state, batches[i % len(batches)], rng)
  jax.block_until_ready((state, metrics))
  return FLAGS.steps / (time.perf_counter() - start)


def main(argv):
  del argv
  config = FLAGS.config
  # Whole calls of steps_per_call steps only, all compiled during the warm-up; validation and
  # checkpoint once, at the end of each stretch; progress lines at its end too.
  k = config.train.steps_per_call
  FLAGS.warmup, FLAGS.steps = -(-FLAGS.warmup // k) * k, -(-FLAGS.steps // k) * k
  config.train.log_every = config.train.eval_every = FLAGS.warmup + FLAGS.steps
  validation.check_config(config)
  runtime.configure_host(config)
  checkpoint.quiet_orbax_logs()
  builder = data.load_builder(config.data)
  info = data.task_info(builder)
  with tempfile.TemporaryDirectory() as directory:
    sequential = [loop_steps_per_second(config, builder, info, (seed,), f'{directory}/seq_{seed}') for seed in range(3)]
    # Member-steps/s of the three runs one after another: 3 runs x steps over the sum of their times.
    rates = {'sequential': 3 / sum(1 / r for r in sequential)}
    for size in (3, 10):
      rates[f'population_{size}'] = size * loop_steps_per_second(config, builder, info, tuple(range(size)),
                                                                 f'{directory}/pop_{size}')
  bare = bare_steps_per_second(config, builder, info)
  result = {
      'member_steps_per_s': {k: round(v, 1) for k, v in rates.items()},
      'ratio_to_sequential': {k: round(v / rates['sequential'], 2) for k, v in rates.items() if k != 'sequential'},
      'bare_step_per_s': round(bare, 1),
      'loop_efficiency': round(rates['sequential'] / bare, 3),
      'steps': FLAGS.steps, 'steps_per_call': config.train.steps_per_call, 'batch_size': config.train.batch_size,
      'devices': jax.device_count(), 'backend': jax.default_backend(),
      'data_on_device': config.train.device_data_max_mb > 0,
  }
  for name, rate in rates.items():
    ratio = f'  ({rate / rates["sequential"]:.2f}x sequential)' if name != 'sequential' else ''
    print(f'{name:>14}: {rate:8.1f} member-steps/s{ratio}')
  print(f'bare jitted step: {bare:.1f} steps/s; loop efficiency (sequential loop / bare): '
        f'{result["loop_efficiency"]:.0%}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
