"""report.json and report.md of the distillation job: teacher vs baseline vs distilled student, next to
linear reference models, with the paired statistics of every gain (mmkd_jax/stats.py)."""
import json
import os
from typing import Any, Sequence

import ml_collections

from mmkd_jax import evaluate, stats, validation


def summarize(runs: Sequence[Any]) -> dict:
  """Per-metric mean, std (population, over seeds) and the per-seed test values of `runs`."""
  return stats.summarize([r.test for r in runs])


def _paired(treated: dict, control: dict, interval: str) -> dict:
  """`stats.paired_difference` of every metric of two `summarize` results over the same seeds."""
  return {k: stats.paired_difference(treated['per_seed'][k], control['per_seed'][k], interval)
          for k in control['per_seed']}


def build(config: ml_collections.ConfigDict, info: Any, *, teacher: Any, students: Sequence[Any],
          distilled: Sequence[Any], teacher_latency: float, student_latency: float,
          references: Sequence[dict] = ()) -> dict:
  """Collects test metrics, parameter counts and latencies of the three arms, the paired statistics of
  the gain and the `references` rows (`reference.fit_references`, fitted with the same seeds).

  `students[i]` and `distilled[i]` are the runs of seed i of `config.report.seeds`; each gain is
  paired by seed (`stats.paired_difference`, its interval as `config.report.interval` asks).
  """
  seeds = list(validation.seeds(config))
  student, dist = summarize(students), summarize(distilled)
  interval = config.report.interval
  results = {
      'dataset': config.data.name, 'task': info.task,
      'teacher_modalities': config.teacher.modalities, 'student_modality': config.student.modality,
      'terms': config.distill.terms, 'seeds': str(config.report.seeds), 'num_steps': config.train.num_steps,
      'latency_batch_size': config.report.latency_batch_size,
      'teacher': {'test': teacher.test, 'params': teacher.num_params, 'latency_ms': 1e3 * teacher_latency},
      'student': {**student, 'params': students[0].num_params, 'latency_ms': 1e3 * student_latency},
      'distilled': {**dist, 'params': distilled[0].num_params, 'latency_ms': 1e3 * student_latency},
      'gain': {k: dist['mean'][k] - student['mean'][k] for k in student['mean']},
      'interval': {'setting': interval, 'method': stats.METHOD, 'confidence': stats.CONFIDENCE,
                   'min_seeds': stats.MIN_SEEDS, 'description': stats.describe(interval)},
      'gain_paired': _paired(dist, student, interval),
      'references': list(references),
      'param_ratio': teacher.num_params / students[0].num_params,
      'latency_ratio': teacher_latency / student_latency,
  }
  for row in references:
    if row['seeds'] != seeds:
      raise ValueError(f'reference on {row["inputs"]} was fitted with seeds {row["seeds"]}, the report has {seeds}')
  # Members a non-finite step stopped (config.train.skip_nonfinite=False): their best checkpoint predates it.
  stopped = {f'{arm}/seed_{seed}': run.stopped_at for arm, runs in (('student', students), ('distilled', distilled))
             for seed, run in zip(seeds, runs) if run.stopped_at is not None}
  if stopped:
    results['stopped_at_step'] = stopped
  own = [r for r in references if r['of'] == 'student' and r['inputs'] == config.student.modality]
  if own:
    # The students against the linear model on their own view, paired by seed like the gain.
    results['versus_reference'] = {arm: _paired(results[arm], own[0]['test'], interval)
                                   for arm in ('student', 'distilled')}
  return results


def _lower(key: str) -> str:
  return ' (lower is better)' if key in evaluate.LOWER_IS_BETTER else ''


def _significance(paired: dict[str, dict]) -> str:
  """Which intervals exclude 0, or why there are none."""
  first = next(iter(paired.values()))
  if first['interval'] == 'none':
    return 'No interval computed (config.report.interval=none).'
  if first['interval'] == 'undefined' and len(first['differences']) < stats.MIN_SEEDS:
    n = len(first['differences'])
    return f'The interval is undefined with {n} seed{"s" * (n > 1)}: at least {stats.MIN_SEEDS} are needed.'
  excluding = [k for k, v in paired.items() if v['excludes_zero']]
  if not excluding:
    return 'Every interval includes 0: no significant difference.'
  return f'Intervals that exclude 0 (*): {", ".join(excluding)}.'


def markdown(results: dict) -> str:
  """A readable table of `build`'s results."""
  keys = list(results['teacher']['test'])
  n = len(results['student']['per_seed'][keys[0]])
  lines = [
      f"# mmkd_jax report: {results['dataset']}",
      '',
      f"Teacher on `{results['teacher_modalities']}`; students on `{results['student_modality']}`; "
      f"distillation terms `{results['terms']}`; {results['num_steps']} steps per run; "
      f"students and reference models: mean +- std over {n} seeds ({results['seeds']}), the same seeds and "
      'budget for both student arms; test split, best validation checkpoint.',
      '',
      '| model | ' + ' | '.join(keys) + ' | params | latency (ms / batch of '
      f"{results['latency_batch_size']}) |",
      '|---' * (len(keys) + 3) + '|',
      f"| teacher ({results['teacher_modalities'].replace(',', ' + ')}) | "
      + ' | '.join(f"{results['teacher']['test'][k]:.4f}" for k in keys)
      + f" | {results['teacher']['params']:,} | {results['teacher']['latency_ms']:.3f} |",
  ]
  for row in results['references']:
    lines.append(f"| {row['model']} ({row['inputs'].replace('+', ' + ')}) | "
                 + ' | '.join(f"{row['test']['mean'][k]:.4f} +- {row['test']['std'][k]:.4f}" for k in keys)
                 + f" | {row['params']:,} | - |")
  for arm, label in (('student', 'student baseline'), ('distilled', 'distilled student')):
    r = results[arm]
    lines.append(f"| {label} ({results['student_modality']}) | "
                 + ' | '.join(f"{r['mean'][k]:.4f} +- {r['std'][k]:.4f}" for k in keys)
                 + f" | {r['params']:,} | {r['latency_ms']:.3f} |")
  lines += ['', 'Gain of distillation (distilled - baseline at the same seed: mean of the per-seed differences '
            'and its interval): ' + ', '.join(f'{k} {stats.format_difference(v)}{_lower(k)}'
                                                for k, v in results['gain_paired'].items()) + '. '
            + _significance(results['gain_paired']) + ' ' + results['interval']['description']]
  if results['references']:
    lines += ['', 'Reference rows: ' + ', '.join(dict.fromkeys(r['model'] for r in results['references']))
              + ' on the flattened features (padded tokens 0, standardised with train statistics), fitted '
              'with L-BFGS per seed; the L2 strength chosen on the validation split.', '']
  for row in results['references']:
    if row['of'] == 'teacher':
      lines.append(f'- Teacher - {row["model"]} on {row["inputs"]} (one teacher run, the mean over seeds): '
                   + ', '.join(f'{k} {results["teacher"]["test"][k] - row["test"]["mean"][k]:+.4f}{_lower(k)}'
                               for k in keys) + '.')
  if 'versus_reference' in results:
    model = next(r['model'] for r in results['references'] if r['inputs'] == results['student_modality'])
    for arm, label in (('student', 'Baseline'), ('distilled', 'Distilled')):
      paired = results['versus_reference'][arm]
      lines.append(f'- {label} student - {model} on {results["student_modality"]} (same seed): '
                   + ', '.join(f'{k} {stats.format_difference(v)}{_lower(k)}' for k, v in paired.items()) + '.')
  lines += ['', f"Teacher / student: {results['param_ratio']:.2f}x parameters, "
            f"{results['latency_ratio']:.2f}x latency.", '',
            'Per-seed test values: ' + '; '.join(
                f"{arm} {k} {', '.join(f'{v:.4f}' for v in results[arm]['per_seed'][k])}"
                for arm in ('student', 'distilled') for k in keys) + '.', '']
  if 'stopped_at_step' in results:
    lines += ['Stopped by a non-finite step (their results are of the best checkpoint before it): '
              + ', '.join(f'{run} at step {at}' for run, at in results['stopped_at_step'].items()) + '.', '']
  return '\n'.join(lines)


def write(results: dict, workdir: str) -> None:
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown(results))
