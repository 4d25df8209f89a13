"""Student export for deployment: one file of StableHLO (`jax.export`) that runs without this project.

`export_student` (training side) closes a trained unimodal student's parameters into a
function of its modality's features (B, L, F) and token mask (B, L) -> outputs (B, C),
exports it for a symbolic batch size and writes it, with a little JSON metadata, as one
.npz file (no pickle). `load_exported` (deployment side) reads it back and returns a
jitted callable. This module imports only jax and NumPy, never the models or the
training code, so it can be copied next to the exported file and used on its own.
Serialization needs the `flatbuffers` package (jax's optional dependency for it).
"""
import json
import os
from typing import Any, Sequence

import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from mmkd_jax.errors import ConfigError

Array = Any
# Written into every file; `load_exported` refuses any other.
FORMAT = 'mmkd_jax.export/1'


def export_student(model: Any, params: Any, feature_shape: tuple[int, int], path: str,
                   metadata: dict | None = None, platforms: Sequence[str] = ('cpu',)) -> None:
  """Writes `model` (a unimodal student, inference mode) with `params` frozen in to `path`.

  `feature_shape` is the (length, features) of the student's modality; the batch size
  stays symbolic, so the file serves any batch. The write is atomic (tmp + rename).
  """
  modality = model.modality
  length, features = feature_shape

  def outputs(x: Array, mask: Array) -> Array:
    return model.apply({'params': params}, {modality: x, f'{modality}_mask': mask})[0]

  batch, = export.symbolic_shape('batch')
  exported = export.export(jax.jit(outputs), platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((batch, length, features), jnp.float32),
      jax.ShapeDtypeStruct((batch, length), jnp.bool_))
  meta = {**(metadata or {}), 'format': FORMAT, 'modality': modality, 'length': length,
          'features': features, 'platforms': list(exported.platforms)}
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, stablehlo=np.frombuffer(bytes(exported.serialize()), np.uint8),
             metadata=np.array(json.dumps(meta)))
  os.replace(tmp, path)


class ExportedStudent:
  """A loaded student: `student(batch)` reads `batch[modality]` and `batch[modality + '_mask']`."""

  def __init__(self, exported: export.Exported, metadata: dict):
    self.exported = exported
    self.metadata = metadata
    self.modality: str = metadata['modality']
    self.device = device_for(exported.platforms)
    self._call = jax.jit(exported.call)

  def __call__(self, batch: dict[str, Array]) -> jax.Array:
    with jax.default_device(self.device):
      return self._call(jnp.asarray(batch[self.modality], jnp.float32),
                        jnp.asarray(batch[f'{self.modality}_mask'], jnp.bool_))


def device_for(platforms: Sequence[str]) -> jax.Device:
  """The first local device of the first of `platforms` present here (a CPU export runs on the
  host CPU also where JAX's default device is a GPU)."""
  for platform in platforms:
    try:
      return jax.local_devices(backend=platform)[0]
    except RuntimeError:  # no such backend here
      continue
  available = sorted({d.platform for d in jax.local_devices()} | {'cpu'})
  raise ConfigError(f'the student was exported for platforms {list(platforms)}, none of which is available '
                    f'here ({", ".join(available)}); export it again with one of those')


def load_exported(path: str) -> ExportedStudent:
  """Reads a file written by `export_student` and returns the student, ready to call."""
  with open(path, 'rb') as f, np.load(f, allow_pickle=False) as stored:
    metadata = json.loads(stored['metadata'].item())
    if metadata.get('format') != FORMAT:
      raise ConfigError(f'{path}: format {metadata.get("format")!r} is not {FORMAT!r}')
    exported = export.deserialize(bytearray(stored['stablehlo'].tobytes()))
  return ExportedStudent(exported, metadata)
