"""Reference linear models: exact on linearly separable data, the inputs they see, the rows they give."""
import numpy as np
import pytest

from mmkd_jax import data, reference
from mmkd_jax.data import pipeline

SIZES = {'train': 300, 'validation': 100, 'test': 100}


def _separable(task: str, num_features: int = 6, seed: int = 0) -> tuple[dict, int]:
  """Splits of a task a linear model solves exactly: labels from a random linear map, with a margin."""
  rng = np.random.default_rng(seed)
  num_outputs = {'classification': 3, 'regression': 1, 'multilabel': 4}[task]
  weights = rng.normal(size=(num_features, num_outputs))
  x = rng.normal(size=(4000, num_features)).astype(np.float32)
  scores = x @ weights
  if task == 'classification':
    top = np.sort(scores, axis=1)
    keep, labels = top[:, -1] - top[:, -2] > 0.5, scores.argmax(1).astype(np.int32)
  elif task == 'regression':
    keep, labels = np.ones(len(x), bool), (scores[:, 0] + 0.3).astype(np.float32)
  else:
    keep, labels = np.abs(scores).min(1) > 0.3, (scores > 0).astype(np.int32)
  x, labels = x[keep], labels[keep]
  splits, start = {}, 0
  for split, size in SIZES.items():
    splits[split] = (x[start:start + size], labels[start:start + size])
    start += size
  return splits, num_outputs


def test_logistic_regression_is_exact_on_a_separable_task():
  splits, num_outputs = _separable('classification')
  result = reference.fit_splits('classification', num_outputs, splits, seeds=[0, 1, 2])
  assert result['model'] == 'multinomial logistic regression' and result['seeds'] == [0, 1, 2]
  assert result['test']['mean']['accuracy'] >= 0.99
  assert len(result['test']['per_seed']['accuracy']) == 3
  assert set(result['l2']) <= set(reference.L2_GRID)
  assert result['params'] == 6 * 3 + 3


def test_a_model_that_does_not_fit_fails_the_same_check(monkeypatch):
  splits, num_outputs = _separable('classification')
  # The weights stay at their random initial values: the accuracy check above must reject this.
  monkeypatch.setattr(reference, 'fit_linear', lambda x, labels, init, strength, task: init)
  result = reference.fit_splits('classification', num_outputs, splits, seeds=[0])
  assert result['test']['mean']['accuracy'] < 0.9


def test_ridge_and_per_label_logistic_regression_are_exact_on_linear_tasks():
  splits, num_outputs = _separable('regression')
  result = reference.fit_splits('regression', num_outputs, splits, seeds=[0])
  assert result['model'] == 'ridge regression'
  assert result['test']['mean']['mae'] < 0.05 and result['test']['mean']['corr'] > 0.999
  splits, num_outputs = _separable('multilabel')
  result = reference.fit_splits('multilabel', num_outputs, splits, seeds=[0])
  assert result['model'] == 'per-label logistic regression'
  accuracies = [v for k, v in result['test']['mean'].items() if k.endswith('_acc')]
  assert len(accuracies) == 4 and min(accuracies) >= 0.99


@pytest.fixture
def builder(tiny_config):
  return data.load_builder(tiny_config.data)


def test_flat_features_zero_the_padded_tokens(builder):
  x, labels = reference.flat_features(builder, 'validation', ['m1', 'm0'])
  batch = next(pipeline.eval_batches(builder, 'validation', ['m0', 'm1'], 32))
  n, length, width = batch['m0'].shape
  assert x.shape == (n, 2 * length * width) and x.dtype == np.float32
  np.testing.assert_array_equal(labels, batch['label'])
  m1 = x[:, :length * width].reshape(n, length, width)
  np.testing.assert_array_equal(m1[batch['m1_mask']], batch['m1'][batch['m1_mask']])
  assert not batch['m1_mask'].all() and not m1[~batch['m1_mask']].any()


def test_reference_rows_of_a_report(builder):
  info = data.task_info(builder)
  rows = reference.fit_references(builder, info, ['m0', 'm1'], ['m0'], seeds=[3, 5])
  assert [(r['of'], r['inputs']) for r in rows] == [('teacher', 'm0+m1'), ('student', 'm0')]
  for row in rows:
    assert row['seeds'] == [3, 5] and len(row['l2']) == 2
    assert set(row['test']['mean']) == {'accuracy', 'macro_f1'}
    assert all(0 <= v <= 1 for v in row['test']['per_seed']['accuracy'])
  assert rows[0]['params'] == 2 * rows[1]['params'] - info.num_outputs
