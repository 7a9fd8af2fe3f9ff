"""Tests run on the CPU with 4 virtual devices, so that sharded steps are exercised without accelerators."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in flags:
  flags = (flags + ' --xla_force_host_platform_device_count=4').strip()
# As a run with several CPU devices sets it (cpu_devices.wait_at_collectives): on a busy machine (pytest -n 2) a
# starved device thread waits at the all-reduce instead of aborting the test process.
if '--xla_cpu_collective_call_terminate_timeout_seconds' not in flags:
  flags += ' --xla_cpu_collective_call_terminate_timeout_seconds=-1'
os.environ['XLA_FLAGS'] = flags
