"""Optimizers and learning-rate schedules, looked up by the names in `config.train`."""
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
  """Optimizer `train.optimizer` on schedule `train.schedule`, after global-norm clipping if set."""
  schedule = SCHEDULES.get(train.schedule)(train.learning_rate, train.warmup_steps, train.num_steps)
  tx = OPTIMIZERS.get(train.optimizer)(schedule, train.weight_decay)
  return optax.chain(optax.clip_by_global_norm(train.grad_clip), tx) if train.grad_clip > 0 else tx
