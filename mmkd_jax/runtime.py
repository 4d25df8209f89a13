"""Host runtime settings that must be made before JAX starts its backends: malloc, CPU devices
and dispatch (`config.host`), and jax.distributed (`config.distributed`).

With JAX's defaults every train step runs on a worker thread, whose glibc arena cannot keep
the step's large scratch buffer (the benchmark teacher's is 109 MB), so malloc maps and unmaps
it each step and the step page-faults it back in (`benchmarks/bench.py --host_tuning 0` times
the defaults).
Running the computation on the calling thread (main arena) and letting malloc keep freed
memory removes the faults. `config.host.cpu_devices` splits the CPU into several JAX
devices, so that the data-parallel step also spreads one model's work over the cores.
`config.host.compilation_cache_dir` keeps compiled programs on disk: compiling a train step takes
seconds on a CPU, and a re-run of the job and the study's cells compile exactly the same programs
again.
"""
import ctypes
import ctypes.util
import os
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache
import ml_collections

from mmkd_jax.errors import ConfigError

CPU_DISPATCH = ('auto', 'sync', 'async')
DISTRIBUTED_INITIALIZE = ('auto', 'always', 'never')
# Environment variables under which 'auto' starts jax.distributed (SLURM job, TPU pod on GKE / queued resources).
CLUSTER_ENV = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')

# Least recently used compiled programs are evicted from the cache beyond this size.
COMPILATION_CACHE_MAX_BYTES = 2 << 30
# Programs that compile faster than this are not cached: every cache write scans all entries to
# evict, so thousands of tiny eager-op programs would slow every write (a train step takes seconds).
COMPILATION_CACHE_MIN_COMPILE_S = 0.3

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
        raise ConfigError(f'config.host.cpu_devices={host.cpu_devices} cannot take effect: JAX already '
                          f'started with {have} CPU device(s) in this process; set it in a fresh process '
                          'or use 0 to keep the current devices') from None
  sync = host.cpu_dispatch == 'sync' or (host.cpu_dispatch == 'auto' and host.cpu_devices <= 1)
  # Read when the CPU backend starts; a running backend keeps its setting.
  jax.config.update('jax_cpu_enable_async_dispatch', not sync)
  if host.keep_freed_memory:
    keep_freed_memory()
  set_compilation_cache(host.compilation_cache_dir)


def set_compilation_cache(directory: str) -> None:
  """Persists every compiled XLA program in `directory` ('' = no cache) and loads it from there
  when the same program (same computation, shapes, flags and backend) is compiled again;
  this also takes effect in a process that has compiled before (tests, notebooks).
  """
  path = os.path.abspath(os.path.expanduser(directory)) if directory else None
  if path == jax.config.values['jax_compilation_cache_dir']:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', COMPILATION_CACHE_MIN_COMPILE_S)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_MAX_BYTES)
  # JAX opens its cache once, at the first compile after a directory is set; another directory (or
  # none) later in the same process needs it closed first.
  compilation_cache.reset_cache()


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts jax.distributed for multi-host runs, as `config.distributed` says.

  A set `coordinator_address` is where the processes meet (unless `initialize='never'`).
  Otherwise `initialize='auto'` starts it when a cluster variable (CLUSTER_ENV) is set and
  runs as one process elsewhere; 'always' starts it regardless and lets JAX detect the rest
  (this is what TPU VM slices made with `gcloud` need: their workers are found through the
  metadata server, not the environment); 'never' is one process.
  """
  settings = config.distributed
  if jax.distributed.is_initialized() or settings.initialize == 'never':
    return
  if settings.coordinator_address:
    # Cross-process collectives of CPU devices (only used when the devices are CPUs).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes or None,
                               None if settings.process_id < 0 else settings.process_id)
  elif settings.initialize == 'always':
    try:
      jax.distributed.initialize()
    except ValueError as error:  # JAX found no cluster to take the unset fields from
      raise ConfigError(f"config.distributed.initialize='always' but JAX detected no cluster ({error}); set "
                        'config.distributed.coordinator_address (with num_processes and process_id) or use '
                        "initialize='auto' or 'never'") from None
  elif any(key in os.environ for key in CLUSTER_ENV):
    jax.distributed.initialize()
