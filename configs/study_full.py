"""The full study (mmkd_jax/study.py) for a real machine: every level, every method, five seeds.

Students on the Fourier and the pixel views at configs/study.py's widths (the teacher's and half); single
levels and the two combinations with the logits; every registered method; 1,500 steps per run.
741 training runs; about 2.5 hours on 2 CPU cores by configs/study.py's measured rate per
member-step (an estimate, not a measurement), less on an accelerator.
Run: python -m mmkd_jax.study --config=configs/study_full.py --workdir=/tmp/mmkd_study_full
"""
import ml_collections

from configs import study


def get_config() -> ml_collections.ConfigDict:
  config = study.get_config()
  # Budget of every run (teacher, baselines, distilled students).
  config.train.num_steps = 1500
  config.train.log_every = 500
  # Student modalities (comma-separated), each one of config.teacher.modalities.
  config.study.modalities = 'fou,pix'
  # Distillation levels (comma-separated); 'a+b' is one cell with one term of weight 1 per level.
  config.study.levels = 'logits,pooled,hidden,attention,hidden+logits,attention+logits'
  # Every registered distillation method.
  config.study.methods = 'all'
  # Seeds of every student run.
  config.study.seeds = '0,1,2,3,4'
  # Declared budget: training runs, and minutes at minutes_per_run (configs/study.py's rate on 2 CPU
  # cores scaled to this num_steps; the pixel students and the attention level cost somewhat more).
  config.study.max_runs = 800
  config.study.minutes_per_run = 0.2
  config.study.max_minutes = 240.0
  return config
