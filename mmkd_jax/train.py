"""Training and evaluation jobs: teacher, baseline student, and the distillation comparison.

`train_and_evaluate(config, workdir)` runs `config.job`:
  - 'teacher': train the multimodal teacher in `workdir`.
  - 'student': train the unimodal student without distillation (the baseline).
  - 'distill': the main job: train the teacher if its checkpoint is missing, then for every
    seed in `config.report.seeds` the baseline and the distilled student with the same
    budget, evaluate all on the test split and write report.json / report.md.
"""
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
from clu import metrics as clu_metrics
import flax.linen as nn
from flax.core import FrozenDict
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax
from tensorboardX import SummaryWriter

from mmkd_jax import checkpoint, data, distill, evaluate, optimizers, reference, report, runtime, validation
from mmkd_jax.data import pipeline
from mmkd_jax.errors import ConfigError
from mmkd_jax.models import MODELS

Array = Any


@dataclasses.dataclass
class RunResult:
  """What one finished training run hands to the report."""
  params: Any  # {'model': ..., 'projector': ...} at the best validation checkpoint
  model: nn.Module
  validation: dict[str, float]
  test: dict[str, float]
  num_params: int


def create_model(config: ml_collections.ConfigDict, info: data.TaskInfo, role: str) -> nn.Module:
  """The teacher or student Flax module described by `config.<role>`."""
  section = config[role]
  common = dict(num_outputs=info.num_outputs, width=section.width, num_heads=section.num_heads,
                mlp_ratio=section.mlp_ratio, dropout_rate=section.dropout_rate,
                embedding=section.embedding, dtype=jnp.dtype(config.train.compute_dtype),
                kernels=config.train.kernels)
  if role == 'teacher':
    return MODELS.get('teacher')(modalities=validation.teacher_modalities(config), num_cross_layers=section.num_cross_layers,
                                 num_self_layers=section.num_self_layers, **common)
  return MODELS.get('student')(modality=section.modality, num_layers=section.num_layers, **common)


def batch_modalities(model: nn.Module, teacher: nn.Module | None = None) -> list[str]:
  """The input modalities of `model`'s batches: a teacher's all, a student's own, followed by the
  other modalities of a `teacher` that runs beside it in every step."""
  own = list(model.modalities) if isinstance(model, MODELS.get('teacher')) else [model.modality]
  return list(dict.fromkeys(own + (list(teacher.modalities) if teacher is not None else [])))


def dummy_batch(info: data.TaskInfo, modalities: list[str], batch_size: int = 2) -> dict[str, np.ndarray]:
  """A zero batch with the dataset's shapes, for initialisation and shape checks."""
  batch = {'weight': np.ones((batch_size,), np.float32), 'label': np.zeros((batch_size,), np.int32)}
  for m in modalities:
    length, width = info.modalities[m]
    batch[m] = np.zeros((batch_size, length, width), np.float32)
    batch[f'{m}_mask'] = np.ones((batch_size, length), bool)
  return batch


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def task_loss(task: str, outputs: Array, labels: Array, weight: Array) -> Array:
  """Cross-entropy (classification), L1 (regression) or per-label sigmoid BCE (multilabel)."""
  if task == 'classification':
    rows = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
  elif task == 'regression':
    rows = jnp.abs(outputs.reshape(labels.shape) - labels)
  else:
    rows = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, labels.astype(jnp.float32)), axis=-1)
  return jnp.sum(rows * weight) / jnp.maximum(jnp.sum(weight), 1.0)


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Everything the train step needs to distill from a frozen teacher (hashable: a static
  argument of the jitted step)."""
  teacher: nn.Module
  terms: tuple[distill.Term, ...]
  hparams: FrozenDict  # method -> keyword arguments
  layer_map: tuple[tuple[int, int], ...]
  task_weight: float
  # (tree structure, per-example shapes) of the teacher's taps when the batches carry the pairs'
  # teacher sides (`teacher_targets`, config.distill.cache_teacher); None: the step runs the teacher.
  cached_taps: tuple[Any, tuple[jax.ShapeDtypeStruct, ...]] | None = None


def data_parallel_apply(model: nn.Module, mesh: Mesh) -> Callable:
  """`model.apply` on each device's slice of the batch, with the parameters passed as one flat vector.

  The outputs and taps are per example, so they come back as the global batch, as a plain
  sharded `apply` gives them, and losses over them keep their global-batch meaning. What
  changes is the backward pass: the flat vector's gradient is summed over the 'data' axis by
  one all-reduce, where a plain sharded apply all-reduces every parameter array apart (on
  CPU one rendezvous each; benchmarks/README.md has the measurement). The batch gains
  'example_index' (position in the global batch), which keys dropout masks, so they do not
  depend on the device count. With one device on the data axis it is plain `model.apply`.
  """
  def apply(params: Any, batch: dict, *, train: bool, rngs: dict | None = None) -> tuple[Array, dict]:
    if mesh.shape['data'] == 1:
      return model.apply({'params': params}, batch, train=train, rngs=rngs)
    flat, unravel = ravel_pytree(params)
    batch = {**batch, 'example_index': jnp.arange(jax.tree.leaves(batch)[0].shape[0])}
    local = lambda flat, batch: model.apply({'params': unravel(flat)}, batch, train=train, rngs=rngs)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec('data')),
                         out_specs=PartitionSpec('data'), check_vma=False)(flat, batch)
  return apply


def pairs_of(model: nn.Module, dist: Distillation, taps: dict, teacher_taps: dict, batch: dict) -> dict:
  """The pairs between the student's `taps` and the teacher's `teacher_taps` on `batch`."""
  context = distill.LevelContext(model.modality, batch[f'{model.modality}_mask'].astype(jnp.float32),
                                 batch['weight'], dist.layer_map)
  return distill.collect_pairs(dist.terms, taps, teacher_taps, context)


def distillation_pairs(model: nn.Module, dist: Distillation, taps: dict, teacher_params: Any,
                       batch: dict) -> dict:
  """The pairs between the student's `taps` on `batch` and the (frozen) teacher's, run on `batch`
  or, with `dist.cached_taps`, read from the batch's `teacher_target_key` fields."""
  if dist.cached_taps is None:
    return pairs_of(model, dist, taps, dist.teacher.apply({'params': teacher_params}, batch, train=False)[1], batch)
  # Zero stand-ins give the levels their shapes; their teacher sides are replaced, so XLA drops them.
  size = batch['weight'].shape[0]
  structure, shapes = dist.cached_taps
  stand_in = jax.tree.unflatten(structure, [jnp.zeros((size,) + s.shape, s.dtype) for s in shapes])
  return {level: {name: pair.replace(teacher=batch[teacher_target_key(level, name)]) for name, pair in named.items()}
          for level, named in pairs_of(model, dist, taps, stand_in, batch).items()}


def teacher_target_key(level: str, name: str) -> str:
  return f'teacher/{level}/{name}'


def teacher_targets(model: nn.Module, dist: Distillation, student_params: Any, teacher_params: Any,
                    builder: Any, info: data.TaskInfo, batch_size: int, mesh: Mesh,
                    max_gb: float) -> tuple[Distillation, dict[str, np.ndarray]] | None:
  """Every distillation pair's teacher side for each training example, computed once.

  The teacher is frozen and runs in eval mode, and the training data has no augmentation, so
  these are the tensors the step would otherwise recompute each time it draws the example.
  One ordered pass over the train split (`batch_size` examples per batch, sharded over
  `mesh`). Returns (`dist` with `cached_taps` set, `teacher_target_key` -> array over the split
  in source order: row fields for `pipeline.train_iterator`), or None when the arrays would
  exceed `max_gb` GiB. This assumes what the built-in levels do: a pair's teacher side is a
  function of the teacher's taps and mask of the example alone (not of the student, nor of
  other examples).
  """
  targets = functools.partial(teacher_sides, model=model, dist=dist, out_sharding=NamedSharding(mesh, PartitionSpec()))
  start = time.perf_counter()
  modalities = batch_modalities(model, dist.teacher)
  num_examples = pipeline.num_examples(builder, 'train')
  probe = jax.tree.map(jnp.asarray, dummy_batch(info, modalities, 1))
  per_example = jax.eval_shape(targets, student_params, teacher_params, probe)
  size_gb = num_examples * sum(x.size * x.dtype.itemsize for x in per_example.values()) / 2**30
  if size_gb > max_gb:
    logging.warning('the teacher targets of %d training examples need %.2f GiB, more than config.distill.'
                    'cache_teacher_max_gb=%s: the teacher runs in every step instead', num_examples, size_gb, max_gb)
    return None
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  parts = [jax.device_get(targets(student_params, teacher_params, shard_global_batch(batch, sharding)))
           for batch in pipeline.eval_batches(builder, 'train', modalities, batch_size)]
  fields = {key: np.concatenate([part[key] for part in parts])[:num_examples] for key in per_example}
  logging.info('teacher targets of %d training examples computed once: %.1f MiB in %.1f s', num_examples,
               size_gb * 1024, time.perf_counter() - start)
  taps, structure = jax.tree.flatten(
      jax.eval_shape(lambda t, b: dist.teacher.apply({'params': t}, b, train=False)[1], teacher_params, probe))
  cached_taps = (structure, tuple(jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for s in taps))
  return dataclasses.replace(dist, cached_taps=cached_taps), fields


@functools.partial(jax.jit, static_argnames=('model', 'dist', 'out_sharding'))
def teacher_sides(student_params: Any, teacher_params: Any, batch: dict, *, model: nn.Module, dist: Distillation,
                  out_sharding: NamedSharding) -> dict[str, Array]:
  """`teacher_target_key` -> the teacher side of each distillation pair on `batch`."""
  pairs = distillation_pairs(model, dist, model.apply({'params': student_params}, batch)[1], teacher_params, batch)
  return jax.lax.with_sharding_constraint(
      {teacher_target_key(level, name): pair.teacher for level, named in pairs.items() for name, pair in named.items()},
      out_sharding)


def distill_metric_name(term: distill.Term) -> str:
  return f'distill_{term.level}_{term.method}'


def make_train_step(model: nn.Module, task: str, dist: Distillation | None, mesh: Mesh) -> Callable:
  """The pure step `(state, batch, rng, teacher_params) -> (state, metrics)`.

  Only `state.params` (student/teacher model + distillation projector) is differentiated;
  the teacher's params are a separate input under stop_gradient. The trained model runs
  through `data_parallel_apply` over `mesh`.
  """
  apply = data_parallel_apply(model, mesh)

  def loss_fn(params, batch, rng, teacher_params):
    outputs, taps = apply(params['model'], batch, train=True, rngs={'dropout': rng})
    if dist is None:
      loss = task_loss(task, outputs, batch['label'], batch['weight'])
      return loss, (outputs, {'task_loss': loss})
    pairs = distillation_pairs(model, dist, taps, teacher_params, batch)
    if params['projector']:
      pairs = distill.Projector(projection_widths_of(params['projector'])).apply(
          {'params': params['projector']}, pairs)
    losses = distill.distillation_losses(dist.terms, pairs, dist.hparams, batch['label'])
    base = task_loss(task, outputs, batch['label'], batch['weight'])
    total = dist.task_weight * base + sum(t.weight * losses[t.name] for t in dist.terms)
    return total, (outputs, {'task_loss': base, **{distill_metric_name(t): losses[t.name] for t in dist.terms}})

  def step(state, batch, rng, teacher_params=None):
    rng = jax.random.fold_in(rng, state.step)
    (loss, (outputs, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, teacher_params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = state.apply_gradients(grads=grads)
    # A non-finite loss or gradient never reaches the parameters or the optimizer state.
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state.replace(step=updated.step))
    values = {'loss': loss, **parts, 'grad_norm': grad_norm, 'param_norm': optax.tree.norm(state.params),
              'nonfinite': 1.0 - finite.astype(jnp.float32)}
    if task == 'classification':
      values['accuracy'] = jnp.sum((outputs.argmax(-1) == batch['label']) * batch['weight']) / jnp.sum(batch['weight'])
    return state, step_metrics(values)

  return step


@functools.partial(jax.jit, static_argnames=('model', 'task', 'dist', 'mesh'), donate_argnums=0)
def train_step(state: train_state.TrainState, batch: dict, rng: Array, teacher_params: Any, *, model: nn.Module,
               task: str, dist: Distillation | None, mesh: Mesh) -> tuple[train_state.TrainState, Any]:
  """`make_train_step`'s step, jitted with its setup as static arguments: the runs of other seeds
  (equal models, optimizer and state structure) reuse its trace and compiled program."""
  return make_train_step(model, task, dist, mesh)(state, batch, rng, teacher_params)


@functools.partial(jax.jit, static_argnames=('model', 'out_sharding'))
def predict_outputs(params: Any, batch: dict, *, model: nn.Module, out_sharding: NamedSharding) -> Array:
  """The model's outputs on `batch`, replicated (every process reads them whole)."""
  return jax.lax.with_sharding_constraint(model.apply({'params': params['model']}, batch)[0], out_sharding)


@functools.partial(jax.jit, static_argnums=0)
def init_params(module: nn.Module, rng: Array, batch: Any) -> Any:
  """`module.init(rng, batch)['params']` as one compiled program (not one per op and shape), traced
  once per module configuration."""
  return module.init(rng, batch)['params']


def projection_widths_of(projector_params: dict) -> dict[str, int]:
  """Pair name -> output width, read back from the projector's parameters."""
  return {name: p['kernel'].shape[-1] for name, p in projector_params.items()}


class _PreemptionFlag:
  """Turns SIGTERM into a flag that the loop checks between steps.

  The loop then writes a final checkpoint and calls `exit()`, which ends the process by
  SIGTERM as if the signal had arrived unhandled. Only installed on the main thread.
  """

  def __enter__(self) -> '_PreemptionFlag':
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def exit(self) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


Metrics = dict[str, clu_metrics.Average]


def step_metrics(values: dict[str, Array]) -> Metrics:
  """One step's scalar metrics as running averages, keyed by name.

  A plain dict of one fixed metric class, not a `clu_metrics.Collection.create` class per
  trace: jaxlib's PyTreeDef equality ignores the type of registered dataclasses, so jit
  caches keyed on a collection's tree structure could return another run's collection class
  whose fields have other names. Dict keys are part of the tree structure's equality.
  """
  return {name: clu_metrics.Average.from_model_output(value) for name, value in values.items()}


@jax.jit
def merge_metrics(accumulated: Metrics, new: Metrics) -> Metrics:
  """Adds a step's metrics to the running sums: one compiled call per step, not an eager op per field."""
  return {name: metric.merge(new[name]) for name, metric in accumulated.items()}


def compute_metrics(metrics: Metrics) -> dict[str, float]:
  return {name: float(metric.compute()) for name, metric in metrics.items()}


def shard_local_batch(batch: dict, sharding: NamedSharding) -> dict:
  """One global array per field from every process's own rows (training batches), all fields in
  one transfer."""
  return jax.make_array_from_process_local_data(sharding, batch)


def shard_global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """One global array per field from a batch every process holds whole (evaluation batches)."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch)


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A ('data', 'model') mesh over all devices; the batch is split on 'data'."""
  model_size = config.mesh.model
  return jax.make_mesh((jax.device_count() // model_size, model_size), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run_fingerprint(config: ml_collections.ConfigDict, role: str, seed: int, distilled: bool) -> dict:
  """The config that shapes one run's checkpoints; a run dir never mixes two of them."""
  fingerprint = {
      'role': role, 'seed': seed, role: config[role].to_dict(),
      # Another dataset's options (config.data.arrays unless name='arrays') do not shape the run.
      'data': {k: v for k, v in config.data.to_dict().items()
               if k not in ('data_dir', 'manual_dir') and not (k == 'arrays' and config.data.name != 'arrays')},
      'train': {k: v for k, v in config.train.to_dict().items()
                if k not in ('log_every', 'eval_batch_size', 'skip_nonfinite', 'kernels')},
  }
  if distilled:
    fingerprint['teacher'] = config.teacher.to_dict()
    fingerprint['distill'] = {k: v for k, v in config.distill.to_dict().items()
                              if k not in ('teacher_dir', 'cache_teacher', 'cache_teacher_max_gb')}
  return current_fingerprint(fingerprint)


def current_fingerprint(fingerprint: dict) -> dict:
  """`fingerprint` as this version writes it: a distilled run's hparams only of the methods it uses
  (a newly added method's config line leaves it alone), each completed with its signature's
  defaults (a newly added hyperparameter at its default leaves it alone). Fingerprints stored by
  earlier versions, which held every method's, or fewer keys, compare equal through this."""
  if 'distill' in fingerprint:
    used = sorted({term.method for term in distill.parse_terms(fingerprint['distill']['terms'])})
    stored = fingerprint['distill'].get('hparams', {})
    hparams = {m: {**distill.METHODS.info(m).defaults, **stored.get(m, {})} for m in used
               if distill.METHODS.info(m).hparams}
    fingerprint = {**fingerprint, 'distill': {**fingerprint['distill'], 'hparams': hparams}}
  return fingerprint


def drop_logged_steps_after(path: str, step: int) -> None:
  """Keeps the rows of the metrics.jsonl at `path` (if any) up to `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(rows)


def run_label(run_dir: str, role: str) -> str:
  """The run's name in progress lines: '<arm>/seed_<s>' for a seed's run, else the role."""
  parent, base = os.path.split(os.path.normpath(run_dir))
  return f'{os.path.basename(parent)}/{base}' if base.startswith('seed_') else role


def check_teacher_dir(config: ml_collections.ConfigDict, teacher_dir: str) -> None:
  """An explicit `config.distill.teacher_dir` must hold a finished teacher of this config's shape."""
  found = checkpoint.read_fingerprint(teacher_dir)
  has_checkpoint = os.path.isdir(os.path.join(teacher_dir, 'checkpoints')) and any(
      name.isdigit() for name in os.listdir(os.path.join(teacher_dir, 'checkpoints')))
  if found is None or found.get('role') != 'teacher' or not has_checkpoint:
    raise ConfigError(f'config.distill.teacher_dir={teacher_dir!r} holds no trained teacher (run.json and '
                      'checkpoints); train one with configs/teacher.py or leave teacher_dir empty')
  wanted = run_fingerprint(config, 'teacher', found['seed'], distilled=False)
  for section in ('teacher', 'data'):
    difference = checkpoint.first_difference(found[section], wanted[section], section)
    if difference:
      raise ConfigError(f'config.distill.teacher_dir={teacher_dir!r}: that teacher was trained with another '
                        f'config ({difference})')


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, info: data.TaskInfo,
                       modalities: list[str], rngs: tuple[Array, Array], teacher: tuple[nn.Module, Any] | None,
                       terms: tuple[distill.Term, ...]) -> tuple[train_state.TrainState, Distillation | None]:
  """Initial state: params {'model', 'projector'} (projector only where distilled widths differ).

  `rngs` = (model init key, projector init key). Initialisation is jitted: one compiled program
  per model instead of one per op and shape, the same parameters bit for bit.
  """
  model_rng, projector_rng = rngs
  sample = dummy_batch(info, modalities)
  params = {'model': init_params(model, model_rng, sample), 'projector': {}}
  dist = None
  if teacher is not None:
    teacher_depth = teacher[0].num_cross_layers + teacher[0].num_self_layers
    dist = Distillation(teacher[0], terms, FrozenDict(validation.method_hparams(config)),
                        distill.resolve_layer_map(config.distill.layer_map, model.num_layers, teacher_depth),
                        config.distill.task_weight)
    pairs = jax.eval_shape(lambda p, t, b: distillation_pairs(model, dist, model.apply({'params': p}, b)[1], t, b),
                           params['model'], teacher[1], sample)
    widths = distill.projection_widths(pairs)
    if widths and config.distill.projection:
      concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pairs)
      params['projector'] = init_params(distill.Projector(FrozenDict(widths)), projector_rng, concrete)
  # apply_fn stays unset: the step calls the model itself, and a bound method would make the states
  # of two runs (two equal models) differ in tree structure.
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=optimizers.create_optimizer(config.train))
  return state, dist


def train_run(config: ml_collections.ConfigDict, role: str, run_dir: str, seed: int, builder: Any,
              info: data.TaskInfo, teacher: tuple[nn.Module, Any] | None = None,
              terms: tuple[distill.Term, ...] = (), restore_only: bool = False) -> RunResult:
  """Trains one model (resuming from `run_dir` if it holds a checkpoint) and evaluates it.

  With `teacher` = (module, params) and `terms`, the student is distilled from the teacher.
  With `restore_only`, a finished run in `run_dir` is restored and evaluated, never trained.
  """
  if not restore_only:
    checkpoint.claim_run_dir(run_dir, run_fingerprint(config, role, seed, teacher is not None), config.overwrite,
                             upgrade=current_fingerprint)
  mesh = create_mesh(config)
  for key in ('batch_size', 'eval_batch_size'):
    if config.train[key] % mesh.shape['data']:
      raise ConfigError(f"config.train.{key}={config.train[key]} is not divisible by the {mesh.shape['data']} "
                        'devices of the data axis (all processes)')
  data_sharding = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())
  model = create_model(config, info, role)
  modalities = batch_modalities(model, teacher[0] if teacher is not None else None)
  init_rng, projector_rng, step_rng = jax.random.split(jax.random.key(seed), 3)
  state, dist = create_train_state(config, model, info, modalities, (init_rng, projector_rng), teacher, terms)
  state = jax.device_put(state, replicated)
  teacher_params = jax.device_put(teacher[1], replicated) if teacher else None

  manager = checkpoint.create_manager(os.path.join(run_dir, 'checkpoints'))
  # A finished run is only restored and evaluated: it needs no teacher targets.
  finished = restore_only or (manager.latest_step() or 0) >= config.train.num_steps
  row_fields = None
  if dist is not None and config.distill.cache_teacher and distill.cacheable(dist.terms) and not finished:
    cached = teacher_targets(model, dist, state.params['model'], teacher_params, builder, info,
                             config.train.eval_batch_size, mesh, config.distill.cache_teacher_max_gb)
    if cached is not None:
      # The train batches then carry the teacher's targets instead of its input modalities.
      (dist, row_fields), modalities = cached, batch_modalities(model)
  train_iter = pipeline.train_iterator(builder, modalities, config.train.batch_size // jax.process_count(), seed,
                                       shard_index=jax.process_index(), shard_count=jax.process_count(),
                                       row_fields=row_fields)
  if manager.latest_step() is not None:
    state, data_state = checkpoint.restore(manager, manager.latest_step(), state)
    train_iter.set_state(data_state)
    logging.info('%s: %s at step %d', run_dir, 'finished run restored' if finished else 'resumed', int(state.step))

  step_fn = functools.partial(train_step, model=model, task=info.task, dist=dist, mesh=mesh)
  predict_fn = functools.partial(predict_outputs, model=model, out_sharding=replicated)
  eval_split = lambda split: evaluate.compute_metrics(info.task, *evaluate.predict(
      predict_fn, state.params, pipeline.eval_batches(builder, split, modalities, config.train.eval_batch_size),
      functools.partial(shard_global_batch, sharding=data_sharding)))

  name = run_label(run_dir, role)
  start_step = int(state.step)
  # A restored-only run (someone else's teacher dir) writes nothing there. A run resumed after a
  # hard kill drops the logged steps past its checkpoint, which it trains again.
  writer = None
  if jax.process_index() == 0 and not restore_only:
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)
    drop_logged_steps_after(os.path.join(run_dir, 'metrics.jsonl'), start_step)
  num_steps = start_step if restore_only else config.train.num_steps
  accumulated, skipped, start_time = None, 0, time.perf_counter()

  def save_checkpoint(step: int) -> None:
    values = eval_split('validation')
    values[checkpoint.SCORE] = evaluate.score(info.task, values)
    if writer:
      for key, value in values.items():
        writer.add_scalar(f'validation/{key}', value, step)
    checkpoint.save(manager, step, state, train_iter.get_state(), values)

  with _PreemptionFlag() as preemption:
    for step in range(start_step + 1, num_steps + 1):
      batch = shard_local_batch(next(train_iter), data_sharding)
      state, metrics = step_fn(state, batch, step_rng, teacher_params)
      if float(metrics['nonfinite'].total):
        # jit returns dicts with sorted keys: name the loss and its terms first, then the norms.
        bad = ', '.join(sorted((k for k, v in compute_metrics(metrics).items() if not np.isfinite(v)),
                               key=lambda k: (k not in ('loss', 'task_loss') and not k.startswith('distill_'),
                                              k != 'loss', k != 'task_loss', k)))
        if not config.train.skip_nonfinite:
          manager.wait_until_finished()
          raise FloatingPointError(
              f'[{name}] non-finite {bad} at step {step}; the update was not applied and training stopped; '
              + (f'last good checkpoint: step {manager.latest_step()} in {manager.directory}'
                 if manager.latest_step() is not None else 'no checkpoint was saved before it'))
        skipped += 1
        logging.warning('[%s] skipped step %d: non-finite %s (%d skipped so far)', name, step, bad, skipped)
      else:
        accumulated = metrics if accumulated is None else merge_metrics(accumulated, metrics)
      is_last = step == num_steps
      if (step % config.train.log_every == 0 or is_last) and accumulated is not None:
        values = compute_metrics(accumulated)
        values['skipped_steps'] = skipped
        accumulated = None
        rate = (step - start_step) / (time.perf_counter() - start_time)
        logging.info('[%s] step %d/%d loss %.4f%s%s | %.1f steps/s | ETA %s', name, step, num_steps, values['loss'],
                     f" (task {values['task_loss']:.4f})" if dist is not None else '',
                     f" acc {values['accuracy']:.3f}" if 'accuracy' in values else '', rate,
                     format_eta((num_steps - step) / rate))
        if writer:
          for key, value in values.items():
            writer.add_scalar(f'train/{key}', value, step)
          with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps({'step': step, **values}) + '\n')
      if step % config.train.eval_every == 0 or is_last or preemption.requested:
        save_checkpoint(step)
      if preemption.requested:
        logging.warning('[%s] SIGTERM: checkpoint saved at step %d; run the same command to resume', name, step)
        manager.close()
        preemption.exit()
  if writer:
    writer.close()

  manager.wait_until_finished()
  best_step = manager.best_step()
  state, _ = checkpoint.restore(manager, best_step, state)
  validation_metrics = dict(manager.metrics(best_step))
  manager.close()
  test_metrics = eval_split('test')
  logging.info('[%s] best validation step %d: %s; test: %s', name, best_step,
               json.dumps({k: round(v, 4) for k, v in validation_metrics.items()}),
               json.dumps({k: round(v, 4) for k, v in test_metrics.items()}))
  return RunResult(state.params, model, validation_metrics, test_metrics, count_params(state.params['model']))


def latency(model: nn.Module, params: Any, info: data.TaskInfo, config: ml_collections.ConfigDict) -> float:
  """Median seconds of one jitted forward pass on a batch of `config.report.latency_batch_size`."""
  modalities = batch_modalities(model)
  batch = jax.tree.map(jnp.asarray, dummy_batch(info, modalities, config.report.latency_batch_size))
  fn = jax.jit(lambda p, b: model.apply({'params': p}, b)[0])
  return evaluate.measure_latency(fn, params['model'], batch, config.report.latency_repeats)


def load_data(config: ml_collections.ConfigDict) -> Any:
  """The dataset builder; on multi-host runs process 0 prepares it while the others wait."""
  if jax.process_index() == 0:
    builder = data.load_builder(config.data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('mmkd_jax: dataset prepared')
  if jax.process_index() != 0:
    builder = data.load_builder(config.data)
  return builder


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.job` in `workdir` (see the module docstring) and returns its results."""
  if 'study' in config:
    raise ConfigError('this config has a config.study grid: run it with `python -m mmkd_jax.study --config=...`; '
                      f'mmkd_jax.main runs one job (config.job, one of {", ".join(validation.JOBS)})')
  validation.check_config(config)
  workdir = validation.workdir_path(workdir)
  runtime.configure_host(config)
  runtime.initialize_distributed(config)
  builder = load_data(config)
  info = data.task_info(builder)
  validation.check_against_data(config, info)
  if config.job in ('teacher', 'student'):
    # The run's directory is the workdir: claim it before writing config.json there, since with
    # config.overwrite claiming deletes a run of another config (train_run's own claim then finds this one).
    checkpoint.claim_run_dir(workdir, run_fingerprint(config, config.job, config.seed, False), config.overwrite,
                             upgrade=current_fingerprint)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  if config.job in ('teacher', 'student'):
    result = train_run(config, config.job, workdir, config.seed, builder, info)
    return {'validation': result.validation, 'test': result.test, 'params': result.num_params}

  if config.distill.teacher_dir:
    check_teacher_dir(config, config.distill.teacher_dir)
    teacher = train_run(config, 'teacher', config.distill.teacher_dir, config.seed, builder, info, restore_only=True)
  else:
    teacher = train_run(config, 'teacher', os.path.join(workdir, 'teacher'), config.seed, builder, info)
  terms = distill.parse_terms(config.distill.terms)
  runs = {'student': [], 'distilled': []}
  for seed in validation.seeds(config):
    runs['student'].append(train_run(config, 'student', os.path.join(workdir, 'student', f'seed_{seed}'),
                                     seed, builder, info))
    runs['distilled'].append(train_run(config, 'student', os.path.join(workdir, 'distilled', f'seed_{seed}'),
                                       seed, builder, info, teacher=(teacher.model, teacher.params['model']),
                                       terms=terms))
  # Classical reference rows: linear models on the teacher's inputs and the student's, with the same seeds.
  references = reference.fit_references(builder, info, validation.teacher_modalities(config),
                                        [config.student.modality], validation.seeds(config))
  results = report.build(
      config, info,
      teacher=teacher, students=runs['student'], distilled=runs['distilled'],
      teacher_latency=latency(teacher.model, teacher.params, info, config),
      student_latency=latency(runs['student'][0].model, runs['student'][0].params, info, config),
      references=references)
  report.write(results, workdir)
  logging.info('report written to %s', os.path.join(workdir, 'report.md'))
  return results
