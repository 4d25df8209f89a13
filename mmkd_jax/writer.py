"""Where a run's scalars go: metrics.jsonl (one JSON row per logged train step) and TensorBoard.

Every job (teacher, students, distilled students, the study's cells) writes through
`MetricWriter`, one per trained model. Only process 0 writes; on the others it does nothing.
"""
import json
import os

import jax
from tensorboardX import SummaryWriter


def drop_logged_steps_after(path: str, step: int) -> None:
  """Keeps the rows of the metrics.jsonl at `path` (if any) up to `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(rows)


class MetricWriter:
  """metrics.jsonl and TensorBoard events of one model in `directory`.

  A run resumed at `start_step` (after a hard kill) drops the rows and events past it, which
  it logs again.
  """

  def __init__(self, directory: str, start_step: int):
    self.directory = directory
    self._events = None
    if jax.process_index() == 0:
      os.makedirs(directory, exist_ok=True)
      self._events = SummaryWriter(directory, purge_step=start_step + 1 if start_step else None)
      drop_logged_steps_after(os.path.join(directory, 'metrics.jsonl'), start_step)

  def write_train(self, step: int, values: dict[str, float]) -> None:
    """A train row: metrics.jsonl and TensorBoard's train/ scalars."""
    if self._events is None:
      return
    self._scalars('train', step, values)
    with open(os.path.join(self.directory, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, **values}) + '\n')

  def write_validation(self, step: int, values: dict[str, float]) -> None:
    """TensorBoard's validation/ scalars."""
    if self._events is not None:
      self._scalars('validation', step, values)

  def _scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
    for key, value in values.items():
      self._events.add_scalar(f'{prefix}/{key}', value, step)

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
