"""The 'distill' job on the defaults of configs/default.py (see mmkd_jax/train.py)."""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.job = 'distill'
  return config
