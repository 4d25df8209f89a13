"""Shared settings for the MulT benchmarks (CMU-MOSI, CMU-MOSEI, IEMOCAP) on feature pickles.

Put the pickles in `config.data.manual_dir` (see docs/real_data.md). The teacher fuses text, audio
and vision; the student sees `config.student.modality` only. The per-dataset files
(mosei_teacher.py, mosei_distill.py, ...) call `get_config(dataset, job)`.
"""
import os

import ml_collections

from configs import default


def get_config(dataset: str = 'mosei_senti', job: str = 'distill') -> ml_collections.ConfigDict:
  config = default.get_config()
  config.job = job
  config.data.name = dataset
  # Directory holding the MulT pickles (<name>_data.pkl / <name>_data_noalign.pkl); never downloaded.
  config.data.manual_dir = os.path.expanduser(os.environ.get('MMKD_MANUAL_DIR', '~/mult_data'))
  # Word-aligned sequences (True) or the unaligned ones (False).
  config.data.aligned = True
  # COVAREP audio holds -inf values; MulT's loader sets them to 0 and so do we.
  config.data.zero_audio_neg_inf = True
  config.teacher.modalities = 'text,audio,vision'
  config.teacher.width = 40
  config.teacher.num_heads = 4
  config.teacher.num_cross_layers = 2
  config.teacher.num_self_layers = 1
  # Frames and words: one projection for every position (per-position maps suit tabular views).
  config.teacher.embedding = 'shared'
  # The one modality of the student: 'text', 'audio' or 'vision'.
  config.student.modality = 'text'
  config.student.width = 40
  config.student.num_heads = 4
  config.student.num_layers = 3
  config.student.embedding = 'shared'
  # Regression (MOSI/MOSEI) and multilabel (IEMOCAP) outputs are not class distributions: KL/DKD do not
  # apply at the logits level, MSE/L1 do. Hidden states transfer the teacher's fused text stream.
  config.distill.terms = 'hidden:mse:1.0,logits:mse:1.0'
  config.train.batch_size = 32
  config.train.eval_batch_size = 64
  config.train.num_steps = 4000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200
  config.train.log_every = 200
  config.train.eval_every = 500
  return config
