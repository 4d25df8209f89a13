"""Orbax checkpoints of a run: a tree of arrays (the train state) and a JSON item beside it.

Each run directory keeps its latest checkpoint only: whatever must survive beyond it (a
population member's best parameters and their validation metrics) is part of what is saved.
Orbax writes to a temporary directory and renames it when complete, so a killed run never
leaves a half-written one.
"""
import json
import logging as py_logging
import os
import shutil
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

import orbax.checkpoint as ocp

from mmkd_jax.errors import ConfigError

def _not_orbax_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def quiet_orbax_logs() -> None:
  """Drops Orbax's per-save INFO chatter from the absl log so that progress lines stay readable."""
  logging.get_absl_handler().addFilter(_not_orbax_info)


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's default type handlers, except that a replicated array is written by one replica
  unless the job spans processes.

  Orbax by default splits every replicated array among the devices holding a copy, so that
  the hosts of a pod share the writing; within one process that only adds an eager slice per
  device and array, which adds up over the many small arrays of a run on several CPU devices.
  """
  arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  others = [t for t in ocp.type_handlers.supported_types() if t is not jax.Array]
  return ocp.type_handlers.create_type_handler_registry(
      (jax.Array, arrays), *[(t, ocp.type_handlers.get_type_handler(t)) for t in others])


def create_manager(directory: str) -> ocp.CheckpointManager:
  """A manager in `directory` that keeps the latest checkpoint."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  handlers = {'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
              'data': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Starts saving `state` (arrays) and `data_state` (JSON) at `step`.

  Orbax has the arrays on the host when this returns (on CPU as views that keep JAX from
  donating those buffers to the next step) and writes them in the background while training
  goes on; `manager.wait_until_finished()` before reading checkpoints back (`close()` waits too).
  """
  manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)))


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """Restores (state shaped like `target`, the JSON item) saved at `step`."""
  state = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  restored = manager.restore(step, args=ocp.args.Composite(state=state, data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def read_state(manager: ocp.CheckpointManager, step: int) -> dict:
  """The train state saved at `step` as a raw tree of NumPy arrays (no target needed)."""
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), manager.item_metadata(step)['state'].tree)
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=as_numpy)))['state']


def first_difference(old: Any, new: Any, path: str = '') -> str | None:
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      found = first_difference(old.get(key), new.get(key), f'{path}.{key}' if path else key)
      if found:
        return found
    return None
  return None if old == new else f'{path} was {old!r}, now {new!r}'


def claim_run_dir(run_dir: str, fingerprint: dict, overwrite: bool,
                  upgrade: Callable[[dict], dict] = lambda found: found) -> None:
  """Refuses to mix runs: `run_dir` may only hold checkpoints of the same `fingerprint`.

  The fingerprint (the config that shapes the run) is stored as run.json; `upgrade` brings one
  stored by an earlier version to the current form before they are compared. With `overwrite`,
  a run of another config is deleted first.
  """
  fingerprint = json.loads(json.dumps(fingerprint))
  found = read_fingerprint(run_dir)
  if found is not None:
    found = upgrade(found)
    difference = first_difference(found, fingerprint)
    if difference and not overwrite:
      raise ConfigError(f'{run_dir} holds a run of another config ({difference}); use another --workdir or '
                        'set --config.overwrite=True to replace it')
    if difference and jax.process_index() == 0:
      shutil.rmtree(run_dir)
  # On multi-host runs process 0 changes the (shared) directory while the others wait.
  if jax.process_index() == 0:
    write_json(os.path.join(run_dir, 'run.json'), fingerprint, sort_keys=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'mmkd_jax: claimed {run_dir}')


def read_fingerprint(run_dir: str) -> dict | None:
  return read_json(os.path.join(run_dir, 'run.json'))


def read_json(path: str) -> dict | None:
  """The JSON object at `path`, or None if there is no file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: dict, sort_keys: bool = False) -> None:
  """Writes `value` to `path` atomically (see `write_text`)."""
  write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys))


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a crash leaves the old file or none, never half of one)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f'{path}.tmp{os.getpid()}'  # one per process: the processes of a multi-host job may all write
  with open(temporary, 'w', newline='') as f:
    f.write(text)
  os.replace(temporary, path)
