"""Classical reference rows: linear models on the flattened real features, fitted with jax/optax.

Every report places the deep models next to a linear model on the same inputs, split and seeds:
multinomial logistic regression for classification, ridge regression (least squares) for
regression, one logistic regression per label for multilabel data. The input of an example is
the concatenation of its modalities' tokens, flattened, with padded tokens (mask False) set to 0,
then standardised with the train split's column statistics. The objective, mean task loss +
strength / 2 * ||W||^2 (bias not penalised), is minimised full batch by L-BFGS
(`optax.lbfgs`) for every strength of `L2_GRID`; per seed the strength with the best
validation score (`evaluate.score`; ties go to the stronger penalty) is evaluated on the test
split. The objective is strictly convex, so the seed only sets the initial weights and the
seeds' results differ by the solver's tolerance alone; they are fitted per seed all the same,
so that every report's reference rows come from the seeds of its deep models.
"""
import functools
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmkd_jax import data, evaluate, stats
from mmkd_jax.data import pipeline

# Strengths of the L2 penalty tried; the validation split picks one per seed.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# L-BFGS stops at this many iterations or when the gradient's norm falls below the tolerance.
MAX_ITERATIONS = 200
TOLERANCE = 1e-5
MODELS = {'classification': 'multinomial logistic regression', 'regression': 'ridge regression',
          'multilabel': 'per-label logistic regression'}


def flat_features(builder: Any, split: str, modalities: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(N, sum of L * F) float32 features of `split` with padded tokens zeroed, and its labels."""
  arrays = next(pipeline.eval_batches(builder, split, modalities, pipeline.num_examples(builder, split)))
  n = len(arrays['label'])
  parts = [(arrays[m] * arrays[f'{m}_mask'][..., None]).reshape(n, -1) for m in modalities]
  return np.concatenate(parts, axis=1).astype(np.float32), arrays['label']


def task_loss(task: str, outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy (classification), squared error (regression) or per-label sigmoid BCE."""
  if task == 'classification':
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))
  if task == 'regression':
    return jnp.mean(jnp.square(outputs - labels.reshape(outputs.shape)))
  return jnp.mean(optax.sigmoid_binary_cross_entropy(outputs, labels.astype(outputs.dtype)))


def minimize(objective, params: Any, max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> Any:
  """`params` minimising the smooth `objective` by L-BFGS (optax's zoom line search)."""
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  def running(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    grad = optax.tree.get(state, 'grad')
    return (count == 0) | ((count < max_iterations) & (optax.tree.norm(grad) >= tolerance))

  return jax.lax.while_loop(running, step, (params, solver.init(params)))[0]


@functools.partial(jax.jit, static_argnames='task')
def fit_linear(x: jax.Array, labels: jax.Array, init: dict[str, jax.Array], strength: jax.Array, *,
               task: str) -> dict[str, jax.Array]:
  """Weights `w` (D, K) and bias `b` (K,) of the linear model minimising the objective from `init`.

  Compiled once per input shape: every strength and seed runs the same program.
  """
  objective = lambda p: task_loss(task, x @ p['w'] + p['b'], labels) + 0.5 * strength * jnp.sum(jnp.square(p['w']))
  return minimize(objective, init)


def fit_splits(task: str, num_outputs: int, splits: dict[str, tuple[np.ndarray, np.ndarray]],
               seeds: Sequence[int]) -> dict:
  """The linear model of `task` on `splits` (split -> (features, labels)), once per seed.

  The features are standardised with the train split's column statistics; per seed, the
  validation split picks the L2 strength and the test split is evaluated.

  Returns:
    A JSON-ready dict: `model`, `seeds`, `l2` (chosen per seed), `l2_grid`, `params`, and
    `validation` / `test` as {'mean', 'std', 'per_seed'} of each metric of `evaluate.compute_metrics`.
  """
  train = splits['train'][0].astype(np.float64)
  mean, std = train.mean(axis=0), train.std(axis=0)
  std[std == 0] = 1.0
  x = {split: ((features - mean) / std).astype(np.float32) for split, (features, _) in splits.items()}
  train_x, train_labels = jnp.asarray(x['train']), jnp.asarray(splits['train'][1])  # on the device once
  metrics = lambda split, p: evaluate.compute_metrics(task, x[split] @ p['w'] + p['b'], splits[split][1])
  chosen, validation, test = [], [], []
  for seed in seeds:
    # The regularisation path, strongest penalty first, each fit starting from the previous one's
    # minimum (near the next one's): far fewer L-BFGS iterations than from the seed's initial weights.
    params = {'w': 0.01 * jax.random.normal(jax.random.key(seed), (train_x.shape[1], num_outputs)),
              'b': jnp.zeros((num_outputs,))}
    path = []
    for strength in sorted(L2_GRID, reverse=True):
      params = fit_linear(train_x, train_labels, params, jnp.float32(strength), task=task)
      path.append((strength, jax.device_get(params)))
    # The best validation score; ties go to the stronger penalty, the first of the path.
    scores = [evaluate.score(task, metrics('validation', p)) for _, p in path]
    strength, best = path[int(np.argmax(scores))]
    chosen.append(strength)
    validation.append(metrics('validation', best))
    test.append(metrics('test', best))
  return {'model': MODELS[task], 'seeds': [int(s) for s in seeds], 'l2': chosen, 'l2_grid': list(L2_GRID),
          'params': int(best['w'].size + best['b'].size), 'validation': stats.summarize(validation),
          'test': stats.summarize(test)}


def fit(builder: Any, info: data.TaskInfo, modalities: Sequence[str], seeds: Sequence[int]) -> dict:
  """`fit_splits` on the flattened `modalities` of `builder`'s splits; the result gains `inputs` ('a+b')."""
  start = time.perf_counter()
  splits = {split: flat_features(builder, split, modalities) for split in ('train', 'validation', 'test')}
  result = {'inputs': '+'.join(modalities), **fit_splits(info.task, info.num_outputs, splits, seeds)}
  logging.info('reference %s on %s: test %s (%.1f s)', result['model'], result['inputs'],
               {k: round(v, 4) for k, v in result['test']['mean'].items()}, time.perf_counter() - start)
  return result


def fit_references(builder: Any, info: data.TaskInfo, teacher_modalities: Sequence[str],
                   student_modalities: Sequence[str], seeds: Sequence[int]) -> list[dict]:
  """The reference rows of a report: `fit` on the teacher's inputs, then on each student modality.

  Each row gains `of`: 'teacher' or 'student'.
  """
  rows = [{**fit(builder, info, list(teacher_modalities), seeds), 'of': 'teacher'}]
  return rows + [{**fit(builder, info, [m], seeds), 'of': 'student'} for m in dict.fromkeys(student_modalities)]
