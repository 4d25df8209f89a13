"""Evaluation metrics in pure NumPy, computed on the host after the jitted forward pass.

The sentiment (CMU-MOSI, CMU-MOSEI) and emotion (IEMOCAP) metrics follow the names and
conventions of the MulT evaluation code (Tsai et al., 2019) and the papers that report
against it, so numbers are comparable; F1 is reimplemented here rather than taken
from scikit-learn, which the project does not depend on.
"""
import numpy as np

IEMOCAP_EMOTIONS = ('neutral', 'happy', 'sad', 'angry')


def _example_weights(weight: np.ndarray | None, size: int) -> np.ndarray:
  """Flat float64 weights (ones when `weight` is None), checked to be usable."""
  if size == 0:
    raise ValueError('metrics need at least one example')
  if weight is None:
    return np.ones(size)
  w = np.asarray(weight, np.float64).reshape(-1)
  if w.size != size:
    raise ValueError(f'weight has {w.size} entries, expected {size}')
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError('weights must be finite and non-negative')
  if w.sum() == 0:
    raise ValueError('all weights are 0')
  return w


def _classes(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flat integer predictions and labels; `pred` may carry a trailing score axis."""
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.ndim == label.ndim + 1:
    pred = pred.argmax(axis=-1)
  if pred.shape != label.shape:
    raise ValueError(f'pred has shape {pred.shape}, label has shape {label.shape}')
  return pred.reshape(-1).astype(np.int64), label.reshape(-1).astype(np.int64)


def accuracy(pred: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> float:
  """Weighted fraction of examples whose predicted class equals the label.

  `pred` holds class indices shaped like `label`, or scores with one more trailing
  axis (then its argmax is the prediction). `weight` (shaped like `label`) lets padded
  examples count 0.
  """
  pred, label = _classes(pred, label)
  w = _example_weights(weight, label.size)
  return float(np.sum(w * (pred == label)) / np.sum(w))


def _f1_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int,
                  weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-class F1 = 2TP / (2TP + FP + FN) from weighted counts, plus support and presence.

  A class is present when it occurs among the labels or the predictions (with nonzero
  weight); absent classes get F1 0 and are left out of the macro average, as in
  scikit-learn's default.
  """
  pred, label = _classes(pred, label)
  w = _example_weights(weight, label.size)
  for name, values in (('pred', pred), ('label', label)):
    if values.min() < 0 or values.max() >= num_classes:
      raise ValueError(f'{name} has classes outside [0, {num_classes})')
  hit = pred == label
  true_pos = np.bincount(label[hit], weights=w[hit], minlength=num_classes)
  support = np.bincount(label, weights=w, minlength=num_classes)
  predicted = np.bincount(pred, weights=w, minlength=num_classes)
  denominator = support + predicted  # = 2TP + FP + FN
  present = denominator > 0
  f1 = np.divide(2 * true_pos, denominator, out=np.zeros(num_classes), where=present)
  return f1, support, present


def macro_f1(pred: np.ndarray, label: np.ndarray, num_classes: int,
             weight: np.ndarray | None = None) -> float:
  """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
  f1, _, present = _f1_per_class(pred, label, num_classes, weight)
  return float(f1[present].mean())


def weighted_f1(pred: np.ndarray, label: np.ndarray, num_classes: int,
                weight: np.ndarray | None = None) -> float:
  """Mean of per-class F1 weighted by each class's (weighted) count among the labels.

  This is scikit-learn's `f1_score(label, pred, average='weighted')`, the F1 that the
  MulT line of work reports.
  """
  f1, support, _ = _f1_per_class(pred, label, num_classes, weight)
  return float(np.sum(f1 * support) / np.sum(support))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; NaN when either input is constant (it is undefined there)."""
  dx, dy = x - x.mean(), y - y.mean()
  scale = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
  return float(np.sum(dx * dy) / scale) if scale > 0 else float('nan')


def _binary(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
  """Accuracy and weighted F1 of boolean predictions; NaN when there are no examples."""
  if label.size == 0:
    return float('nan'), float('nan')
  return accuracy(pred, label), weighted_f1(pred, label, 2)


def sentiment_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
  """MOSI/MOSEI metrics for sentiment scores in [-3, 3] (one prediction per example).

  Keys:
    mae: mean absolute error.
    corr: Pearson correlation (NaN if predictions or labels are constant).
    acc2_nonzero, f1_nonzero: binary accuracy and weighted F1 over the examples whose
      label is not 0; positive means > 0 (for predictions too).
    acc2_ge0, f1_ge0: the same over all examples with positive meaning >= 0.
    acc7: accuracy of round(clip(x, -3, 3)) on both sides (7 classes).
    acc5: accuracy of round(clip(x, -2, 2)) on both sides (5 classes).
  Rounding is NumPy's half-to-even, as in MulT. The weighted F1 weights classes by
  their count among the labels. MulT's own `eval_mosei_senti` passes predictions and
  labels to scikit-learn in swapped order, weighting by predicted counts instead, so
  its F1 can differ slightly from this one (accuracy is unaffected).
  """
  pred = np.asarray(pred, np.float64).reshape(-1)
  label = np.asarray(label, np.float64).reshape(-1)
  if pred.size != label.size:
    raise ValueError(f'pred has {pred.size} values, label has {label.size}')
  if pred.size == 0:
    raise ValueError('metrics need at least one example')
  nonzero = label != 0
  acc2_nonzero, f1_nonzero = _binary(pred[nonzero] > 0, label[nonzero] > 0)
  acc2_ge0, f1_ge0 = _binary(pred >= 0, label >= 0)

  def rounded_accuracy(bound: float) -> float:
    return float(np.mean(np.round(np.clip(pred, -bound, bound))
                         == np.round(np.clip(label, -bound, bound))))

  return {
      'mae': float(np.mean(np.abs(pred - label))),
      'corr': _pearson(pred, label),
      'acc2_nonzero': acc2_nonzero,
      'f1_nonzero': f1_nonzero,
      'acc2_ge0': acc2_ge0,
      'f1_ge0': f1_ge0,
      'acc7': rounded_accuracy(3.0),
      'acc5': rounded_accuracy(2.0),
  }


def emotion_metrics(logits_or_pred: np.ndarray, label: np.ndarray,
                    names: tuple[str, ...] = IEMOCAP_EMOTIONS) -> dict[str, float]:
  """Per-flag accuracy and weighted F1 of multilabel outputs (`neutral_acc`, `neutral_f1`, ...).

  The model emits one logit per flag, in `names` order (IEMOCAP's four emotions by
  default), and a flag is predicted present when its logit is > 0; 0/1 predictions work
  unchanged. For IEMOCAP this equals MulT's argmax over a 2-way output when the logit is
  the difference of the two scores. `label` is (N, len(names)) of 0/1. Each flag is
  scored as its own binary task, with F1 weighted by label counts as MulT does.
  """
  scores, label = np.asarray(logits_or_pred), np.asarray(label)
  shape = (label.shape[0] if label.ndim else 0, len(names))
  if label.shape != shape or scores.shape != shape:
    raise ValueError(f'expected pred and label of shape (N, {shape[1]}), got '
                     f'{scores.shape} and {label.shape}')
  if not np.all((label == 0) | (label == 1)):
    raise ValueError('multilabel labels must be 0 or 1')
  pred = scores > 0
  metrics = {}
  for i, name in enumerate(names):
    metrics[f'{name}_acc'] = accuracy(pred[:, i], label[:, i])
    metrics[f'{name}_f1'] = weighted_f1(pred[:, i], label[:, i], 2)
  return metrics


def multilabel_names(num_flags: int) -> tuple[str, ...]:
  """Metric names of `num_flags` unnamed flags: IEMOCAP's emotions for 4, else 'label0', ...."""
  if num_flags == len(IEMOCAP_EMOTIONS):
    return IEMOCAP_EMOTIONS
  return tuple(f'label{i}' for i in range(num_flags))
