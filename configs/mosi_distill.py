"""mosi: the teacher (trained first if missing), the baseline and the distilled unimodal student.

Choose the student with --config.student.modality=text|audio|vision.
"""
import ml_collections

from configs import mult


def get_config() -> ml_collections.ConfigDict:
  return mult.get_config('mosi', job='distill')
