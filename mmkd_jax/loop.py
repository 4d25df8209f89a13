"""The training loop of one arm: its seeds trained together as a population, K steps per call.

A population is one model trained from several seeds at once: parameters, optimizer state,
guard, dropout RNG and data order each have a leading member axis, and `jax.vmap` adds that
axis to the step written for one member (mmkd_jax/step.py). Member i is its seed's own run:
its initialisation, data order (`pipeline.global_rows`) and dropout (`fold_in(rng, step)`)
are those of the run of that seed alone. The members spread over the mesh's 'member' axis.

One jitted call runs the steps up to the next boundary (at most `config.train.steps_per_call`,
a `lax.scan`) without reading anything back; logging, the non-finite guard, validation and
checkpoints happen at the boundaries (every `log_every` / `eval_every` steps and the last),
and so does the preemption decision, which every process takes together.

Run directory layout: run.json (the arm's fingerprint), checkpoints/<step> (state: the
population's train state, each member's best parameters and guard; data: each member's best
step and validation metrics), and per member a log directory (`MetricWriter`).
"""
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from mmkd_jax import checkpoint, console, data, distill, evaluate, step, writer
from mmkd_jax.data import pipeline
from mmkd_jax.errors import ConfigError

Array = Any


@dataclasses.dataclass
class RunResult:
  """What one member's finished training hands to the report."""
  params: Any  # {'model': ..., 'projector': ...} at the best validation step
  model: nn.Module
  validation: dict[str, float]
  test: dict[str, float]
  num_params: int
  stopped_at: int | None = None  # the step whose non-finite loss or gradient stopped this member


class Preemption:
  """SIGTERM as a decision every process takes at the same step.

  The handler only sets this process's flag; `agreed()`, called by every process at each call
  boundary, reduces the flags over processes, so all of them save the same step and exit
  together (a process that saw no signal yet follows the others). Only installed on the main thread.
  """

  def __enter__(self) -> 'Preemption':
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process has been sent SIGTERM (a collective when there are several)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

  def exit(self) -> None:
    """Ends the process by SIGTERM, as if the signal had arrived unhandled (what schedulers expect)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def stack(trees: Sequence[Any]) -> Any:
  """The member axis: `trees` (one per member, equal structure) stacked leaf by leaf."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def put(tree: Any, sharding: NamedSharding) -> Any:
  """`tree` as global arrays laid out by `sharding`: its process-local leaves (every process holds
  the same) and its global ones (resharded)."""
  def put_leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put_leaf, tree)


def to_host(tree: Any) -> Any:
  """`tree`'s global arrays as NumPy arrays, on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def member(tree: Any, index: int) -> Any:
  return jax.tree.map(lambda x: x[index], tree)


class TrainBatches:
  """The members' training batches, K steps at a time: (K, members, global batch, ...) arrays.

  Member i's batch of step s holds the rows `pipeline.global_rows` gives its seed, the global
  batch `pipeline.train_iterator` splits over processes. With `resident`, the split lives on
  the devices and batches are gathered there by index; otherwise each process gathers the
  rows of its own devices' shards on the host.
  """

  def __init__(self, arrays: pipeline.Batch, seeds: Sequence[int], global_batch: int, mesh: Mesh, resident: bool):
    self.arrays, self.seeds, self.global_batch = arrays, tuple(seeds), global_batch
    self.num_rows = len(arrays['label'])
    self.sharding = NamedSharding(mesh, PartitionSpec(None, 'member', 'data'))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.on_device = ({k: jax.make_array_from_callback(v.shape, replicated, lambda index, v=v: v[index])
                       for k, v in arrays.items()} if resident else None)

  def rows(self, first_step: int, count: int) -> np.ndarray:
    """(count, members, global batch) row indices of steps first_step.. (1-based train steps)."""
    return np.stack([np.stack([pipeline.global_rows(self.num_rows, self.global_batch, seed, s - 1)
                               for seed in self.seeds]) for s in range(first_step, first_step + count)])

  def fetch(self, first_step: int, count: int) -> dict[str, Array]:
    rows = self.rows(first_step, count)
    if self.on_device is not None:
      return gather(self.on_device, jnp.asarray(rows), out_sharding=self.sharding)
    return {key: jax.make_array_from_callback(rows.shape + value.shape[1:], self.sharding,
                                              lambda index, value=value: value[rows[index[:3]]][(...,) + index[3:]])
            for key, value in self.arrays.items()}


@functools.partial(jax.jit, static_argnames=('out_sharding',))
def gather(arrays: dict[str, Array], rows: Array, *, out_sharding: NamedSharding) -> dict[str, Array]:
  return jax.lax.with_sharding_constraint({key: value[rows] for key, value in arrays.items()}, out_sharding)


def new_guard(members: int) -> dict[str, Array]:
  """Per member: stopped by a non-finite step (skip_nonfinite False), at which step, and steps skipped."""
  return {'stopped': jnp.zeros(members, bool), 'stopped_at': jnp.zeros(members, jnp.int32),
          'skipped': jnp.zeros(members, jnp.int32)}


def guarded_step(model: nn.Module, task: str, dist: step.Distillation | None, mesh: Mesh,
                 skip_nonfinite: bool) -> Callable:
  """`step.make_train_step`'s step for one member with its non-finite guard.

  `(state, guard), batch, rng (key data), teacher_params -> (state, guard), values`: a non-finite step is
  never applied (the step itself sees to that); without `skip_nonfinite` it also stops the
  member, whose parameters stay as they were from then on while its step count goes on.
  `values` are the step's metrics plus 'counted' (1 where the step was applied).
  """
  train_step = step.make_train_step(model, task, dist, mesh)

  def member_step(carry, batch, rng, teacher_params):
    state, guard = carry
    updated, metrics = train_step(state, batch, jax.random.wrap_key_data(rng), teacher_params)
    bad = metrics['nonfinite'].compute() > 0
    applied = ~bad & ~guard['stopped']
    state = jax.tree.map(lambda new, old: jnp.where(guard['stopped'], old, new), updated,
                         state.replace(step=updated.step))
    guard = {'skipped': guard['skipped'] + (bad & ~guard['stopped']).astype(jnp.int32),
             'stopped': guard['stopped'] | (bad & (not skip_nonfinite)),
             'stopped_at': jnp.where(bad & ~guard['stopped'] & (not skip_nonfinite), updated.step, guard['stopped_at'])}
    values = {name: metric.compute() for name, metric in metrics.items()}
    return (state, guard), {**values, 'counted': applied.astype(jnp.float32)}

  return member_step


@functools.partial(jax.jit, static_argnames=('model', 'task', 'dist', 'mesh', 'skip_nonfinite'), donate_argnums=0)
def train_steps(carry: tuple[Any, dict], batches: dict, rngs: Array, teacher_params: Any, *, model: nn.Module,
                task: str, dist: step.Distillation | None, mesh: Mesh,
                skip_nonfinite: bool) -> tuple[tuple[Any, dict], dict[str, Array]]:
  """K steps of every member in one program: a scan over the batches' leading axis of the vmapped
  `guarded_step`. Returns the carry and each step's values, (K, members) arrays left on the device.

  Jitted with its setup as static arguments: other arms of equal models reuse the compiled program.
  """
  member_step = jax.vmap(guarded_step(model, task, dist, mesh, skip_nonfinite), in_axes=(0, 0, 0, None),
                         spmd_axis_name='member' if mesh.shape['member'] > 1 else None)
  return jax.lax.scan(lambda c, batch: member_step(c, batch, rngs, teacher_params), carry, batches)


@functools.partial(jax.jit, static_argnames=('model', 'out_sharding'))
def predict_members(params: Any, batch: dict, *, model: nn.Module, out_sharding: NamedSharding) -> Array:
  """Every member's outputs on `batch` (members, batch, ...), replicated (every process reads them whole)."""
  outputs = jax.vmap(lambda p: model.apply({'params': p['model']}, batch)[0])(params)
  return jax.lax.with_sharding_constraint(outputs, out_sharding)


@jax.jit
def keep_best(best: Any, params: Any, better: Array) -> Any:
  """`best` with the members where `better` replaced by their current `params`."""
  return jax.tree.map(lambda b, p: jnp.where(better.reshape((-1,) + (1,) * (p.ndim - 1)), p, b), best, params)


def call_end(step_now: int, config: ml_collections.ConfigDict, num_steps: int) -> int:
  """The last step of the call that starts after `step_now`: at most steps_per_call steps, ending on
  the next log or eval boundary or the last step. A function of `step_now` alone, so a resumed run
  calls exactly as the uninterrupted one did."""
  train = config.train
  next_multiple = lambda every: (step_now // every + 1) * every
  return min(step_now + train.steps_per_call, next_multiple(train.log_every), next_multiple(train.eval_every),
             num_steps)


def run_label(run_dir: str, role: str) -> str:
  """The run's name in progress lines: '<arm>/seed_<s>' for a seed's run, else the role."""
  parent, base = os.path.split(os.path.normpath(run_dir))
  return f'{os.path.basename(parent)}/{base}' if base.startswith('seed_') else role


def window_means(windows: list[dict[str, Array]]) -> tuple[list[dict[str, float] | None], dict[str, np.ndarray]]:
  """Per member, the mean of each value over the steps of `windows` that were applied (None where
  none was), and the values of every step, (steps, members) arrays."""
  windows = to_host(windows)
  values = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
  counted = values.pop('counted')
  means = []
  for i in range(counted.shape[1]):
    keep = counted[:, i] > 0
    means.append({k: float(v[keep, i].mean()) for k, v in values.items() if k != 'nonfinite'} if keep.any()
                 else None)
  return means, values


def nonfinite_names(values: dict[str, np.ndarray], index: int, i: int) -> str:
  """The non-finite values of member `index` at step `i` of a window: the loss and its terms first
  (jit returns dicts with sorted keys), then the norms."""
  bad = (k for k, v in values.items() if not np.isfinite(v[index, i]))
  return ', '.join(sorted(bad, key=lambda k: (k not in ('loss', 'task_loss') and not k.startswith('distill_'),
                                              k != 'loss', k != 'task_loss', k)))


@dataclasses.dataclass
class Arm:
  """One arm's training as the loop needs it: models, data, the population's arrays, bookkeeping."""
  config: ml_collections.ConfigDict
  names: list[str]  # per member, for progress lines
  model: nn.Module
  task: str
  dist: step.Distillation | None
  mesh: Mesh
  modalities: list[str]  # of the training batches with the teacher run online
  carry: tuple[Any, dict]  # (train state, guard), member axis first
  best: Any  # each member's parameters at its best validation step
  best_step: list[int]
  best_validation: list[dict[str, float] | None]
  rngs: Array
  teacher_params: Any
  batches: TrainBatches | None
  eval_split: Callable[[str, Any], list[dict[str, float]]]  # (split, params) -> each member's metrics


def train_population(arm: Arm, manager: Any, writers: list[writer.MetricWriter], num_steps: int) -> None:
  """Trains `arm` from its carry's step to `num_steps`; see the module docstring."""
  config = arm.config
  start = int(arm.carry[0].step[0])
  windows, start_time = [], time.perf_counter()
  seen = {**to_host(arm.carry[1]), 'step': start}
  step_now = start
  with Preemption() as preemption:
    while step_now < num_steps:
      end = call_end(step_now, config, num_steps)
      batches = arm.batches.fetch(step_now + 1, end - step_now)
      arm.carry, values = train_steps(arm.carry, batches, arm.rngs, arm.teacher_params, model=arm.model,
                                      task=arm.task, dist=arm.dist, mesh=arm.mesh,
                                      skip_nonfinite=config.train.skip_nonfinite)
      windows.append(values)
      step_now = end
      boundary = step_now % config.train.log_every == 0 or step_now == num_steps
      evaluate_now = step_now % config.train.eval_every == 0 or step_now == num_steps
      if boundary or evaluate_now:
        seen = _check_guard(arm, manager, step_now, windows, seen)
      if boundary:
        _log(arm, writers, windows, step_now, num_steps, (step_now - start) / (time.perf_counter() - start_time))
        windows = []
      if evaluate_now:
        _validate(arm, writers, step_now)
      stop = preemption.agreed()
      if evaluate_now or stop:
        save(arm, manager, step_now)
      if stop:
        logging.warning('[%s] SIGTERM: checkpoint saved at step %d; run the same command to resume',
                        ', '.join(arm.names), step_now)
        manager.close()
        for w in writers:
          w.close()
        preemption.exit()


def _check_guard(arm: Arm, manager: Any, step_now: int, windows: list, seen: dict) -> dict:
  """Names the members that met a non-finite step since `seen` (the guard at the last look, with
  its 'step'); raises when every member has stopped. Returns the guard as seen now."""
  guard = {**to_host(arm.carry[1]), 'step': step_now}
  new = [i for i in range(len(arm.names)) if (guard['stopped'][i] and not seen['stopped'][i])
         or guard['skipped'][i] > seen['skipped'][i]]
  if not new:
    return guard
  values = window_means(windows)[1]
  first_step = step_now - len(values['loss']) + 1  # of the window
  message = ''
  for i in new:
    bad = [s for s in range(max(seen['step'] + 1, first_step), step_now + 1) if values['nonfinite'][s - first_step, i]]
    at = int(guard['stopped_at'][i]) if guard['stopped'][i] else bad[0]
    message = f'[{arm.names[i]}] non-finite {nonfinite_names(values, at - first_step, i)} at step {at};'
    if guard['stopped'][i]:
      logging.warning('%s the update was not applied and this member stopped%s', message,
                      '' if guard['stopped'].all() else '; the others go on')
    else:
      logging.warning('%s skipped (%d skipped so far)', message, guard['skipped'][i])
  if guard['stopped'].all():
    manager.wait_until_finished()
    latest = manager.latest_step()
    raise FloatingPointError(
        f'{message} the update was not applied and training stopped; '
        + (f'last good checkpoint: step {latest} in {manager.directory}' if latest is not None
           else 'no checkpoint was saved before it'))
  return guard


def population_label(names: Sequence[str]) -> str:
  """One name for a population's progress lines: 'student/seed_{0,1,2}' for members 'student/seed_0', ..."""
  if len(names) == 1:
    return names[0]
  prefix = os.path.commonprefix(list(names))
  prefix = prefix[:prefix.rfind('seed_') + len('seed_')] if 'seed_' in prefix else ''
  return f"{prefix}{{{','.join(n[len(prefix):] for n in names)}}}"


def _progress_line(name: str, values: dict[str, float], dist: bool, step_now: int, num_steps: int, rate: float) -> str:
  return (f'[{name}] step {step_now}/{num_steps} loss {values["loss"]:.4f}'
          + (f' (task {values["task_loss"]:.4f})' if dist else '')
          + (f' acc {values["accuracy"]:.3f}' if 'accuracy' in values else '')
          + f' | {rate:.1f} steps/s | ETA {console.format_eta((num_steps - step_now) / rate)}')


def _log(arm: Arm, writers: list, windows: list, step_now: int, num_steps: int, rate: float) -> None:
  """Each member's window means to its writer (and, with --verbosity=1, the log); one console line
  for the population: the means over its members still training."""
  means, _ = window_means(windows)
  skipped = to_host(arm.carry[1]['skipped'])
  active = []
  for name, values, w, count in zip(arm.names, means, writers, skipped):
    if values is None:  # stopped before this window
      continue
    values['skipped_steps'] = int(count)
    active.append(values)
    if len(arm.names) > 1:
      logging.vlog(1, '%s', _progress_line(name, values, arm.dist is not None, step_now, num_steps, rate))
    w.write_train(step_now, values)
  if active:
    mean = {k: float(np.mean([v[k] for v in active])) for k in active[0]}
    label = population_label(arm.names) + (f' ({len(active)} of {len(arm.names)} training)'
                                            if len(active) < len(arm.names) else '')
    logging.info('%s', _progress_line(label, mean, arm.dist is not None, step_now, num_steps, rate))


def _validate(arm: Arm, writers: list, step_now: int) -> None:
  """Evaluates every member on the validation split and keeps each one's best parameters."""
  per_member = arm.eval_split('validation', arm.carry[0].params)
  better = []
  for i, values in enumerate(per_member):
    writers[i].write_validation(step_now, values)
    best = arm.best_validation[i]
    better.append(best is None or evaluate.score(arm.task, values) > evaluate.score(arm.task, best))
    if better[-1]:
      arm.best_step[i], arm.best_validation[i] = step_now, values
  arm.best = keep_best(arm.best, arm.carry[0].params, jnp.asarray(better))


def save(arm: Arm, manager: Any, step_now: int) -> None:
  checkpoint.save(manager, step_now, {'train': arm.carry[0], 'guard': arm.carry[1], 'best': arm.best},
                  {'best_step': arm.best_step, 'best_validation': arm.best_validation})


def restore(arm: Arm, manager: Any, step_now: int) -> None:
  """`arm` as saved at `step_now`."""
  target = {'train': arm.carry[0], 'guard': arm.carry[1], 'best': arm.best}
  state, saved = checkpoint.restore(manager, step_now, target)
  arm.carry, arm.best = (state['train'], state['guard']), state['best']
  arm.best_step, arm.best_validation = list(saved['best_step']), list(saved['best_validation'])


def build_arm(config: ml_collections.ConfigDict, role: str, seeds: Sequence[int], builder: Any,
              info: data.TaskInfo, names: Sequence[str], teacher: tuple[nn.Module, Any] | None = None,
              terms: tuple[distill.Term, ...] = ()) -> Arm:
  """The population of `seeds` at step 0: each member initialised as its seed's own run, on the
  mesh; `teacher` = (module, params) and `terms` distill it; `names` label the members' progress lines."""
  mesh = step.create_mesh(config, len(seeds))
  for key in ('batch_size', 'eval_batch_size'):
    if config.train[key] % mesh.shape['data']:
      raise ConfigError(f"config.train.{key}={config.train[key]} is not divisible by the "
                        f"{mesh.shape['data']} devices of the data axis (all processes)")
  replicated = NamedSharding(mesh, PartitionSpec())
  model = step.create_model(config, info, role)
  modalities = step.batch_modalities(model, teacher[0] if teacher is not None else None)
  states, rngs = [], []
  for seed in seeds:
    init_rng, projector_rng, step_rng = jax.random.split(jax.random.key(seed), 3)
    state, dist = step.create_train_state(config, model, info, modalities, (init_rng, projector_rng), teacher, terms)
    states.append(state)
    rngs.append(step_rng)
  state = put(stack(states), NamedSharding(mesh, PartitionSpec('member')))
  return Arm(config, list(names), model, info.task, dist, mesh, modalities,
             (state, put(new_guard(len(seeds)), replicated)), jax.tree.map(jnp.copy, state.params),
             [0] * len(seeds), [None] * len(seeds), put(jax.random.key_data(jnp.stack(rngs)), replicated),
             put(teacher[1], replicated) if teacher else None, None,
             functools.partial(evaluate_members, builder, info, model, mesh, config.train.eval_batch_size))


def run_arm(config: ml_collections.ConfigDict, role: str, run_dir: str, seeds: Sequence[int], builder: Any,
            info: data.TaskInfo, log_dirs: Sequence[str], teacher: tuple[nn.Module, Any] | None = None,
            terms: tuple[distill.Term, ...] = (), restore_only: bool = False) -> list[RunResult]:
  """Trains the population of `seeds` in `run_dir` (resuming its checkpoint) and evaluates each member.

  With `teacher` = (module, params) and `terms`, the members are distilled from the teacher.
  With `restore_only`, a finished run is restored and evaluated, never trained or written to.
  Member i logs to `log_dirs[i]`.
  """
  arm = build_arm(config, role, seeds, builder, info, [run_label(d, role) for d in log_dirs], teacher, terms)
  manager = checkpoint.create_manager(os.path.join(run_dir, 'checkpoints'))
  if manager.latest_step() is not None:
    restore(arm, manager, manager.latest_step())
  start = int(arm.carry[0].step[0])
  if restore_only or start >= config.train.num_steps:
    logging.info('%s: finished run restored at step %d', run_dir, start)
  else:
    if start:
      logging.info('%s: resumed at step %d', run_dir, start)
    arm.batches = train_batches(arm, builder, info, seeds)
    writers = [writer.MetricWriter(d, start) for d in log_dirs]
    train_population(arm, manager, writers, config.train.num_steps)
    for w in writers:
      w.close()
  manager.close()
  return results(arm)


def train_batches(arm: Arm, builder: Any, info: data.TaskInfo, seeds: Sequence[int]) -> TrainBatches:
  """The arm's training data: with `config.distill.cache_teacher`, the batches carry the teacher's
  targets (and the arm's Distillation reads them) instead of its input modalities."""
  config, row_fields, modalities = arm.config, None, arm.modalities
  if arm.dist is not None and config.distill.cache_teacher and distill.cacheable(arm.dist.terms):
    cached = step.teacher_targets(arm.model, arm.dist, member(arm.carry[0], 0).params['model'], arm.teacher_params,
                                  builder, info, config.train.eval_batch_size, arm.mesh,
                                  config.distill.cache_teacher_max_gb)
    if cached is not None:
      (arm.dist, row_fields), modalities = cached, step.batch_modalities(arm.model)
  arrays = pipeline.train_arrays(builder, modalities, row_fields=row_fields)
  size_mb = sum(v.nbytes for v in arrays.values()) / 2**20
  resident = size_mb <= config.train.device_data_max_mb
  logging.vlog(1, 'training data: %.1f MiB, %s', size_mb, 'on the devices' if resident else 'gathered on the host')
  return TrainBatches(arrays, seeds, config.train.batch_size, arm.mesh, resident)


def evaluate_members(builder: Any, info: data.TaskInfo, model: nn.Module, mesh: Mesh, batch_size: int, split: str,
                     params: Any) -> list[dict[str, float]]:
  """Each member's metrics on `split` (`params` with the member axis first), in one pass over it."""
  predict = functools.partial(predict_members, model=model, out_sharding=NamedSharding(mesh, PartitionSpec()))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  outputs, labels = [], []
  for batch in pipeline.eval_batches(builder, split, step.batch_modalities(model), batch_size):
    real = batch['weight'] > 0
    outputs.append(np.asarray(predict(params, step.shard_global_batch(batch, sharding)))[:, real])
    labels.append(batch['label'][real])
  outputs, labels = np.concatenate(outputs, axis=1), np.concatenate(labels)
  return [evaluate.compute_metrics(info.task, o, labels) for o in outputs]


def results(arm: Arm) -> list[RunResult]:
  """Each member's best parameters, their validation metrics and its test metrics."""
  test = arm.eval_split('test', arm.best)
  guard = to_host(arm.carry[1])
  num_params = step.count_params(member(arm.best, 0)['model'])
  runs = []
  for i, name in enumerate(arm.names):
    logging.info('[%s] best validation step %d: %s; test: %s', name, arm.best_step[i],
                 {k: round(v, 4) for k, v in arm.best_validation[i].items()}, {k: round(v, 4) for k, v in test[i].items()})
    runs.append(RunResult(member(arm.best, i), arm.model, arm.best_validation[i], test[i], num_params,
                          int(guard['stopped_at'][i]) if guard['stopped'][i] else None))
  return runs
