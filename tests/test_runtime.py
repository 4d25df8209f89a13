"""Host runtime settings: malloc keeps freed memory, CPU devices and dispatch follow config.host."""
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from configs import default
from mmkd_jax import runtime
from mmkd_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Mallocs, touches and frees a 100 MB block 5 times; prints the page faults of the last 4.
_FAULTS = textwrap.dedent('''
    import ctypes, resource, sys
    from mmkd_jax import runtime
    if sys.argv[1] == 'keep':
      assert runtime.keep_freed_memory()
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def touch():
      block = libc.malloc(100 << 20)
      ctypes.memset(block, 1, 100 << 20)
      libc.free(block)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _run(*args: str) -> str:
  result = subprocess.run([sys.executable, '-c', *args], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=300)
  return result.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning is Linux-only')
def test_keep_freed_memory_stops_refaulting_large_blocks():
  pages = (100 << 20) // 4096
  default_faults = int(_run(_FAULTS, 'default'))
  kept_faults = int(_run(_FAULTS, 'keep'))
  assert default_faults > 2 * pages  # each fresh 100 MB block is faulted in again
  assert kept_faults < pages // 10   # the freed block is reused from the heap


def test_cpu_devices_and_dispatch_follow_config():
  script = textwrap.dedent('''
      import sys, jax
      from configs import default
      from mmkd_jax import runtime
      config = default.get_config()
      config.host.cpu_devices = int(sys.argv[1])
      runtime.configure_host(config)
      print(len(jax.devices('cpu')), jax.config.values['jax_cpu_enable_async_dispatch'])
  ''')
  assert _run(script, '2') == '2 True'   # auto: async with several devices
  assert _run(script, '0') == '1 False'  # auto: sync with one


def test_cpu_devices_after_jax_started_is_a_clear_error():
  jax.devices()  # this process's backend is running
  config = default.get_config()
  config.host.cpu_devices = len(jax.devices('cpu')) + 1
  with pytest.raises(ConfigError, match=rf'config.host.cpu_devices={config.host.cpu_devices} cannot take effect'):
    runtime.configure_host(config)
  config.host.cpu_devices = len(jax.devices('cpu'))  # what is already there is fine
  runtime.configure_host(config)


@pytest.mark.parametrize('initialize, address, env, expected', [
    ('auto', '', {}, None),
    ('auto', '', {'SLURM_JOB_ID': '7'}, ()),
    ('auto', '', {'TPU_WORKER_HOSTNAMES': 'w0,w1'}, ()),
    ('always', '', {}, ()),
    ('auto', '10.0.0.1:1234', {}, ('10.0.0.1:1234', 4, 2)),
    ('always', '10.0.0.1:1234', {}, ('10.0.0.1:1234', 4, 2)),
    ('never', '10.0.0.1:1234', {'SLURM_JOB_ID': '7'}, None),
])
def test_initialize_distributed_follows_config(monkeypatch, initialize, address, env, expected):
  """jax.distributed starts with the given coordinator, by JAX's detection, or not at all."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: calls.append(args))
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)  # the gloo switch, not wanted in this process
  for key in runtime.CLUSTER_ENV:
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  config = default.get_config()
  config.distributed.update(initialize=initialize, coordinator_address=address, num_processes=4, process_id=2)
  runtime.initialize_distributed(config)
  assert calls == ([] if expected is None else [expected])


def test_initialize_always_without_a_cluster_names_the_fix(monkeypatch):
  def no_cluster():
    raise ValueError('coordinator_address should be defined.')
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', no_cluster)
  config = default.get_config()
  config.distributed.initialize = 'always'
  with pytest.raises(ConfigError) as error:
    runtime.initialize_distributed(config)
  message = str(error.value)
  assert '\n' not in message and "initialize='always'" in message
  assert 'coordinator_address should be defined' in message and "'never'" in message


# Compiles a step-like function after configure_host; prints the persistent-cache hits and misses.
_CACHE_USE = textwrap.dedent('''
    import sys, jax, jax.numpy as jnp
    from configs import default
    from mmkd_jax import runtime
    events = []
    jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    jax.jit(jnp.cos)(1.0)  # something compiled before the cache is set (as in a test or notebook)
    config = default.get_config()
    config.host.compilation_cache_dir = sys.argv[1]
    runtime.COMPILATION_CACHE_MIN_COMPILE_S = 0.0  # the program below compiles in milliseconds
    runtime.configure_host(config)
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8)))
    print(sum('cache_hits' in e for e in events), sum('cache_misses' in e for e in events))
''')


def test_compilation_cache_serves_a_program_compiled_in_an_earlier_process(tmp_path):
  cache = tmp_path / 'xla'
  hits, misses = map(int, _run(_CACHE_USE, str(cache)).split())
  assert hits == 0 and misses >= 1 and any(cache.iterdir())
  hits, misses = map(int, _run(_CACHE_USE, str(cache)).split())
  assert hits >= 1 and misses == 0


def test_empty_compilation_cache_dir_caches_nothing(tmp_path):
  hits, misses = map(int, _run(_CACHE_USE, '').split())
  assert hits == misses == 0


def test_compilation_cache_follows_a_changed_directory(tmp_path):
  script = textwrap.dedent('''
      import sys, jax, jax.numpy as jnp
      from configs import default
      from mmkd_jax import runtime
      runtime.COMPILATION_CACHE_MIN_COMPILE_S = 0.0
      config = default.get_config()
      for directory, fn in zip(sys.argv[1:], (jnp.sin, jnp.cos, jnp.tan)):
        config.host.compilation_cache_dir = directory
        runtime.configure_host(config)
        jax.jit(lambda x: fn(x) * 2)(jnp.ones(3))
      print('done')
  ''')
  first, second, off = tmp_path / 'first', tmp_path / 'second', ''
  assert _run(script, str(first), str(second), off) == 'done'
  # each step function went to the directory set when it was compiled, and none once the cache was off
  assert len(list(first.glob('jit__lambda-*-cache'))) == 1 and len(list(second.glob('jit__lambda-*-cache'))) == 1
