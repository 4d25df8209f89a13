"""Optimizers and learning-rate schedules, looked up by the names in `config.train`."""
import functools
from typing import Callable

import ml_collections
import optax

from mmkd_jax.registry import Registry

OPTIMIZERS: Registry[Callable[..., optax.GradientTransformation]] = Registry('optimizer')
OPTIMIZERS.register('adamw')(lambda lr, wd: optax.adamw(lr, weight_decay=wd))
OPTIMIZERS.register('adam')(lambda lr, wd: optax.adam(lr))
OPTIMIZERS.register('sgd')(lambda lr, wd: optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9)))
SCHEDULES: Registry[Callable[[float, int, int], optax.Schedule]] = Registry('schedule')
SCHEDULES.register('cosine')(lambda lr, warmup, total: optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup, max(total, warmup + 1)))
SCHEDULES.register('constant')(lambda lr, warmup, total: optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]))
SCHEDULES.register('linear')(lambda lr, warmup, total: optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, max(total - warmup, 1))], [warmup]))


def create_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Optimizer `train.optimizer` on schedule `train.schedule`, after global-norm clipping if set.

  The same settings give the same object, so that train states of two runs (other seeds) have
  equal tree structures and their jitted steps share one trace.
  """
  return _optimizer(train.optimizer, train.schedule, train.learning_rate, train.warmup_steps, train.num_steps,
                    train.weight_decay, train.grad_clip)


@functools.lru_cache(maxsize=32)
def _optimizer(name: str, schedule_name: str, learning_rate: float, warmup_steps: int, num_steps: int,
               weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  schedule = SCHEDULES.get(schedule_name)(learning_rate, warmup_steps, num_steps)
  tx = OPTIMIZERS.get(name)(schedule, weight_decay)
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx
