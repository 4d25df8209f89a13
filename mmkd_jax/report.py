"""report.json and report.md of the distillation job: teacher vs baseline vs distilled student."""
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from mmkd_jax import evaluate


def summarize(runs: Sequence[Any]) -> dict:
  """Per-metric mean, std (population, over seeds) and the per-seed test values of `runs`."""
  keys = list(runs[0].test)
  values = {k: [float(r.test[k]) for r in runs] for k in keys}
  return {'mean': {k: float(np.mean(v)) for k, v in values.items()},
          'std': {k: float(np.std(v)) for k, v in values.items()},
          'per_seed': values}


def build(config: ml_collections.ConfigDict, info: Any, *, teacher: Any, students: Sequence[Any],
          distilled: Sequence[Any], teacher_latency: float, student_latency: float) -> dict:
  """Collects test metrics, parameter counts and latencies of the three arms."""
  student, dist = summarize(students), summarize(distilled)
  return {
      'dataset': config.data.name, 'task': info.task,
      'teacher_modalities': config.teacher.modalities, 'student_modality': config.student.modality,
      'terms': config.distill.terms, 'seeds': str(config.report.seeds), 'num_steps': config.train.num_steps,
      'latency_batch_size': config.report.latency_batch_size,
      'teacher': {'test': teacher.test, 'params': teacher.num_params, 'latency_ms': 1e3 * teacher_latency},
      'student': {**student, 'params': students[0].num_params, 'latency_ms': 1e3 * student_latency},
      'distilled': {**dist, 'params': distilled[0].num_params, 'latency_ms': 1e3 * student_latency},
      'gain': {k: dist['mean'][k] - student['mean'][k] for k in student['mean']},
      'param_ratio': teacher.num_params / students[0].num_params,
      'latency_ratio': teacher_latency / student_latency,
  }


def markdown(results: dict) -> str:
  """A readable table of `build`'s results."""
  keys = list(results['teacher']['test'])
  n = len(results['student']['per_seed'][keys[0]])
  lines = [
      f"# mmkd_jax report: {results['dataset']}",
      '',
      f"Teacher on `{results['teacher_modalities']}`; students on `{results['student_modality']}`; "
      f"distillation terms `{results['terms']}`; {results['num_steps']} steps per run; "
      f"students: mean +- std over {n} seeds ({results['seeds']}), the same seeds and budget for both arms; "
      'test split, best validation checkpoint.',
      '',
      '| model | ' + ' | '.join(keys) + ' | params | latency (ms / batch of '
      f"{results['latency_batch_size']}) |",
      '|---' * (len(keys) + 3) + '|',
      f"| teacher ({results['teacher_modalities'].replace(',', ' + ')}) | "
      + ' | '.join(f"{results['teacher']['test'][k]:.4f}" for k in keys)
      + f" | {results['teacher']['params']:,} | {results['teacher']['latency_ms']:.3f} |",
  ]
  for arm, label in (('student', 'student baseline'), ('distilled', 'distilled student')):
    r = results[arm]
    lines.append(f"| {label} ({results['student_modality']}) | "
                 + ' | '.join(f"{r['mean'][k]:.4f} +- {r['std'][k]:.4f}" for k in keys)
                 + f" | {r['params']:,} | {r['latency_ms']:.3f} |")
  lines += ['', 'Gain of distillation (distilled - baseline, means): '
            + ', '.join(f'{k} {v:+.4f}' + (' (lower is better)' if k in evaluate.LOWER_IS_BETTER else '')
                        for k, v in results['gain'].items()) + '.',
            f"Teacher / student: {results['param_ratio']:.2f}x parameters, "
            f"{results['latency_ratio']:.2f}x latency.", '',
            'Per-seed test values: ' + '; '.join(
                f"{arm} {k} {', '.join(f'{v:.4f}' for v in results[arm]['per_seed'][k])}"
                for arm in ('student', 'distilled') for k in keys) + '.', '']
  return '\n'.join(lines)


def write(results: dict, workdir: str) -> None:
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(results))
