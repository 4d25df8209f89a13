"""Step metrics accumulate by name, whatever runs came before in the process (issue: a study cell's
metrics merged into another cell's run)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mmkd_jax import data, distill, step, train


def test_merging_keeps_each_runs_metric_names_over_many_metric_sets():
  """Hundreds of metric sets with equal structure and other names: each merge returns its own names.

  With one `clu.metrics.Collection.create` class per set, jit's cache (keyed on a tree structure
  whose equality ignores the dataclass type) returned other sets' classes for a few percent of them.
  """
  for i in range(300):
    values = {'loss': jnp.float32(i), f'distill_level{i}_method': jnp.float32(2.0)}
    merged = step.merge_metrics(step.step_metrics(values), step.step_metrics(values))
    assert sorted(merged) == sorted(values), i
    assert step.compute_metrics(merged) == {'loss': float(i), f'distill_level{i}_method': 2.0}


@pytest.mark.slow
def test_study_ordered_runs_of_other_terms_log_their_own_terms(tiny_config, tmp_path):
  """Runs whose terms differ only in level, only in method, then in both, in the study's order
  (level sets outer, methods inner), repeated: every logged row carries its own run's terms."""
  builder = data.load_builder(tiny_config.data)
  info = data.task_info(builder)
  teacher = train.train_run(tiny_config, 'teacher', str(tmp_path / 'teacher'), 0, builder, info)
  tiny_config.train.num_steps, tiny_config.train.log_every, tiny_config.train.eval_every = 3, 1, 3
  grid = ['logits:kl:1', 'logits:contrastive:1', 'hidden:contrastive:1', 'hidden:mse:1',
          'logits:mse:1,pooled:cosine:1', 'pooled:contrastive:1,hidden:mse:1']
  for repeat in range(3):
    for i, spec in enumerate(grid):
      terms = distill.parse_terms(spec)
      run_dir = tmp_path / f'run_{repeat}_{i}'
      train.train_run(tiny_config, 'student', str(run_dir), repeat, builder, info,
                      teacher=(teacher.model, teacher.params['model']), terms=terms)
      with open(run_dir / 'metrics.jsonl') as f:
        rows = [json.loads(line) for line in f]
      assert len(rows) == 3
      for row in rows:
        logged = {key for key in row if key.startswith('distill_')}
        assert logged == {f'distill_{t.level}_{t.method}' for t in terms}, (spec, sorted(row))
        assert all(np.isfinite(row[key]) for key in logged)
