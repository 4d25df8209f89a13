#!/usr/bin/env python3
"""Speed benchmark: mmkd_jax teacher/student train and inference steps vs the PyTorch reference.

Usage: python benchmarks/bench.py [--batch 32] [--len_a 50] [--len_b 50] [--dim_a 74] [--dim_b 35]
       [--d 64] [--heads 4] [--layers 4] [--classes 7] [--steps 30] [--rounds 5] [--torch 1]
       [--reference ../shared/bench/torch_reference.py] [--cpu_devices 1] [--host_tuning 1]

Times, at the reference's default sizes and with dropout 0:
  * the jitted train step (value_and_grad of softmax cross-entropy + optax Adam update,
    jit with donate_argnums on params/optimizer state; the model runs through
    step.data_parallel_apply, as in training) of the Teacher and the Student,
  * jitted inference (logits) of each,
as samples/s from the median step time of `--steps` steps per round after warm-up
(block_until_ready after every step). Compile + first run is reported apart.
FLOPs per step come from XLA's cost_analysis() of the compiled step.

When torch is importable (and --torch 1), the PyTorch reference (eager and torch.compile)
is timed in the same process; JAX and torch measurements alternate over `--rounds` rounds
(run sequentially, never concurrently) and the medians over rounds are reported, with the
ratios JAX/torch-eager and JAX/torch-compiled, and the median and quartiles of the per-round
ratios. Blocks are long on purpose: shorter ones measured torch slower than long ones did, which
flatters JAX (benchmarks/README.md). Prints a table and one JSON line.

The process starts with the project's host settings (mmkd_jax/runtime.py, as a training
run does): `--host_tuning 1` keeps freed malloc memory (this applies to torch in the same
process too) and, with one JAX device, runs CPU computations on the calling thread;
`--cpu_devices N` splits the CPU into N JAX devices and shards the batch over them (data
parallelism, as in training). `--host_tuning 0` is JAX's defaults.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmkd_jax import runtime  # noqa: E402
from mmkd_jax.models.student import Student  # noqa: E402
from mmkd_jax.models.teacher import Teacher  # noqa: E402
from mmkd_jax.step import data_parallel_apply  # noqa: E402

DEFAULT_REFERENCE = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'bench' / 'torch_reference.py'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in [('batch', 32), ('len_a', 50), ('len_b', 50), ('dim_a', 74), ('dim_b', 35),
                        ('d', 64), ('heads', 4), ('layers', 4), ('classes', 7), ('steps', 30),
                        ('rounds', 5), ('warmup', 5)]:
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--torch', type=int, default=1, help='also time the PyTorch reference when importable')
  p.add_argument('--compile', type=int, default=1, help='also time torch.compile (with --torch 1)')
  p.add_argument('--reference', default=str(DEFAULT_REFERENCE))
  p.add_argument('--torch_device', default='cpu', help="where the reference runs ('cpu' or 'cuda'); "
                 'JAX runs on its default backend')
  p.add_argument('--models', default='teacher,student')
  p.add_argument('--cpu_devices', type=int, default=1,
                 help='JAX CPU devices the batch is sharded over (config.host.cpu_devices)')
  p.add_argument('--host_tuning', type=int, default=1,
                 help="config.host.cpu_dispatch='auto' + keep_freed_memory, as training runs do (0: JAX defaults)")
  p.add_argument('--cpu_dispatch', default='', choices=('', 'auto', 'sync', 'async'),
                 help="override config.host.cpu_dispatch ('' = what --host_tuning implies)")
  p.add_argument('--kernels', default='auto', choices=('auto', 'cpu', 'flax'),
                 help="the models' layers (config.train.kernels): the CPU kernels or Flax's")
  p.add_argument('--model_devices', default='',
                 help="devices per model, e.g. 'teacher=1,student=2' (default: all for every model)")
  return p.parse_args(argv)


def parse_model_devices(spec):
  """'teacher=1,student=2' -> {'teacher': 1, 'student': 2}, each at most the device count."""
  out = {}
  for item in filter(None, spec.split(',')):
    name, _, count = item.partition('=')
    if name not in ('teacher', 'student') or not count.isdigit() or not 1 <= int(count) <= jax.device_count():
      raise SystemExit(f'--model_devices: bad entry {item!r}; expected teacher=N or student=N with '
                       f'1 <= N <= {jax.device_count()} (the --cpu_devices)')
    out[name] = int(count)
  return out


def step_times(fn, steps, warmup):
  """Per-step wall times (s) of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


# ----------------------------------------------------------------------------------------- JAX

def jax_batch(a, rng):
  return {'a': jnp.asarray(rng.standard_normal((a.batch, a.len_a, a.dim_a)), jnp.float32),
          'b': jnp.asarray(rng.standard_normal((a.batch, a.len_b, a.dim_b)), jnp.float32),
          'a_mask': jnp.ones((a.batch, a.len_a), bool), 'b_mask': jnp.ones((a.batch, a.len_b), bool)}


def jax_model(name, a):
  if name == 'teacher':
    return Teacher(('a', 'b'), a.classes, width=a.d, num_heads=a.heads, num_cross_layers=a.layers,
                   num_self_layers=0, dropout_rate=0.0, kernels=a.kernels)
  return Student('a', a.classes, width=a.d, num_heads=a.heads, num_layers=a.layers, dropout_rate=0.0,
                 kernels=a.kernels)


class JaxCase:
  """Jitted train step and inference of one model, with its compile time and FLOPs."""

  def __init__(self, name, a, num_devices=0):
    self.model = model = jax_model(name, a)
    rng = np.random.default_rng(0)
    self.batch = batch = jax_batch(a, rng)
    self.labels = labels = jnp.asarray(rng.integers(0, a.classes, a.batch), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), batch)['params']
    # Data parallelism as in training: batch split on 'data' over the devices, parameters replicated.
    mesh = Mesh(np.array(jax.devices()[:num_devices or None]), ('data',))
    self.num_devices = mesh.size
    self.batch = batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))
    self.labels = labels = jax.device_put(labels, NamedSharding(mesh, PartitionSpec('data')))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    self.num_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adam(1e-3)

    apply = data_parallel_apply(model, mesh)  # as training runs it: one gradient all-reduce

    def loss_fn(p, batch, labels):
      logits, _ = apply(p, batch, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(p, opt_state, batch, labels):
      loss, grads = jax.value_and_grad(loss_fn)(p, batch, labels)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    def infer(p, batch):
      return model.apply({'params': p}, batch)[0]

    self.state = (params, tx.init(params))

    # compile + first run, measured apart (tracing, lowering, XLA compile, one run); each program is
    # compiled once and its executable both timed and asked for its FLOPs
    t = time.perf_counter()
    self.train_compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*self.state, batch, labels).compile()
    p, o, loss = self.train_compiled(*self.state, batch, labels)
    loss.block_until_ready()
    self.train_first_s = time.perf_counter() - t
    self.state = (p, o)
    t = time.perf_counter()
    self.infer_compiled = jax.jit(infer).lower(p, batch).compile()
    self.infer_compiled(p, batch).block_until_ready()
    self.infer_first_s = time.perf_counter() - t

    self.train_flops = flops_of(self.train_compiled, self.num_devices)
    self.infer_flops = flops_of(self.infer_compiled, self.num_devices)

  def train(self):
    p, o, loss = self.train_compiled(*self.state, self.batch, self.labels)
    loss.block_until_ready()
    self.state = (p, o)

  def infer(self):
    self.infer_compiled(self.state[0], self.batch).block_until_ready()


def flops_of(compiled, num_devices):
  """FLOPs of one call of `compiled` over its `num_devices` devices, from XLA's cost analysis (None if
  unavailable).

  The analysis is of the per-device SPMD program, so it is multiplied by the device count.
  """
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost['flops']) * num_devices
  except Exception:  # pragma: no cover - backend without cost analysis
    return None


# --------------------------------------------------------------------------------------- torch

class TorchCase:
  """The reference's train step (Adam, cross-entropy) and inference, eager or torch.compile'd."""

  def __init__(self, ref, torch, name, a, compiled):
    torch.manual_seed(0)
    self.torch = torch
    device = torch.device(a.torch_device)
    self.sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    self.xa = torch.randn(a.batch, a.len_a, a.dim_a).to(device)
    self.xb = torch.randn(a.batch, a.len_b, a.dim_b).to(device)
    self.y = torch.randint(0, a.classes, (a.batch,)).to(device)
    model = (ref.Teacher if name == 'teacher' else ref.Student)(a).to(device)
    self.num_params = sum(q.numel() for q in model.parameters())
    self.opt = torch.optim.Adam(model.parameters(), 1e-3)
    self.model = torch.compile(model) if compiled else model
    t = time.perf_counter()
    self.train()
    self.train_first_s = time.perf_counter() - t
    t = time.perf_counter()
    self.infer()
    self.infer_first_s = time.perf_counter() - t

  def train(self):
    self.opt.zero_grad()
    loss = self.torch.nn.functional.cross_entropy(self.model(self.xa, self.xb), self.y)
    loss.backward()
    self.opt.step()
    self.sync()

  def infer(self):
    with self.torch.inference_mode():
      self.model(self.xa, self.xb)
    self.sync()


def load_reference(path):
  spec = importlib.util.spec_from_file_location('torch_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------- main

def main(argv=None):
  a = parse_args(argv)
  runtime.configure_host(ml_collections.ConfigDict(
      {'host': {'cpu_devices': a.cpu_devices,
                'cpu_dispatch': a.cpu_dispatch or ('auto' if a.host_tuning else 'async'),
                'keep_freed_memory': bool(a.host_tuning),
                # Compile times are measured cold, never loaded from a cache.
                'compilation_cache_dir': ''}}))
  models = [m for m in a.models.split(',') if m]
  torch = ref = None
  if a.torch:
    try:
      import torch  # noqa: F401
      ref = load_reference(a.reference)
    except (ImportError, FileNotFoundError) as e:
      print(f'# torch reference unavailable ({e}); timing JAX only', file=sys.stderr)
      torch = ref = None

  info = {'date': time.strftime('%Y-%m-%d %H:%M'), 'machine': platform.processor() or platform.machine(),
          'cpus': os.cpu_count(), 'python': platform.python_version(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'jax_devices': jax.device_count(), 'jax_device_kind': jax.devices()[0].device_kind,
          'host_tuning': bool(a.host_tuning), 'kernels': a.kernels,
          'batch': a.batch, 'steps': a.steps, 'rounds': a.rounds,
          'loadavg_1m_start': round(os.getloadavg()[0], 2)}
  if torch is not None:
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_device=a.torch_device)

  cases = {}  # (model, impl) -> case
  model_devices = parse_model_devices(a.model_devices)
  for m in models:
    cases[m, 'jax'] = JaxCase(m, a, num_devices=model_devices.get(m, 0))
    if torch is not None:
      cases[m, 'torch_eager'] = TorchCase(ref, torch, m, a, compiled=False)
      if a.compile:
        cases[m, 'torch_compiled'] = TorchCase(ref, torch, m, a, compiled=True)

  # Interleave: every round times each (model, impl, kind) once, sequentially.
  medians = {}  # (model, impl, kind) -> list of per-round median step times
  for r in range(a.rounds):
    for m in models:
      for kind in ('train', 'infer'):
        for impl in ('jax', 'torch_eager', 'torch_compiled'):
          case = cases.get((m, impl))
          if case is None:
            continue
          times = step_times(getattr(case, kind), a.steps, a.warmup)
          medians.setdefault((m, impl, kind), []).append(statistics.median(times))

  info['loadavg_1m_end'] = round(os.getloadavg()[0], 2)
  if max(info['loadavg_1m_start'], info['loadavg_1m_end']) > (os.cpu_count() or 1):
    print(f"# WARNING: load average {info['loadavg_1m_start']}/{info['loadavg_1m_end']} exceeds {os.cpu_count()} CPUs: "
          'other processes share the cores; multi-threaded torch suffers more from this than XLA, '
          'so ratios are inflated in JAX\'s favour', file=sys.stderr)
  result = {'info': info}
  for m in models:
    jc = cases[m, 'jax']
    res = {'jax_devices': jc.num_devices, 'params_jax': int(jc.num_params),
           'compile_first_step_s': round(jc.train_first_s, 2),
           'compile_first_infer_s': round(jc.infer_first_s, 2),
           'train_flops_per_step': jc.train_flops, 'infer_flops_per_step': jc.infer_flops,
           'flops_source': 'xla cost_analysis'}
    if (m, 'torch_eager') in cases:
      res['params_torch'] = int(cases[m, 'torch_eager'].num_params)
    for kind in ('train', 'infer'):
      for impl in ('jax', 'torch_eager', 'torch_compiled'):
        if (m, impl, kind) in medians:
          per_round = [a.batch / t for t in medians[m, impl, kind]]
          res[f'{kind}_{impl}'] = round(a.batch / statistics.median(medians[m, impl, kind]), 1)
          res[f'{kind}_{impl}_rounds'] = [round(x, 1) for x in per_round]
      flops = jc.train_flops if kind == 'train' else jc.infer_flops
      if flops:
        res[f'{kind}_jax_gflops_per_s'] = round(flops * res[f'{kind}_jax'] / a.batch / 1e9, 1)
      for impl in ('torch_eager', 'torch_compiled'):
        if f'{kind}_{impl}' in res:
          res[f'{kind}_ratio_vs_{impl}'] = round(res[f'{kind}_jax'] / res[f'{kind}_{impl}'], 3)
          # per-round ratios (same round = same machine load) and their median
          rr = [j / t for j, t in zip(res[f'{kind}_jax_rounds'], res[f'{kind}_{impl}_rounds'])]
          res[f'{kind}_ratio_vs_{impl}_per_round_median'] = round(statistics.median(rr), 3)
          res[f'{kind}_ratio_vs_{impl}_per_round_quartiles'] = [round(q, 3) for q in quartiles(rr)]
    if (m, 'torch_compiled') in cases:
      res['torch_compile_first_step_s'] = round(cases[m, 'torch_compiled'].train_first_s, 2)
    result[m] = res

  print_table(result, models)
  print(json.dumps(result))


def quartiles(values):
  """First and third quartiles of `values` (both the value itself when there is one)."""
  if len(values) < 2:
    return [values[0], values[0]]
  q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive')
  return [q1, q3]


def print_table(result, models):
  info = result['info']
  print(f"# load average (1 min) at start/end: {info['loadavg_1m_start']}/{info['loadavg_1m_end']}")
  print(f"# {info['date']}  {info['machine']} x{info['cpus']}  python {info['python']}  jax {info['jax']}"
        + (f"  torch {info['torch']} ({info['torch_threads']} threads)" if 'torch' in info else '')
        + f"  batch {info['batch']}, {info['rounds']} rounds x {info['steps']} steps"
        + f"  JAX devices {info['jax_devices']}, host tuning {'on' if info['host_tuning'] else 'off'}")
  cols = ['model', 'kind', 'jax/s', 'eager/s', 'compiled/s', 'jax/eager', 'jax/compiled', 'GFLOP/step', 'GFLOP/s']
  print(' | '.join(f'{c:>12}' for c in cols))
  for m in models:
    r = result[m]
    for kind in ('train', 'infer'):
      flops = r[f'{kind}_flops_per_step']
      row = [m, kind, r.get(f'{kind}_jax'), r.get(f'{kind}_torch_eager'), r.get(f'{kind}_torch_compiled'),
             r.get(f'{kind}_ratio_vs_torch_eager'), r.get(f'{kind}_ratio_vs_torch_compiled'),
             None if flops is None else round(flops / 1e9, 2), r.get(f'{kind}_jax_gflops_per_s')]
      print(' | '.join(f'{"-" if v is None else v:>12}' for v in row))
    print(f"{m}: JAX on {r['jax_devices']} device(s), compile+first train step {r['compile_first_step_s']} s, first inference "
          f"{r['compile_first_infer_s']} s; params jax {r['params_jax']} torch {r.get('params_torch', '-')}")
    for kind in ('train', 'infer'):
      for impl in ('torch_eager', 'torch_compiled'):
        if f'{kind}_ratio_vs_{impl}_per_round_median' in r:
          q1, q3 = r[f'{kind}_ratio_vs_{impl}_per_round_quartiles']
          print(f"  {kind} jax/{impl.removeprefix('torch_')} per round: median {r[f'{kind}_ratio_vs_{impl}_per_round_median']}, "
                f'quartiles {q1}-{q3} over {len(r[f"{kind}_jax_rounds"])} rounds')


if __name__ == '__main__':
  main()
