"""The study job (mmkd_jax/study.py) at a size for 2 CPU cores on the embedded mfeat data.

Fourier-view students at the teacher's width and at half of it, distilled at the logits and
the hidden states with KL, MSE and contrastive losses, five seeds each (the report's, so every gain has
a 95% interval): 5 cells per student (KL on hidden states is skipped), 61 training runs of 400 steps,
each arm's seeds trained as one population: under 2 minutes on 2 CPU cores (docs/study.md).
Run: python -m mmkd_jax.study --config=configs/study.py --workdir=/tmp/mmkd_study
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  # Every cell is checked and trained as a 'distill' job of these settings.
  config.job = 'distill'
  # Budget of every run (teacher, baselines, distilled students).
  config.train.num_steps = 400
  config.train.log_every = 200
  config.train.eval_every = 100

  config.study = ml_collections.ConfigDict()
  # Student modalities (comma-separated), each one of config.teacher.modalities.
  config.study.modalities = 'fou'
  # Student widths (comma-separated): the teacher's and smaller; each must divide by config.student.num_heads.
  config.study.widths = f'{config.teacher.width},{config.teacher.width // 2}'
  # Distillation levels (comma-separated); 'a+b' is one cell with one term of weight 1 per level.
  config.study.levels = 'logits,hidden'
  # Methods (comma-separated names, or 'all' for every registered one); a cell uses one method at all its
  # levels, and a (level, method) pair that makes no sense (e.g. dkd below the logits) is skipped with a note.
  config.study.methods = 'kl,mse,contrastive'
  # Seeds of every student run, baselines and distilled alike (tables: mean +- std over them, and a
  # paired 95% interval of every gain from 3 seeds on, as config.report.interval says).
  config.study.seeds = '0,1,2,3,4'
  # Declared budget, checked before anything trains: at most this many training runs
  # (cells x seeds + baselines x seeds + 1 teacher, finished or not) ...
  config.study.max_runs = 61
  # ... and at most max_minutes of estimated time at minutes_per_run (measured on 2 CPU cores at this
  # config's num_steps with config.train.population on: 61 runs in 102-110 s; raise it for sequential
  # runs, and scale it with config.train.num_steps when you change those).
  config.study.minutes_per_run = 0.05
  config.study.max_minutes = 10.0
  # Test metrics of the tables (comma-separated); the first is the one plotted.
  config.study.metrics = 'accuracy,macro_f1'
  # PNG plots (comma-separated; '' = none): 'heatmap' (levels x methods), 'latency' (metric vs latency).
  config.study.plots = 'heatmap,latency'
  # Platforms the distilled students are exported for with jax.export (e.g. 'cpu,cuda').
  config.study.export_platforms = 'cpu'
  return config
