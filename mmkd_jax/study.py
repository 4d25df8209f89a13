"""The study: student modality x width x distillation level(s) x method, over seeds, in one command.

`python -m mmkd_jax.study --config=configs/study.py --workdir=/tmp/mmkd_study` runs the grid
of `config.study` (see configs/study.py) with the main job's pieces (multi-host start-up,
`train.load_data`, `train.train_run` for the teacher and `train.train_arm` for each arm, whose
seeds train as one population):

  1. the teacher (one per teacher config), in `config.distill.teacher_dir` or `<workdir>/teacher`,
     evaluated on the test split as is and with each of its modalities removed;
  2. per student (modality, width), the baseline arm (task loss only) in `baselines/<student>`;
  3. per cell (student, levels, method), the distilled arm in `runs/<cell>`, one term of weight 1
     per level, all with the same method; the best seed (by validation) is exported with
     `jax.export` for deployment.

Results are stored as JSON (`teacher.json`, `baselines/<student>.json`, `cells/<cell>.json`,
each written atomically once all its seeds are done), so an interrupted study run again
skips what is finished. The tables `study.csv` / `study.md` (and `study.json`, and PNG plots
when matplotlib is installed) are rewritten from those files at the end of every run.
"""
import csv
import dataclasses
import functools
import io
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from mmkd_jax import (checkpoint, cli, console, data, distill, evaluate, export, loop, plugins, reference, runtime,
                      stats, step, train, validation)
from mmkd_jax.data import pipeline
from mmkd_jax.errors import ConfigError
from mmkd_jax.registry import Registry

# Platforms `jax.export` can lower the exported students for.
EXPORT_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
PLOTS: Registry[Callable[[dict, str], None]] = Registry('plot')


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid cell: a student (modality, width) distilled at `levels` with `method`."""
  modality: str
  width: int
  levels: tuple[str, ...]
  method: str

  @property
  def student(self) -> str:
    return student_id(self.modality, self.width)

  @property
  def id(self) -> str:
    return f'{self.student}-{"+".join(self.levels)}-{self.method}'

  @property
  def terms(self) -> str:
    return ','.join(f'{level}:{self.method}:1.0' for level in self.levels)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The checked grid: runnable cells, skipped ones with reasons, and what it costs."""
  cells: tuple[Cell, ...]
  skipped: tuple[tuple[str, str], ...]  # ('levels x method', reason), for every student
  students: tuple[tuple[str, int], ...]  # (modality, width), in grid order
  seeds: tuple[int, ...]
  metrics: tuple[str, ...]
  platforms: tuple[str, ...]  # of the exported students
  num_runs: int


def student_id(modality: str, width: int) -> str:
  return f'{modality}-w{width}'


def _items(config: ml_collections.ConfigDict, key: str, example: str) -> list[str]:
  """The comma-separated entries of `config.study.<key>`: non-empty and without duplicates."""
  items = [s.strip() for s in str(config.study[key]).split(',') if s.strip()]
  if not items:
    raise ConfigError(f'config.study.{key} is empty; give comma-separated values such as {example!r}')
  for item in items:
    if items.count(item) > 1:
      raise ConfigError(f'config.study.{key}={config.study[key]!r} lists {item!r} twice')
  return items


def _integers(config: ml_collections.ConfigDict, key: str, example: str, minimum: int) -> tuple[int, ...]:
  items = _items(config, key, example)
  for item in items:
    if not item.isdigit() or int(item) < minimum:
      raise ConfigError(f'config.study.{key}: {item!r} is not an integer >= {minimum}; expected e.g. {example!r}')
  return tuple(int(item) for item in items)


def metric_names(info: data.TaskInfo) -> tuple[str, ...]:
  """The test metrics of the task, read off `evaluate.compute_metrics` on a dummy prediction."""
  labels = np.zeros((2,) if info.task == 'classification' else (2, info.num_outputs), np.int32)
  return tuple(evaluate.compute_metrics(info.task, np.zeros((2, info.num_outputs), np.float32), labels))


def skip_reason(levels: tuple[str, ...], method: str, task: str) -> str | None:
  """Why `method` makes no sense at every one of `levels` on `task`, or None if it does."""
  return distill.method_problem(levels, method, task)


def run_config(config: ml_collections.ConfigDict, modality: str, width: int,
               terms: str | None = None) -> ml_collections.ConfigDict:
  """The single-run config of a student (and its distillation terms) of the grid."""
  run = config.copy_and_resolve_references()
  run.job = 'distill'
  run.student.modality = modality
  run.student.width = width
  run.report.seeds = config.study.seeds
  if terms is not None:
    run.distill.terms = terms
  return run


def plan(config: ml_collections.ConfigDict, info: data.TaskInfo) -> Plan:
  """Checks the grid of `config.study` against the registries, the data and the budget.

  Every failure is a one-line ConfigError, raised before anything trains.
  """
  known = list(info.modalities)
  teacher_modalities = validation.teacher_modalities(config)
  modalities = _items(config, 'modalities', known[0])
  for m in modalities:
    if m not in known:
      raise ConfigError(f'config.study.modalities: {m!r} is unknown; valid choices: {", ".join(known)}')
    if m not in teacher_modalities:
      raise ConfigError(f'config.study.modalities: {m!r} is not one of the teacher\'s modalities '
                        f'{config.teacher.modalities!r}; the hidden and attention levels need its stream')
  widths = _integers(config, 'widths', f'{config.teacher.width},{config.teacher.width // 2}', 1)
  level_sets = []
  for combo in _items(config, 'levels', 'logits,hidden+logits'):
    levels = tuple(level.strip() for level in combo.split('+'))
    for level in levels:
      if level not in distill.LEVELS:
        raise ConfigError(f'config.study.levels: unknown distillation level {level!r} in {combo!r}; '
                          f'valid choices: {", ".join(distill.LEVELS.names())} (combine with +)')
    if len(set(levels)) != len(levels):
      raise ConfigError(f'config.study.levels: {combo!r} repeats a level')
    if set(levels) in [set(s) for s in level_sets]:
      raise ConfigError(f'config.study.levels: {combo!r} is listed twice')
    level_sets.append(levels)
  methods = _items(config, 'methods', 'kl,mse')
  methods = distill.METHODS.names() if methods == ['all'] else methods
  for method in methods:
    if method not in distill.METHODS:
      raise ConfigError(f'config.study.methods: unknown distillation method {method!r}; valid choices: '
                        f'all, {", ".join(distill.METHODS.names())}')
  seeds = _integers(config, 'seeds', '0,1', 0)
  all_metrics = metric_names(info)
  metrics = tuple(_items(config, 'metrics', all_metrics[0]))
  for metric in metrics:
    if metric not in all_metrics:
      raise ConfigError(f'config.study.metrics: {metric!r} is not a metric of the {info.task} task; '
                        f'valid choices: {", ".join(all_metrics)}')
  for name in (s.strip() for s in config.study.plots.split(',') if s.strip()):
    if name not in PLOTS:
      raise ConfigError(f'config.study.plots: unknown plot {name!r}; valid choices: {", ".join(PLOTS.names())}')
  platforms = tuple(_items(config, 'export_platforms', 'cpu'))
  for platform in platforms:
    if platform not in EXPORT_PLATFORMS:
      raise ConfigError(f'config.study.export_platforms: {platform!r} is unknown; valid choices: '
                        f'{", ".join(EXPORT_PLATFORMS)}')
  for key in ('max_runs', 'max_minutes', 'minutes_per_run'):
    if not config.study[key] > 0:
      raise ConfigError(f'config.study.{key}={config.study[key]!r} must be > 0')

  students = tuple((m, w) for m in modalities for w in widths)
  cells, skipped = [], []
  for levels in level_sets:
    for method in methods:
      reason = skip_reason(levels, method, info.task)
      if reason:
        skipped.append((f'{"+".join(levels)} x {method}', reason))
      else:
        cells += [Cell(m, w, levels, method) for m, w in students]
  if not cells:
    raise ConfigError(f'config.study: every cell of the grid is skipped ({skipped[0][1]}, ...); '
                      'add levels or methods that fit each other')
  cells.sort(key=lambda c: students.index((c.modality, c.width)))
  num_runs = (len(cells) + len(students)) * len(seeds) + 1
  breakdown = (f'{len(cells)} cells x {len(seeds)} seeds + {len(students)} baselines x {len(seeds)} seeds '
               '+ 1 teacher')
  if num_runs > config.study.max_runs:
    raise ConfigError(f'config.study.max_runs={config.study.max_runs}: the grid needs {num_runs} training runs '
                      f'({breakdown}); shrink the grid or raise the limit')
  minutes = num_runs * config.study.minutes_per_run
  if minutes > config.study.max_minutes:
    raise ConfigError(f'config.study.max_minutes={config.study.max_minutes}: the grid needs about {minutes:g} '
                      f'minutes ({num_runs} runs x config.study.minutes_per_run={config.study.minutes_per_run}); '
                      'shrink the grid or raise the limit')
  for cell in cells:
    cell_config = run_config(config, cell.modality, cell.width, cell.terms)
    try:
      validation.check_config(cell_config)
      validation.check_against_data(cell_config, info)
    except ConfigError as error:
      raise ConfigError(f'config.study cell {cell.id}: {error}') from None
  return Plan(tuple(cells), tuple(skipped), students, seeds, metrics, platforms, num_runs)


def remove_modality(batch: dict[str, np.ndarray], modality: str) -> dict[str, np.ndarray]:
  """`batch` with `modality` removed: its features zeroed and every token masked out."""
  return {**batch, modality: np.zeros_like(batch[modality]),
          f'{modality}_mask': np.zeros_like(batch[f'{modality}_mask'])}


def evaluate_without(result: loop.RunResult, builder: Any, info: data.TaskInfo,
                     config: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
  """Test metrics of the teacher `result` with each of its modalities missing at inference."""
  model = result.model
  predict_fn = jax.jit(lambda p, b: model.apply({'params': p}, b)[0])
  metrics = {}
  for modality in model.modalities:
    batches = (remove_modality(b, modality) for b in pipeline.eval_batches(
        builder, 'test', list(model.modalities), config.train.eval_batch_size))
    metrics[modality] = evaluate.compute_metrics(
        info.task, *evaluate.predict(predict_fn, result.params['model'], batches, lambda b: b))
  return metrics


def result_path(workdir: str, of: str | tuple[str, int] | Cell) -> str:
  """Where the stored result of the teacher ('teacher'), a baseline (modality, width) or a cell lives."""
  if isinstance(of, Cell):
    return os.path.join(workdir, 'cells', f'{of.id}.json')
  if isinstance(of, tuple):
    return os.path.join(workdir, 'baselines', f'{student_id(*of)}.json')
  return os.path.join(workdir, f'{of}.json')


def _fingerprints(config: ml_collections.ConfigDict, role: str, seeds: tuple[int, ...],
                  distilled: bool) -> dict[str, dict]:
  """Seed -> `train.run_fingerprint`: the config a stored result of these runs depends on."""
  return json.loads(json.dumps({str(s): train.run_fingerprint(config, role, s, distilled) for s in seeds}))


def _finished(path: str, fingerprints: dict[str, dict], overwrite: bool) -> dict | None:
  """The result stored at `path` if it comes from exactly these runs, else None (to be computed).

  Other seeds (an extended grid) are recomputed, as a new population: the arm's run directory
  refuses them unless config.overwrite.
  A result of another config is refused, as `train.train_run` refuses a run directory of one.
  """
  stored = checkpoint.read_json(path)
  if stored is None or set(stored['fingerprints']) != set(fingerprints):
    return None
  stored_prints = {seed: train.current_fingerprint(print_) for seed, print_ in stored['fingerprints'].items()}
  difference = checkpoint.first_difference(stored_prints, fingerprints)
  if difference and not overwrite:
    raise ConfigError(f'{path} holds results of another config ({difference}); use another --workdir or set '
                      '--config.overwrite=True to recompute them')
  return None if difference else stored


def _summary(runs: list[loop.RunResult], fingerprints: dict[str, dict], start: float, **fields) -> dict:
  """What a stored result holds: per-seed test and validation metrics and the step a non-finite one
  stopped each seed at (None: never), params, time, provenance."""
  return {**fields, 'seeds': [int(s) for s in fingerprints], 'test': [r.test for r in runs],
          'validation': [r.validation for r in runs], 'stopped_at': [r.stopped_at for r in runs],
          'params': runs[0].num_params,
          'seconds': time.perf_counter() - start, 'fingerprints': fingerprints}


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the study of `config.study` in `workdir` and writes its tables and plots."""
  if 'study' not in config:
    raise ConfigError('this config has no config.study grid (configs/study.py and configs/study_full.py define '
                      'one); run a single job with `python -m mmkd_jax.main --config=...`')
  plugins.load(config.plugins)  # before the data and the grid name what they register
  workdir = validation.workdir_path(workdir)
  validation.check_config(run_config(config, config.student.modality, config.student.width))  # config.host too
  runtime.configure_host(config)
  runtime.initialize_distributed(config)
  builder = train.load_data(config)
  info = data.task_info(builder)
  grid = plan(config, info)  # checks every cell's config
  if config.distill.teacher_dir:
    train.check_teacher_dir(config, config.distill.teacher_dir)
  teacher_dir = config.distill.teacher_dir or os.path.join(workdir, 'teacher')
  prints = {
      'teacher': _fingerprints(config, 'teacher', (config.seed,), False),
      **{s: _fingerprints(run_config(config, *s), 'student', grid.seeds, False) for s in grid.students},
      **{c: _fingerprints(run_config(config, c.modality, c.width, c.terms), 'student', grid.seeds, True)
         for c in grid.cells}}
  # What is left to do, decided before anything trains (a stored result of another config fails here).
  teacher_todo, students_todo, cells_todo = (
      [x for x in todo if _finished(result_path(workdir, x), prints[x], config.overwrite) is None]
      for todo in (['teacher'], grid.students, grid.cells))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info('study: %d cells (%d level x method pairs skipped) x %d seeds, %d training runs in all (about '
               '%.0f minutes); left to run: %d cells, %d baselines, %s', len(grid.cells), len(grid.skipped),
               len(grid.seeds), grid.num_runs, grid.num_runs * config.study.minutes_per_run, len(cells_todo),
               len(students_todo), 'the teacher' if teacher_todo else 'no teacher')

  @functools.cache
  def teacher() -> loop.RunResult:
    return train.train_run(config, 'teacher', teacher_dir, config.seed, builder, info,
                           restore_only=bool(config.distill.teacher_dir))

  progress = console.Progress(len(teacher_todo) + len(students_todo) + len(cells_todo), 'part', 'study')
  if teacher_todo:
    progress.next('the teacher')
    start = time.perf_counter()
    result = teacher()
    checkpoint.write_json(result_path(workdir, 'teacher'), {
        **_summary([result], prints['teacher'], start, modalities=list(result.model.modalities),
                   width=config.teacher.width, dir=teacher_dir),
        'latency_ms': 1e3 * train.latency(result.model, result.params, info, config),
        'missing': evaluate_without(result, builder, info, config)})

  for student in students_todo:
    progress.next(f'baseline {student_id(*student)} ({len(grid.seeds)} seeds)')
    start = time.perf_counter()
    student_config = run_config(config, *student)
    runs = train.train_arm(student_config, os.path.join(workdir, 'baselines', student_id(*student)), grid.seeds,
                           builder, info)
    checkpoint.write_json(result_path(workdir, student), {
        **_summary(runs, prints[student], start, id=student_id(*student), modality=student[0], width=student[1]),
        'latency_ms': 1e3 * train.latency(runs[0].model, runs[0].params, info, student_config)})

  for done, cell in enumerate(cells_todo, len(grid.cells) - len(cells_todo)):
    progress.next(f'cell {cell.id} ({done}/{len(grid.cells)} cells done)')
    start = time.perf_counter()
    runs = train.train_arm(run_config(config, cell.modality, cell.width, cell.terms),
                           os.path.join(workdir, 'runs', cell.id), grid.seeds, builder, info,
                           (teacher().model, teacher().params['model']), distill.parse_terms(cell.terms))
    best = max(range(len(runs)), key=lambda i: evaluate.score(info.task, runs[i].validation))
    export_path = os.path.join('export', f'{cell.id}.npz')
    os.makedirs(os.path.join(workdir, 'export'), exist_ok=True)
    export.export_student(
        runs[best].model, runs[best].params['model'], info.modalities[cell.modality],
        os.path.join(workdir, export_path),
        metadata={'cell': cell.id, 'seed': grid.seeds[best], 'task': info.task, 'num_outputs': info.num_outputs,
                  'label_names': list(info.label_names), 'test': runs[best].test},
        platforms=grid.platforms)
    checkpoint.write_json(result_path(workdir, cell), {
        **_summary(runs, prints[cell], start, id=cell.id, modality=cell.modality, width=cell.width,
                   levels=list(cell.levels), method=cell.method, terms=cell.terms),
        'export': export_path, 'export_seed': grid.seeds[best]})

  # Classical reference rows: linear models on the teacher's inputs and each student modality, the grid's seeds.
  references = reference.fit_references(builder, info, validation.teacher_modalities(config),
                                        [m for m, _ in grid.students], grid.seeds)
  results = collect(config, info, grid, workdir, references)
  write_tables(results, workdir)
  write_plots(results, config, workdir)
  logging.info('study written to %s', os.path.join(workdir, 'study.md'))
  return results


def _stats(per_seed: list[dict], metric: str) -> tuple[float, float]:
  values = [float(r[metric]) for r in per_seed]
  return float(np.mean(values)), float(np.std(values))


def _row(kind: str, name: str, inputs: str, width: int | None, per_seed: list[dict], metrics: tuple[str, ...],
         params: int, latency_ms: float | None, levels: str = '', method: str = '',
         baseline: list[dict] | None = None, interval: str = 'auto') -> dict:
  """One table row: mean and std (None for a single run) of each metric and, against `baseline` (the
  runs of the same seeds, in the same order), the paired gain: the mean of the per-seed differences,
  its interval (`stats.paired_difference`), whether that excludes 0 (all None without a baseline)."""
  row = {'kind': kind, 'model': name, 'inputs': inputs, 'width': width, 'levels': levels, 'method': method,
         'seeds': len(per_seed)}
  for metric in metrics:
    mean, std = _stats(per_seed, metric)
    row[f'{metric}_mean'] = mean
    row[f'{metric}_std'] = std if kind in ('baseline', 'distilled', 'reference') else None
  for metric in metrics:
    gain = (stats.paired_difference([r[metric] for r in per_seed], [r[metric] for r in baseline], interval)
            if baseline else dict.fromkeys(('mean', 'low', 'high', 'excludes_zero', 'interval')))
    row[f'gain_{metric}'] = gain['mean']
    for key in ('low', 'high', 'excludes_zero', 'interval'):
      row[f'gain_{metric}_{key}'] = gain[key]
  row['params'], row['latency_ms'] = params, latency_ms
  return row


def collect(config: ml_collections.ConfigDict, info: data.TaskInfo, grid: Plan, workdir: str,
            references: Sequence[dict] = ()) -> dict:
  """Reads the stored results of the grid into table rows, the best cell and its exported latency.

  `references` (`reference.fit_references` with the grid's seeds) become rows after the teacher's.
  """
  teacher = checkpoint.read_json(result_path(workdir, 'teacher'))
  baselines = {s: checkpoint.read_json(result_path(workdir, s)) for s in grid.students}
  cells = {c: checkpoint.read_json(result_path(workdir, c)) for c in grid.cells}
  metrics = grid.metrics
  interval = config.report.interval
  rows = [_row('teacher', 'teacher', '+'.join(teacher['modalities']), teacher['width'], teacher['test'],
               metrics, teacher['params'], teacher['latency_ms'])]
  for m, values in teacher['missing'].items():
    inputs = '+'.join(o for o in teacher['modalities'] if o != m)
    rows.append(_row('teacher_missing', f'teacher, {m} removed', inputs, teacher['width'], [values], metrics,
                     teacher['params'], teacher['latency_ms']))
  for r in references:
    per_seed = [{m: r['test']['per_seed'][m][i] for m in metrics} for i in range(len(r['seeds']))]
    rows.append(_row('reference', r['model'], r['inputs'], None, per_seed, metrics, r['params'], None))
  for (modality, width), b in baselines.items():
    rows.append(_row('baseline', b['id'], modality, width, b['test'], metrics, b['params'], b['latency_ms']))
    for cell, stored in cells.items():
      if (cell.modality, cell.width) == (modality, width):
        if stored['seeds'] != b['seeds']:
          raise ValueError(f'cell {cell.id} has seeds {stored["seeds"]}, its baseline {b["seeds"]}: no pairs')
        # Same architecture as the baseline: the same compiled forward pass, hence its latency.
        rows.append(_row('distilled', cell.id, modality, width, stored['test'], metrics, stored['params'],
                         b['latency_ms'], '+'.join(cell.levels), cell.method, baseline=b['test'],
                         interval=interval))
  best = max(cells, key=lambda c: np.mean([evaluate.score(info.task, v) for v in cells[c]['validation']]))
  export_path = os.path.join(workdir, cells[best]['export'])
  return {
      'dataset': config.data.name, 'task': info.task, 'teacher_modalities': config.teacher.modalities,
      'num_steps': config.train.num_steps, 'seeds': list(grid.seeds), 'metrics': list(metrics),
      'interval': {'setting': interval, 'method': stats.METHOD, 'confidence': stats.CONFIDENCE,
                   'min_seeds': stats.MIN_SEEDS, 'description': stats.describe(interval)},
      'latency_batch_size': config.report.latency_batch_size, 'rows': rows,
      'skipped': [{'cells': c, 'reason': r} for c, r in grid.skipped],
      'best': best.id,
      'export': {'path': cells[best]['export'], 'seed': cells[best]['export_seed'],
                 'bytes': os.path.getsize(export_path),
                 'latency_ms': 1e3 * exported_latency(export_path, info, config),
                 'in_memory_latency_ms': baselines[(best.modality, best.width)]['latency_ms']},
      'seconds': teacher['seconds'] + sum(r['seconds'] for r in [*baselines.values(), *cells.values()]),
  }


def exported_latency(path: str, info: data.TaskInfo, config: ml_collections.ConfigDict) -> float:
  """Median seconds of one call of the exported student at `path`, as `train.latency` measures."""
  student = export.load_exported(path)
  batch = step.dummy_batch(info, [student.modality], config.report.latency_batch_size)
  return evaluate.measure_latency(lambda _, b: student(b), None, batch, config.report.latency_repeats)


def _csv_value(value: Any) -> str:
  return '' if value is None else f'{value:.6g}' if isinstance(value, float) else str(value)


def _md_value(row: dict, metric: str) -> str:
  mean, std = row[f'{metric}_mean'], row[f'{metric}_std']
  return f'{mean:.4f}' if std is None else f'{mean:.4f} +- {std:.4f}'


def _md_gain(row: dict, metric: str) -> str:
  """The paired gain with its interval, '*' when that excludes 0; '-' without a baseline."""
  if row[f'gain_{metric}'] is None:
    return '-'
  return stats.format_difference({
      'mean': row[f'gain_{metric}'], 'low': row[f'gain_{metric}_low'], 'high': row[f'gain_{metric}_high'],
      'excludes_zero': row[f'gain_{metric}_excludes_zero'], 'interval': row[f'gain_{metric}_interval'],
      'differences': [None] * row['seeds']})


def markdown(results: dict) -> str:
  """study.md: the table, the skipped cells and the exported student."""
  metrics = results['metrics']
  header = (['model', 'inputs', 'width', 'levels', 'method'] + metrics + [f'gain {m}' for m in metrics]
            + ['params', f'latency (ms / batch of {results["latency_batch_size"]})'])
  lines = [
      f'# mmkd_jax study: {results["dataset"]}', '',
      f'Teacher on `{results["teacher_modalities"]}` (one run), evaluated whole and with each modality removed '
      '(its features zeroed and all its tokens masked). Reference rows: linear models on the flattened features '
      '(padded tokens 0), L2 strength chosen on the validation split, one fit per seed. Students and reference '
      f'rows: mean +- std over seeds {",".join(map(str, results["seeds"]))}, {results["num_steps"]} steps per '
      'run; a distilled cell at levels `a+b` adds one term of weight 1 per level, all with its method. Gain: '
      'distilled minus the baseline of the same modality and width at the same seed; the mean of these paired '
      f'differences and [its interval], * where the interval excludes 0. {results["interval"]["description"]} '
      'Test split, best validation checkpoint.', '',
      '| ' + ' | '.join(header) + ' |',
      '|---' * len(header) + '|',
  ]
  for row in results['rows']:
    lines.append('| ' + ' | '.join(
        [row['model'] if row['kind'] in ('teacher', 'teacher_missing', 'reference') else row['kind'],
         row['inputs'], '-' if row['width'] is None else str(row['width']), row['levels'] or '-',
         row['method'] or '-'] + [_md_value(row, m) for m in metrics] + [_md_gain(row, m) for m in metrics]
        + [f'{row["params"]:,}', '-' if row['latency_ms'] is None else f'{row["latency_ms"]:.3f}']) + ' |')
  e = results['export']
  lines += ['', f'Best cell by mean validation score: `{results["best"]}`. Its seed-{e["seed"]} student is '
            f'exported to `{e["path"]}` ({e["bytes"] / 1024:.0f} KiB of StableHLO with the weights inside; '
            '`mmkd_jax.export.load_exported` runs it with jax and NumPy only): '
            f'{e["latency_ms"]:.3f} ms per batch, in-memory jitted {e["in_memory_latency_ms"]:.3f} ms.']
  if results['skipped']:
    lines += ['', 'Skipped (levels x method, for every student): ' + '; '.join(
        f'{s["cells"]} ({s["reason"]})' for s in results['skipped']) + '.']
  lines += ['', f'Training time of the stored runs: {results["seconds"] / 60:.1f} minutes.', '']
  return '\n'.join(lines)


def write_tables(results: dict, workdir: str) -> None:
  """Writes study.json, study.csv (one row per model, empty where not applicable) and study.md."""
  checkpoint.write_json(os.path.join(workdir, 'study.json'), results)
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=list(results['rows'][0]))
  writer.writeheader()
  writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in results['rows'])
  checkpoint.write_text(os.path.join(workdir, 'study.csv'), table.getvalue())
  checkpoint.write_text(os.path.join(workdir, 'study.md'), markdown(results))


def write_plots(results: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the PNGs of `config.study.plots`, or warns and writes none without matplotlib."""
  names = [s.strip() for s in config.study.plots.split(',') if s.strip()]
  if not names:
    return
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.warning('matplotlib is not installed (pip install "mmkd_jax[plot]"): plots skipped, tables written')
    return
  for name in names:
    PLOTS.get(name)(results, os.path.join(workdir, f'study_{name}.png'))


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), layout='constrained')


@PLOTS.register('heatmap')
def heatmap(results: dict, path: str) -> None:
  """First metric of every cell, levels x methods; one panel per student, modalities x widths."""
  metric = results['metrics'][0]
  cells = [r for r in results['rows'] if r['kind'] == 'distilled']
  modalities, widths, levels, methods = (list(dict.fromkeys(r[key] for r in cells))
                                         for key in ('inputs', 'width', 'levels', 'method'))
  values = [r[f'{metric}_mean'] for r in cells]
  fig = _figure(1.5 + 1.1 * len(methods) * len(widths), 1.0 + 0.6 * len(levels) * len(modalities))
  axes = fig.subplots(len(modalities), len(widths), squeeze=False)
  for ax, (modality, width) in zip(axes.flat, [(m, w) for m in modalities for w in widths]):
    grid = np.full((len(levels), len(methods)), np.nan)
    for r in cells:
      if (r['inputs'], r['width']) == (modality, width):
        i, j = levels.index(r['levels']), methods.index(r['method'])
        grid[i, j] = r[f'{metric}_mean']
        dark = grid[i, j] < (min(values) + max(values)) / 2
        ax.text(j, i, f'{grid[i, j]:.3f}\n{r[f"gain_{metric}"]:+.3f}', ha='center', va='center', fontsize=7,
                color='white' if dark else 'black')
    for i, j in zip(*np.nonzero(np.isnan(grid))):
      ax.text(j, i, 'skipped', ha='center', va='center', fontsize=7, color='gray')
    image = ax.imshow(grid, cmap='viridis', vmin=min(values), vmax=max(values), aspect='auto')
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha='right')
    ax.set_yticks(range(len(levels)), levels)
    ax.set_title(f'{modality}, width {width}', fontsize=9)
  fig.colorbar(image, ax=axes, label=f'test {metric}')
  fig.suptitle(f'Mean test {metric} of each cell (second line: gain over the baseline)', fontsize=10)
  fig.savefig(path, dpi=120)


@PLOTS.register('latency')
def latency_plot(results: dict, path: str) -> None:
  """First metric against latency: teacher (whole and modality removed), baselines, distilled, exported."""
  metric = results['metrics'][0]
  fig = _figure(6.5, 4.5)
  ax = fig.subplots()
  styles = {'teacher': ('teacher', '*', 'tab:red', 140),
            'teacher_missing': ('teacher, a modality removed', 'X', 'tab:orange', 70),
            'baseline': ('baseline student', 's', 'tab:blue', 50),
            'distilled': ('distilled student', 'o', 'tab:green', 18)}
  for kind, (label, marker, color, size) in styles.items():
    rows = [r for r in results['rows'] if r['kind'] == kind]
    ax.scatter([r['latency_ms'] for r in rows], [r[f'{metric}_mean'] for r in rows], marker=marker, c=color,
               s=size, label=label, zorder=3)
    if kind != 'distilled':
      for r in rows:
        ax.annotate(r['model'], (r['latency_ms'], r[f'{metric}_mean']), fontsize=7, xytext=(4, 2),
                    textcoords='offset points')
  best = next(r for r in results['rows'] if r['model'] == results['best'])
  ax.scatter([results['export']['latency_ms']], [best[f'{metric}_mean']], marker='D', c='black', s=30,
             label=f'exported ({results["best"]})', zorder=4)
  ax.set_xlabel(f'latency (ms per batch of {results["latency_batch_size"]})')
  ax.set_ylabel(f'test {metric}')
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=120)



def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_logs()
  run_study(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags are defined only when run as a program, so importing this module next to main.py is fine.
  config_flags.DEFINE_config_file('config', None, 'Path to configs/study.py (or study_full.py); fields '
                                  'overridable as --config.study.methods=kl,mse.', lock_config=True)
  flags.DEFINE_string('workdir', '/tmp/mmkd_study', 'Where the runs, per-cell results, tables and plots go.')
  flags.mark_flags_as_required(['config'])
  cli.run(main)
