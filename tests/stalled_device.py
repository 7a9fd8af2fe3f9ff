"""A starved CPU device, on demand: a jitted data-parallel step over two CPU devices in which device 0's shard waits
WAIT seconds in a host callback before the cross-device all-reduce, as a device thread of a busy machine can.

  python tests/stalled_device.py WAIT project   # the devices chosen as a run chooses them (cpu_devices.configure)
  python tests/stalled_device.py WAIT bare      # two devices with XLA's own collective timeouts

Prints 'finished' and exits 0 when the step completes. XLA:CPU ends the process with SIGABRT when a thread has
waited at a collective for longer than its timeouts (20 s, then 40 s more).
"""
import sys
import time


def main(wait: float, mode: str) -> None:
  import jax
  if mode == 'project':
    from resnet_jax import config_base, cpu_devices
    config = config_base.cifar(20)
    config.cpu_devices = 2
    cpu_devices.configure(config)
  else:
    jax.config.update('jax_num_cpu_devices', 2)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  mesh = Mesh(np.asarray(jax.devices()[:2]), ('data',))

  def stall(index, x):
    if int(np.asarray(index).reshape(-1)[0]) == 0:
      time.sleep(wait)
    return np.asarray(x)

  def shard(x):
    index = jax.lax.axis_index('data')
    x = jax.pure_callback(stall, jax.ShapeDtypeStruct(x.shape, x.dtype), index, x)
    return jax.lax.psum(jnp.sum(x), 'data')  # the all-reduce the other device reaches first

  step = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P('data'), out_specs=P(), check_vma=False))
  print('sum', float(step(jnp.arange(8.0))), flush=True)
  print('finished', flush=True)


if __name__ == '__main__':
  main(float(sys.argv[1]), sys.argv[2])
