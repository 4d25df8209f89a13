"""Evaluation: predictions over a split, task metrics, the validation score and latency."""
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from mmkd_jax import metrics

Array = Any


def predict(predict_fn: Callable[[Any, dict], Array], params: Any, batches: Iterable[dict],
            put: Callable[[dict], dict]) -> tuple[np.ndarray, np.ndarray]:
  """Outputs and labels over `batches`, without the padding examples (weight 0)."""
  outputs, labels = [], []
  for batch in batches:
    real = batch['weight'] > 0
    outputs.append(np.asarray(predict_fn(params, put(batch)))[real])
    labels.append(batch['label'][real])
  return np.concatenate(outputs), np.concatenate(labels)


def compute_metrics(task: str, outputs: np.ndarray, labels: np.ndarray,
                    label_names: Sequence[str] = ()) -> dict[str, float]:
  """The task's metrics: accuracy and macro-F1 for classification, MulT's metrics otherwise.

  Multilabel metrics are per flag, named by `label_names` or, without them, by
  `metrics.multilabel_names`.
  """
  if task == 'classification':
    pred = outputs.argmax(-1)
    return {'accuracy': metrics.accuracy(pred, labels),
            'macro_f1': metrics.macro_f1(pred, labels, outputs.shape[-1])}
  if task == 'regression':
    return metrics.sentiment_metrics(outputs.reshape(-1), labels.reshape(-1))
  if task == 'multilabel':
    names = tuple(label_names) or metrics.multilabel_names(labels.shape[-1])
    return metrics.emotion_metrics(outputs, labels, names)
  raise ValueError(f'unknown task {task!r}; valid choices: classification, multilabel, regression')


# Metrics where a smaller value is the better one (all others: larger is better).
LOWER_IS_BETTER = ('mae',)


def score(task: str, values: dict[str, float]) -> float:
  """The higher-is-better number that picks the best checkpoint on the validation split."""
  if task == 'classification':
    return values['accuracy']
  if task == 'regression':
    return -values['mae']
  return float(np.mean([v for k, v in values.items() if k.endswith('_acc')]))


def measure_latency(fn: Callable[[Any, dict], Array], params: Any, batch: dict,
                    repeats: int = 50) -> float:
  """Median wall-clock seconds of one jitted call on `batch` (compiled and warmed up first)."""
  jax.block_until_ready(fn(params, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
