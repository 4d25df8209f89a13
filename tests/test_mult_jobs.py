"""Teacher training, distillation and evaluation on small fake MulT pickles of each dataset."""
import pickle

import numpy as np
import pytest

from configs import mult
from mmkd_jax import train
from mmkd_jax.errors import ConfigError
from tests.conftest import shrink

WIDTHS = {'text': 12, 'audio': 5, 'vision': 7}


def _write_pickle(path, dataset: str, lengths: dict[str, int], seed: int = 0) -> None:
  """A file in MulT's layout: splits of text/audio/vision (N, L, F), labels and ids."""
  rng = np.random.default_rng(seed)
  data = {}
  for split, n in (('train', 32), ('valid', 16), ('test', 16)):
    arrays = {m: rng.normal(size=(n, length, WIDTHS[m])) for m, length in lengths.items()}
    arrays['audio'][:, :2] = 0.0  # front padding, as in MulT's files
    if dataset == 'iemocap':
      arrays['labels'] = np.eye(2)[rng.integers(0, 2, size=(n, 4))]
    else:
      arrays['labels'] = rng.uniform(-3, 3, size=(n, 1, 1))
    arrays['id'] = np.array([[f'v{i}'.encode()] for i in range(n)])
    data[split] = arrays
  with open(path, 'wb') as f:
    pickle.dump(data, f)


@pytest.mark.slow
@pytest.mark.parametrize('dataset, aligned, expected, job', [
    ('mosi', False, 'mae', 'student'),  # regression, one arm (a regression distill job: test_arrays_data)
    ('mosei_senti', True, 'acc7', 'student'),  # regression too: its data and metrics
    ('iemocap', True, 'happy_f1', 'distill'),  # multilabel
])
def test_each_mult_dataset_trains(tmp_path, dataset, aligned, expected, job):
  manual = tmp_path / 'manual'
  manual.mkdir()
  lengths = {'text': 6, 'audio': 6, 'vision': 6} if aligned else {'text': 5, 'audio': 9, 'vision': 7}
  _write_pickle(manual / f"{dataset}_data{'' if aligned else '_noalign'}.pkl", dataset, lengths)
  config = shrink(mult.get_config(dataset, job=job), str(tmp_path / 'data'))
  config.data.name = dataset
  config.data.manual_dir = str(manual)
  config.data.aligned = aligned
  config.teacher.modalities = 'text,audio,vision'
  config.student.modality = 'audio'
  config.distill.terms = 'hidden:mse:1.0,logits:l1:1.0,attention:mse:0.1'
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  per_arm = ([results['teacher']['test'], results['student']['mean'], results['distilled']['mean']]
             if job == 'distill' else [results['test']])
  for values in per_arm:
    assert expected in values and np.isfinite(values[expected])


def test_kl_on_regression_is_refused_before_training(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  _write_pickle(manual / 'mosi_data.pkl', 'mosi', {'text': 4, 'audio': 4, 'vision': 4})
  config = shrink(mult.get_config('mosi', job='distill'), str(tmp_path / 'data'))
  config.data.name = 'mosi'
  config.data.manual_dir = str(manual)
  config.teacher.modalities = 'text,audio,vision'
  config.student.modality = 'text'
  config.distill.terms = 'logits:kl:1.0'
  with pytest.raises(ConfigError, match="'logits/kl' needs class probabilities but the task of 'mosi' is regression"):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'teacher').exists()
