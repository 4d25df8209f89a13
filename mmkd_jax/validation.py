"""Config checks that run before any data is read or anything compiles.

Each failure is a one-line `errors.ConfigError` naming the config key, the bad value and what
is allowed.
"""
import os

import ml_collections

from mmkd_jax import data, distill, optimizers, plugins, runtime, stats
from mmkd_jax.errors import ConfigError
from mmkd_jax.models import layers
from mmkd_jax.models.tokens import EMBEDDINGS

JOBS = ('teacher', 'student', 'distill')


def teacher_modalities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(m.strip() for m in config.teacher.modalities.split(',') if m.strip())


def seeds(config: ml_collections.ConfigDict, key: str = 'report.seeds') -> tuple[int, ...]:
  """The seeds of `config.<key>`: distinct integers, at least one, and as many as `config.report.interval` needs."""
  section, field = key.split('.')
  spec = config[section][field]
  example = "'0,1,2,3,4' (each seed is one baseline and one distilled run)"
  try:
    values = tuple(int(s) for s in str(spec).split(',') if s.strip())
  except ValueError:
    values = ()
  if not values:
    raise ConfigError(f'config.{key}={spec!r}: expected distinct comma-separated integers such as {example}')
  repeated = sorted({v for v in values if values.count(v) > 1})
  if repeated:
    raise ConfigError(f'config.{key}={spec!r}: expected distinct comma-separated integers such as {example}; '
                      + (f'seed {repeated[0]} is' if len(repeated) == 1 else f'seeds {", ".join(map(str, repeated))} are')
                      + ' given twice')
  interval = config.report.interval
  if interval not in stats.INTERVALS:
    raise ConfigError(f'config.report.interval={interval!r} is unknown; valid choices: {", ".join(stats.INTERVALS)}')
  if interval == 'student_t' and len(values) < stats.MIN_SEEDS:
    raise ConfigError(f'config.{key}={spec!r} gives {len(values)} seed{"s" * (len(values) > 1)}; '
                      f"config.report.interval='student_t' needs at least {stats.MIN_SEEDS} (or set it to 'auto', "
                      "which reports the interval as undefined below that, or to 'none')")
  return values


def workdir_path(workdir: str) -> str:
  """`workdir` as an absolute path; it must be a directory or not exist yet."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'--workdir={workdir!r} is a file; give a directory (it is created if missing)')
  return path


def method_hparams(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """`config.distill.hparams` as plain dicts (method -> name -> value); the signatures' defaults
  fill what it lacks (`distill.term_hparams`)."""
  return {method: dict(values) for method, values in config.distill.hparams.items()}


def _positive(config: ml_collections.ConfigDict, path: str, allow_zero: bool = False) -> None:
  value = config
  for key in path.split('.'):
    value = value[key]
  if not (value >= 0 if allow_zero else value > 0):
    raise ConfigError(f'config.{path}={value!r} must be {">= 0" if allow_zero else "> 0"}')


def _choice(path: str, value: str, choices) -> None:
  if value not in choices:
    raise ConfigError(f'config.{path}={value!r} is unknown; valid choices: {", ".join(choices)}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks names, sizes and distillation terms that need no dataset, after importing
  `config.plugins` (whose methods, levels and datasets are then valid choices)."""
  plugins.load(config.plugins)
  _choice('job', config.job, JOBS)
  _choice('data.name', config.data.name, data.DATASETS.names())
  _choice('train.optimizer', config.train.optimizer, optimizers.OPTIMIZERS.names())
  _choice('train.schedule', config.train.schedule, optimizers.SCHEDULES.names())
  for role in ('teacher', 'student'):
    _choice(f'{role}.embedding', config[role].embedding, EMBEDDINGS.names())
  _choice('train.compute_dtype', config.train.compute_dtype, ('float32', 'bfloat16'))
  _choice('train.kernels', config.train.kernels, layers.KERNELS)
  _choice('host.cpu_dispatch', config.host.cpu_dispatch, runtime.CPU_DISPATCH)
  _choice('distributed.initialize', config.distributed.initialize, runtime.DISTRIBUTED_INITIALIZE)
  for path in ('teacher.width', 'teacher.num_heads', 'teacher.num_cross_layers', 'teacher.mlp_ratio',
               'student.width', 'student.num_heads', 'student.num_layers', 'student.mlp_ratio',
               'train.batch_size', 'train.eval_batch_size', 'train.num_steps', 'train.learning_rate',
               'train.log_every', 'train.eval_every', 'report.latency_batch_size', 'report.latency_repeats',
               'mesh.model', 'train.steps_per_call'):
    _positive(config, path)
  for path in ('teacher.num_self_layers', 'train.warmup_steps', 'train.weight_decay', 'train.grad_clip',
               'teacher.dropout_rate', 'student.dropout_rate', 'distill.task_weight', 'distill.cache_teacher_max_gb',
               'host.cpu_devices', 'train.device_data_max_mb'):
    _positive(config, path, allow_zero=True)
  for role in ('teacher', 'student'):
    if not config[role].dropout_rate < 1:
      raise ConfigError(f'config.{role}.dropout_rate={config[role].dropout_rate!r} must be < 1')
    if config[role].width % config[role].num_heads:
      raise ConfigError(f'config.{role}.width={config[role].width} is not divisible by '
                        f'config.{role}.num_heads={config[role].num_heads}')
  if config.train.warmup_steps > config.train.num_steps:
    raise ConfigError(f'config.train.warmup_steps={config.train.warmup_steps} is more than config.train.num_steps='
                      f'{config.train.num_steps}: the learning rate would never reach its peak')
  if len(teacher_modalities(config)) < 2:
    raise ConfigError(f'config.teacher.modalities={config.teacher.modalities!r}: the teacher needs at least '
                      'two comma-separated modalities')
  seeds(config)
  if config.job == 'distill':
    terms = distill.parse_terms(config.distill.terms)
    if not terms:
      raise ConfigError("config.distill.terms is empty; give at least one 'level:method:weight' entry")
    distill.validate_hparams(method_hparams(config))
    student_depth, teacher_depth = config.student.num_layers, config.teacher.num_cross_layers + config.teacher.num_self_layers
    distill.resolve_layer_map(config.distill.layer_map, student_depth, teacher_depth)  # raises if out of range
    teacher_widths = {'hidden': config.teacher.width,
                      'pooled': config.teacher.width * len(teacher_modalities(config))}
    for term in terms:
      width = teacher_widths.get(term.level, config.student.width)
      if (not config.distill.projection and width != config.student.width
          and not distill.METHODS.info(term.method).width_agnostic):
        agnostic = [m for m in distill.METHODS.names() if distill.METHODS.info(m).width_agnostic]
        raise ConfigError(f'config.distill.projection=False but {term.name!r} compares student width '
                          f'{config.student.width} with teacher width {width}; enable the projection, make '
                          f'the widths equal or use one of {", ".join(agnostic)}')


def check_against_data(config: ml_collections.ConfigDict, info: data.TaskInfo) -> None:
  """Checks modality names and task-specific terms against the dataset."""
  known = list(info.modalities)
  for m in teacher_modalities(config):
    _choice('teacher.modalities', m, known)
  _choice('student.modality', config.student.modality, known)
  if config.job == 'distill':
    if config.student.modality not in teacher_modalities(config):
      raise ConfigError(f'config.student.modality={config.student.modality!r} is not one of the teacher\'s '
                        f'modalities {config.teacher.modalities!r}: levels below the logits need its stream')
    for term in distill.parse_terms(config.distill.terms):
      if info.task != 'classification' and distill.METHODS.info(term.method).task == 'classification':
        raise ConfigError(f'config.distill.terms: {term.name!r} needs class probabilities but the task of '
                          f'{config.data.name!r} is {info.task}; use mse or l1 at the logits level')
