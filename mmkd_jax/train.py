"""Training and evaluation jobs: teacher, baseline student, and the distillation comparison.

`train_and_evaluate(config, workdir)` runs `config.job`:
  - 'teacher': train the multimodal teacher in `workdir`.
  - 'student': train the unimodal student without distillation (the baseline).
  - 'distill': the main job: train the teacher if its checkpoint is missing, then the arms
    'student' (baseline) and 'distilled' over the seeds of `config.report.seeds` with the same
    budget, evaluate all on the test split and write report.json / report.md.

An arm's seeds train as one population (mmkd_jax/loop.py) in `<workdir>/<arm>`, each seed
logging to `<arm>/seed_<s>`; with `config.train.population=False` each seed is a run of its
own in `<arm>/seed_<s>`.
"""
import glob
import os
import shutil
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections

from mmkd_jax import checkpoint, console, data, distill, evaluate, loop, reference, report, runtime, step, validation
from mmkd_jax.errors import ConfigError

# Version of a run directory's layout, stored in its run.json: 2 = one checkpoint per population
# (loop.py). Directories of other layouts are refused, never mixed.
LAYOUT = 2


def run_fingerprint(config: ml_collections.ConfigDict, role: str, seed: int, distilled: bool) -> dict:
  """The config that shapes one run's checkpoints; a run dir never mixes two of them."""
  fingerprint = {
      'role': role, 'seed': seed, role: config[role].to_dict(),
      # Another dataset's options (config.data.arrays unless name='arrays') do not shape the run.
      'data': {k: v for k, v in config.data.to_dict().items()
               if k not in ('data_dir', 'manual_dir') and not (k == 'arrays' and config.data.name != 'arrays')},
      'train': {k: v for k, v in config.train.to_dict().items()
                if k not in ('log_every', 'eval_batch_size', 'skip_nonfinite', 'kernels', 'steps_per_call',
                             'device_data_max_mb', 'population')},
  }
  if distilled:
    fingerprint['teacher'] = config.teacher.to_dict()
    fingerprint['distill'] = {k: v for k, v in config.distill.to_dict().items()
                              if k not in ('teacher_dir', 'cache_teacher', 'cache_teacher_max_gb')}
  return current_fingerprint(fingerprint)


def current_fingerprint(fingerprint: dict) -> dict:
  """`fingerprint` as this version writes it: a distilled run's hparams only of the methods it uses
  (a newly added method's config line leaves it alone), each completed with its signature's
  defaults (a newly added hyperparameter at its default leaves it alone)."""
  if 'distill' in fingerprint:
    used = sorted({term.method for term in distill.parse_terms(fingerprint['distill']['terms'])})
    stored = fingerprint['distill'].get('hparams', {})
    hparams = {m: {**distill.METHODS.info(m).defaults, **stored.get(m, {})} for m in used
               if distill.METHODS.info(m).hparams}
    fingerprint = {**fingerprint, 'distill': {**fingerprint['distill'], 'hparams': hparams}}
  return fingerprint


def check_teacher_dir(config: ml_collections.ConfigDict, teacher_dir: str) -> None:
  """An explicit `config.distill.teacher_dir` must hold a finished teacher of this config's shape."""
  found = checkpoint.read_fingerprint(teacher_dir)
  has_checkpoint = os.path.isdir(os.path.join(teacher_dir, 'checkpoints')) and any(
      name.isdigit() for name in os.listdir(os.path.join(teacher_dir, 'checkpoints')))
  if found is not None and found.get('layout') != LAYOUT:
    raise ConfigError(f'config.distill.teacher_dir={teacher_dir!r} holds a teacher of an earlier mmkd_jax '
                      'version; train it again with configs/teacher.py or leave teacher_dir empty')
  if found is None or found.get('role') != 'teacher' or not has_checkpoint:
    raise ConfigError(f'config.distill.teacher_dir={teacher_dir!r} holds no trained teacher (run.json and '
                      'checkpoints); train one with configs/teacher.py or leave teacher_dir empty')
  wanted = run_fingerprint(config, 'teacher', found['seeds'][0], distilled=False)
  for section in ('teacher', 'data'):
    difference = checkpoint.first_difference(found[section], wanted[section], section)
    if difference:
      raise ConfigError(f'config.distill.teacher_dir={teacher_dir!r}: that teacher was trained with another '
                        f'config ({difference})')


def arm_fingerprint(config: ml_collections.ConfigDict, role: str, seeds: Sequence[int], distilled: bool) -> dict:
  """The config that shapes a population's checkpoints: `run_fingerprint` with the seeds and the layout."""
  fingerprint = run_fingerprint(config, role, seeds[0], distilled)
  del fingerprint['seed']
  return {**fingerprint, 'seeds': list(seeds), 'layout': LAYOUT}


def claim(config: ml_collections.ConfigDict, run_dir: str, fingerprint: dict) -> None:
  """`checkpoint.claim_run_dir`, refusing (or, with overwrite, replacing) runs of earlier layouts:
  a run.json without this layout, or sequential runs below a population's directory."""
  found = checkpoint.read_fingerprint(run_dir)
  nested = glob.glob(os.path.join(run_dir, 'seed_*', 'run.json'))
  if (found is not None and found.get('layout') != LAYOUT) or nested:
    if not config.overwrite:
      raise ConfigError(f'{run_dir} holds {"runs" if nested else "a run"} of another layout (an earlier '
                        'mmkd_jax version or config.train.population=False); use another --workdir or set '
                        '--config.overwrite=True to replace it')
    if jax.process_index() == 0:
      shutil.rmtree(run_dir)
  checkpoint.claim_run_dir(run_dir, fingerprint, config.overwrite, upgrade=current_fingerprint)


def train_run(config: ml_collections.ConfigDict, role: str, run_dir: str, seed: int, builder: Any,
              info: data.TaskInfo, teacher: tuple[nn.Module, Any] | None = None,
              terms: tuple[distill.Term, ...] = (), restore_only: bool = False) -> loop.RunResult:
  """Trains one model of `seed` in `run_dir` (logging there too), resuming its checkpoint, and
  evaluates it; see `loop.run_arm` for `teacher`, `terms` and `restore_only`."""
  if not restore_only:
    claim(config, run_dir, arm_fingerprint(config, role, (seed,), teacher is not None))
  return loop.run_arm(config, role, run_dir, (seed,), builder, info, [run_dir], teacher, terms, restore_only)[0]


def train_arm(config: ml_collections.ConfigDict, arm_dir: str, seeds: Sequence[int], builder: Any,
              info: data.TaskInfo, teacher: tuple[nn.Module, Any] | None = None,
              terms: tuple[distill.Term, ...] = ()) -> list[loop.RunResult]:
  """A student arm: every seed of `seeds`, as one population in `arm_dir` (config.train.population)
  or one run after another in `arm_dir/seed_<s>`. Seed s logs to `arm_dir/seed_<s>` either way."""
  log_dirs = [os.path.join(arm_dir, f'seed_{seed}') for seed in seeds]
  if not config.train.population:
    if os.path.exists(os.path.join(arm_dir, 'run.json')) and not config.overwrite:
      raise ConfigError(f'{arm_dir} holds a population run (config.train.population=True); use another '
                        '--workdir or set --config.overwrite=True to replace it')
    return [train_run(config, 'student', d, seed, builder, info, teacher, terms) for d, seed in zip(log_dirs, seeds)]
  claim(config, arm_dir, arm_fingerprint(config, 'student', seeds, teacher is not None))
  return loop.run_arm(config, 'student', arm_dir, seeds, builder, info, log_dirs, teacher, terms)


def latency(model: nn.Module, params: Any, info: data.TaskInfo, config: ml_collections.ConfigDict) -> float:
  """Median seconds of one jitted forward pass on a batch of `config.report.latency_batch_size`."""
  modalities = step.batch_modalities(model)
  batch = jax.tree.map(jnp.asarray, step.dummy_batch(info, modalities, config.report.latency_batch_size))
  fn = jax.jit(lambda p, b: model.apply({'params': p}, b)[0])
  return evaluate.measure_latency(fn, params['model'], batch, config.report.latency_repeats)


def load_data(config: ml_collections.ConfigDict) -> Any:
  """The dataset builder; on multi-host runs process 0 prepares it while the others wait."""
  if jax.process_index() == 0:
    builder = data.load_builder(config.data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('mmkd_jax: dataset prepared')
  if jax.process_index() != 0:
    builder = data.load_builder(config.data)
  return builder


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.job` in `workdir` (see the module docstring) and returns its results."""
  if 'study' in config:
    raise ConfigError('this config has a config.study grid: run it with `python -m mmkd_jax.study '
                      f'--config=...`; mmkd_jax.main runs one job (config.job, one of {", ".join(validation.JOBS)})')
  validation.check_config(config)
  workdir = validation.workdir_path(workdir)
  runtime.configure_host(config)
  runtime.initialize_distributed(config)
  builder = load_data(config)
  info = data.task_info(builder)
  validation.check_against_data(config, info)
  if config.job in ('teacher', 'student'):
    # The run's directory is the workdir: claim it before writing config.json there, since with
    # config.overwrite claiming deletes a run of another config (train_run's own claim then finds this one).
    claim(config, workdir, arm_fingerprint(config, config.job, (config.seed,), False))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  if config.job in ('teacher', 'student'):
    result = train_run(config, config.job, workdir, config.seed, builder, info)
    return {'validation': result.validation, 'test': result.test, 'params': result.num_params}

  seeds = validation.seeds(config)
  progress = console.Progress(3, 'run', 'job')
  progress.next(f'teacher ({config.teacher.modalities})' + (', restored' if config.distill.teacher_dir else ''))
  if config.distill.teacher_dir:
    check_teacher_dir(config, config.distill.teacher_dir)
    teacher = train_run(config, 'teacher', config.distill.teacher_dir, config.seed, builder, info, restore_only=True)
  else:
    teacher = train_run(config, 'teacher', os.path.join(workdir, 'teacher'), config.seed, builder, info)
  seeds_text = f"seeds {','.join(map(str, seeds))}" + (', one population' if config.train.population else '')
  progress.next(f'baseline students ({config.student.modality}; {seeds_text})')
  students = train_arm(config, os.path.join(workdir, 'student'), seeds, builder, info)
  progress.next(f'distilled students ({config.distill.terms}; {seeds_text})')
  runs = {'student': students,
          'distilled': train_arm(config, os.path.join(workdir, 'distilled'), seeds, builder, info,
                                 (teacher.model, teacher.params['model']), distill.parse_terms(config.distill.terms))}
  # Classical reference rows: linear models on the teacher's inputs and the student's, with the same seeds.
  references = reference.fit_references(builder, info, validation.teacher_modalities(config),
                                        [config.student.modality], seeds)
  results = report.build(
      config, info,
      teacher=teacher, students=runs['student'], distilled=runs['distilled'],
      teacher_latency=latency(teacher.model, teacher.params, info, config),
      student_latency=latency(runs['student'][0].model, runs['student'][0].params, info, config),
      references=references)
  if 'stopped_at_step' in results:
    logging.warning('stopped by a non-finite step (step each): %s', results['stopped_at_step'])
  report.write(results, workdir)
  logging.info('report written to %s', os.path.join(workdir, 'report.md'))
  return results
