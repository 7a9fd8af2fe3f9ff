"""How many CPU devices a run gets: one per core by default, the most that fit the batch; the user's choice wins."""
import json
import os
import subprocess
import sys

import pytest

from resnet_jax import cpu_devices, errors, validation
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('batch,group,cores,expected', [
    (128, 64, 2, 2),   # the paper's CIFAR run on two cores: one BN group per device
    (128, 64, 4, 4),   # 32 per device, a group spans two devices
    (128, 64, 3, 2),   # 3 does not divide 128
    (96, 32, 4, 1),    # no count > 1 keeps every group on whole devices (and 500 is not divisible by 3)
    (32, 0, 16, 4),    # whole-batch BN: anything dividing 32 and the evaluation batch of 100
])
def test_the_largest_count_that_fits_the_batch_and_the_bn_groups(batch, group, cores, expected):
  c = tiny_config(batch_size=batch, bn_group_size=group, eval_batch_size=100 if batch == 32 else 500)
  assert cpu_devices.choose(c, cores) == expected
  assert validation.devices_fit(c, expected)
  assert all(not validation.devices_fit(c, n) for n in range(expected + 1, cores + 1))


def _devices_in_a_fresh_process(xla_flags=None, **overrides):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  code = ('import json, os, sys, jax\n'
          'from helpers import tiny_config\n'
          'from resnet_jax import cpu_devices\n'
          f'c = tiny_config(**{overrides!r})\n'
          'why = cpu_devices.configure(c)\n'
          'print(json.dumps([jax.device_count(), why, cpu_devices.choose(c, cpu_devices.cores()),\n'
          '                  os.environ.get("XLA_FLAGS", "")]))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  count, why, choice, flags = json.loads(out.stdout.strip().splitlines()[-1])
  return count, why, choice, flags


def test_a_run_gets_one_device_per_core_unless_told_otherwise():
  count, why, expected, _ = _devices_in_a_fresh_process()
  assert count == expected and why.startswith('one per core')
  count, why, _, flags = _devices_in_a_fresh_process(cpu_devices=1)
  assert (count, why) == (1, 'config.cpu_devices') and cpu_devices.COLLECTIVE_TIMEOUT_FLAG not in flags
  count, why, _, flags = _devices_in_a_fresh_process('--xla_force_host_platform_device_count=3')
  assert (count, why) == (3, 'set in the environment')
  assert f'{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}=-1' in flags  # several devices: they wait at collectives


def test_several_devices_wait_at_collectives_unless_the_user_set_the_timeout():
  count, _, _, flags = _devices_in_a_fresh_process(cpu_devices=2)
  assert count == 2 and flags == f'{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}=-1'
  own = f'{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}=90'
  count, _, _, flags = _devices_in_a_fresh_process(own, cpu_devices=2)
  assert count == 2 and flags == own  # the user's own XLA_FLAGS win


@pytest.mark.slow
def test_a_device_starved_at_the_all_reduce_aborts_under_xla_defaults_and_waits_under_ours():
  """The same step on two CPU devices, device 0 held 65 s in a host callback before the all-reduce (as a busy machine
  can starve it): XLA's own timeouts (20 s, then 40 s more) end the process with SIGABRT; with the devices chosen as
  a run chooses them it waits and finishes."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  script = os.path.join(REPO, 'tests', 'stalled_device.py')
  runs = {mode: subprocess.Popen([sys.executable, script, '65', mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for mode in ('bare', 'project')}
  outs = {mode: p.communicate(timeout=300) for mode, p in runs.items()}
  assert runs['bare'].returncode == -6, outs['bare']  # SIGABRT
  assert 'Termination timeout' in outs['bare'][1] and 'finished' not in outs['bare'][0]
  assert runs['project'].returncode == 0 and 'finished' in outs['project'][0], outs['project'][1][-2000:]


def test_negative_cpu_devices_is_refused():
  with pytest.raises(errors.USER_ERRORS, match='cpu_devices=-1 must be >= 0'):
    validation.validate(tiny_config(cpu_devices=-1), 4)
