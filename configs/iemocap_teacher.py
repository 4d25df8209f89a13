"""iemocap: the text+audio+vision teacher alone."""
import ml_collections

from configs import mult


def get_config() -> ml_collections.ConfigDict:
  return mult.get_config('iemocap', job='teacher')
