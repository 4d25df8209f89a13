"""The pure train step of one model, and what it is built from.

`make_train_step` gives `(state, batch, rng, teacher_params) -> (state, metrics)` for one
model (one population member): the task loss, the distillation terms (the teacher run online
or its targets read from the batch, `teacher_targets`), the update, and the step's metrics as
name-keyed clu Averages. mmkd_jax/loop.py runs it K steps per call and over a population.
"""
import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
from clu import metrics as clu_metrics
import flax.linen as nn
from flax.core import FrozenDict
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import optax

from mmkd_jax import data, distill, optimizers, validation
from mmkd_jax.data import pipeline
from mmkd_jax.models import MODELS, layers

Array = Any


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
  CPU one rendezvous each). The batch gains
  'example_index' (position in the global batch), which keys dropout masks, so they do not
  depend on the device count. With one device on the data axis it is plain `model.apply`; with
  Flax's layers (`model.kernels`, the GPU/TPU path) it is a plain sharded `apply`, whose gradient
  all-reduces XLA's combiner merges there.
  """
  def apply(params: Any, batch: dict, *, train: bool, rngs: dict | None = None) -> tuple[Array, dict]:
    if mesh.shape['data'] == 1:
      return model.apply({'params': params}, batch, train=train, rngs=rngs)
    batch = {**batch, 'example_index': jnp.arange(jax.tree.leaves(batch)[0].shape[0])}
    if not layers.use_cpu_kernels(model.kernels):
      return model.apply({'params': params}, batch, train=train, rngs=rngs)
    flat, unravel = ravel_pytree(params)
    # The RNGs are arguments, not closed over: under a population's vmap they carry the member axis.
    local = lambda flat, batch, rngs: model.apply({'params': unravel(flat)}, batch, train=train, rngs=rngs)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec('data'), PartitionSpec()),
                         out_specs=PartitionSpec('data'), check_vma=False)(flat, batch, rngs)
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



@functools.partial(jax.jit, static_argnums=0)
def init_params(module: nn.Module, rng: Array, batch: Any) -> Any:
  """`module.init(rng, batch)['params']` as one compiled program (not one per op and shape), traced
  once per module configuration."""
  return module.init(rng, batch)['params']


def projection_widths_of(projector_params: dict) -> dict[str, int]:
  """Pair name -> output width, read back from the projector's parameters."""
  return {name: p['kernel'].shape[-1] for name, p in projector_params.items()}


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


def create_mesh(config: ml_collections.ConfigDict, members: int = 1) -> Mesh:
  """A ('member', 'data', 'model') mesh over all devices.

  A population's members spread over 'member' (as many devices as divide both the member count
  and the devices left by 'model'); each member's batch is split over 'data'.
  """
  model_size = config.mesh.model
  member_size = math.gcd(members, jax.device_count() // model_size)
  return jax.make_mesh((member_size, jax.device_count() // model_size // member_size, model_size),
                       ('member', 'data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 3)


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

