"""Host runtime settings that must be made before JAX starts its backends.

Measured on a 2-core CPU (benchmarks/README.md): with JAX's defaults every train step
runs on a worker thread, whose glibc arena cannot keep the step's large scratch buffer
(the benchmark teacher's is 109 MB), so malloc maps and unmaps it each step and the
step page-faults it back in: 27k page faults, about 40% of the teacher's step time.
Running the computation on the calling thread (main arena) and letting malloc keep freed
memory removes the faults. `config.host.cpu_devices` splits the CPU into several JAX
devices, so that the data-parallel step also spreads one model's work over the cores.
"""
import ctypes
import ctypes.util
import sys

import jax
import ml_collections

CPU_DISPATCH = ('auto', 'sync', 'async')

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
  """Makes glibc malloc serve blocks below `limit_bytes` from its heap and keep freed memory.

  Without this, blocks over malloc's mmap threshold are mapped fresh on every allocation
  and page-faulted in again. The cost is that the process keeps its peak heap. Returns
  False (and changes nothing) where the C library is not glibc.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):  # mallopt of other C libraries means other things
    return False
  mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)
  trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes)
  return bool(mmap_ok and trim_ok)


def configure_host(config: ml_collections.ConfigDict) -> None:
  """Applies `config.host` (see configs/default.py); call before any JAX computation."""
  host = config.host
  if host.cpu_devices:
    try:
      jax.config.update('jax_num_cpu_devices', host.cpu_devices)
    except RuntimeError:  # backends already started (e.g. a second run in one process)
      have = len(jax.devices('cpu'))
      if have != host.cpu_devices:
        raise ValueError(f'config.host.cpu_devices={host.cpu_devices} cannot take effect: JAX already '
                         f'started with {have} CPU device(s) in this process; set it in a fresh process '
                         'or use 0 to keep the current devices') from None
  sync = host.cpu_dispatch == 'sync' or (host.cpu_dispatch == 'auto' and host.cpu_devices <= 1)
  # Read when the CPU backend starts; a running backend keeps its setting.
  jax.config.update('jax_cpu_enable_async_dispatch', not sync)
  if host.keep_freed_memory:
    keep_freed_memory()
