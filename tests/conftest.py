"""Tests run on the CPU with 4 virtual devices, so that sharded steps are exercised without accelerators."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in flags:
  os.environ['XLA_FLAGS'] = (flags + ' --xla_force_host_platform_device_count=4').strip()
