"""Tests of the NumPy metrics against values worked out by hand and direct counts."""
import math

import numpy as np
import pytest

from mmkd_jax import metrics


def test_accuracy_plain_weighted_and_from_scores():
  pred, label = np.array([0, 1, 2, 1]), np.array([0, 2, 2, 1])
  assert metrics.accuracy(pred, label) == 0.75
  assert metrics.accuracy(pred, label, weight=np.array([1, 1, 0, 1])) == pytest.approx(2 / 3)
  scores = np.eye(3)[pred] * 5 - 1
  assert metrics.accuracy(scores, label) == 0.75


def test_accuracy_rejects_bad_inputs():
  with pytest.raises(ValueError, match='shape'):
    metrics.accuracy(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match='all weights are 0'):
    metrics.accuracy(np.zeros(2), np.zeros(2), weight=np.zeros(2))
  with pytest.raises(ValueError, match='at least one'):
    metrics.accuracy(np.zeros(0), np.zeros(0))


def test_f1_by_hand():
  # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 2, FP 1 -> 0.8; class 2: TP 0 -> 0;
  # class 3 never occurs and is left out of the macro mean.
  pred, label = np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 2])
  assert metrics.macro_f1(pred, label, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
  assert metrics.weighted_f1(pred, label, 4) == pytest.approx((2 * 0.5 + 2 * 0.8) / 5)


def _counted_f1(pred, label, num_classes):
  """Per-class F1 from precision and recall, with Python loops over examples."""
  f1, support = [], []
  for c in range(num_classes):
    tp = sum(p == c and t == c for p, t in zip(pred, label))
    fp = sum(p == c and t != c for p, t in zip(pred, label))
    fn = sum(p != c and t == c for p, t in zip(pred, label))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    support.append(tp + fn)
  present = [c for c in range(num_classes) if c in set(pred) | set(label)]
  macro = sum(f1[c] for c in present) / len(present)
  weighted = sum(f * s for f, s in zip(f1, support)) / sum(support)
  return macro, weighted


@pytest.mark.parametrize('seed', range(5))
def test_f1_matches_direct_counts(seed):
  rng = np.random.default_rng(seed)
  pred, label = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
  macro, weighted = _counted_f1(pred.tolist(), label.tolist(), 6)
  assert metrics.macro_f1(pred, label, 6) == pytest.approx(macro)
  assert metrics.weighted_f1(pred, label, 6) == pytest.approx(weighted)


def test_integer_weights_equal_repeated_examples():
  rng = np.random.default_rng(7)
  pred, label, weight = rng.integers(0, 3, 30), rng.integers(0, 3, 30), rng.integers(0, 4, 30)
  repeated = (np.repeat(pred, weight), np.repeat(label, weight))
  assert metrics.accuracy(pred, label, weight) == pytest.approx(metrics.accuracy(*repeated))
  assert metrics.macro_f1(pred, label, 3, weight) == pytest.approx(metrics.macro_f1(*repeated, 3))
  assert metrics.weighted_f1(pred, label, 3, weight) == pytest.approx(
      metrics.weighted_f1(*repeated, 3))


def test_f1_rejects_classes_out_of_range():
  with pytest.raises(ValueError, match='outside'):
    metrics.macro_f1(np.array([0, 3]), np.array([0, 1]), 3)


def test_sentiment_metrics_by_hand():
  pred = np.array([2.6, 0.3, 0.2, -1.5, 0.0, 1.4])
  label = np.array([2.4, -1.0, 0.0, -2.0, 0.5, 1.0])
  got = metrics.sentiment_metrics(pred.reshape(-1, 1), label)
  assert got['mae'] == pytest.approx((0.2 + 1.3 + 0.2 + 0.5 + 0.5 + 0.4) / 6)
  assert got['corr'] == pytest.approx(np.corrcoef(pred, label)[0, 1])
  # Non-zero: drop example 2 (label 0). Positive means > 0, so pred 0.0 is negative.
  # Right: 0, 3, 5; wrong: 1 (false positive), 4 (false negative).
  assert got['acc2_nonzero'] == pytest.approx(3 / 5)
  # positive (support 3): TP 2, FP 1, FN 1 -> 2/3; negative (support 2): TP 1, FP 1, FN 1 -> 1/2.
  assert got['f1_nonzero'] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2) / 5)
  # >= 0: all examples, positive means >= 0, so label 0 and pred 0.0 are positive.
  # Only example 1 is wrong.
  assert got['acc2_ge0'] == pytest.approx(5 / 6)
  # positive (support 4): TP 4, FP 1 -> 8/9; negative (support 2): TP 1, FN 1 -> 2/3.
  assert got['f1_ge0'] == pytest.approx((4 * 8 / 9 + 2 * 2 / 3) / 6)
  # Rounded (half to even, -1.5 -> -2, 0.5 -> 0): pred [3, 0, 0, -2, 0, 1] vs
  # label [2, -1, 0, -2, 0, 1] within [-3, 3]; in [-2, 2] example 0 agrees too.
  assert got['acc7'] == pytest.approx(4 / 6)
  assert got['acc5'] == pytest.approx(5 / 6)


def test_sentiment_metrics_degenerate_cases():
  got = metrics.sentiment_metrics(np.ones(3), np.zeros(3))
  assert math.isnan(got['corr'])
  assert math.isnan(got['acc2_nonzero']) and math.isnan(got['f1_nonzero'])
  assert got['acc2_ge0'] == 1.0 and got['f1_ge0'] == 1.0
  with pytest.raises(ValueError, match='values'):
    metrics.sentiment_metrics(np.zeros(3), np.zeros(4))


def test_emotion_metrics_by_hand():
  label = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
  logits = np.array([[2.0, -1.0, -1.0, -3.0],
                     [0.5, 1.0, -2.0, -1.0],
                     [-1.0, -1.0, 3.0, 0.0],  # A logit of exactly 0 is not positive.
                     [-0.2, -1.0, -1.0, -0.1]])
  got = metrics.emotion_metrics(logits, label)
  assert set(got) == {f'{e}_{m}' for e in metrics.IEMOCAP_EMOTIONS for m in ('acc', 'f1')}
  # neutral: pred [1, 1, 0, 0] vs [1, 0, 0, 1]; each class has TP 1, FP 1, FN 1.
  assert got['neutral_acc'] == 0.5 and got['neutral_f1'] == pytest.approx(0.5)
  assert got['happy_acc'] == 1.0 and got['happy_f1'] == 1.0
  assert got['sad_acc'] == 1.0 and got['sad_f1'] == 1.0
  # angry: pred all 0 vs [0, 0, 0, 1]; class 0 (support 3) F1 6/7, class 1 F1 0.
  assert got['angry_acc'] == 0.75 and got['angry_f1'] == pytest.approx(3 * 6 / 7 / 4)
  assert metrics.emotion_metrics((logits > 0).astype(int), label) == got


def test_emotion_metrics_rejects_bad_shapes_and_labels():
  with pytest.raises(ValueError, match=r'\(N, 4\)'):
    metrics.emotion_metrics(np.zeros((3, 4, 2)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match='0 or 1'):
    metrics.emotion_metrics(np.zeros((2, 4)), np.full((2, 4), 2))


def test_report_names_the_modalities_and_says_which_gains_are_better_lower():
  from types import SimpleNamespace

  import ml_collections

  from mmkd_jax import report
  config = ml_collections.ConfigDict({
      'data': {'name': 'mosi'}, 'teacher': {'modalities': 'text,audio,vision'}, 'student': {'modality': 'audio'},
      'distill': {'terms': 'hidden:mse:1.0'}, 'report': {'seeds': '0,1', 'interval': 'auto', 'latency_batch_size': 8},
      'train': {'num_steps': 10}})
  run = lambda mae, corr: SimpleNamespace(test={'mae': mae, 'corr': corr}, num_params=10, stopped_at=None)
  results = report.build(config, SimpleNamespace(task='regression'), teacher=run(0.5, 0.9),
                         students=[run(1.0, 0.2), run(0.8, 0.4)], distilled=[run(0.7, 0.5), run(0.7, 0.3)],
                         teacher_latency=0.002, student_latency=0.001)
  text = report.markdown(results)
  assert '| teacher (text + audio + vision) | 0.5000 | 0.9000 |' in text
  assert '| student baseline (audio) | 0.9000 +- 0.1000 | 0.3000 +- 0.1000 |' in text
  assert ('mae -0.2000 (interval undefined: 2 seeds) (lower is better), corr +0.1000 (interval undefined: 2 seeds).'
          in text)
