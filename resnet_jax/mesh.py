"""The device mesh: which devices a run uses and how a batch is split over them.

Training is data-parallel: parameters are replicated, the example dimension of a batch is split over every mesh
axis, and `jax.jit` inserts the gradient all-reduce. One `data` axis over all devices by default; `config.mesh` can
name more axes (e.g. ('replica', 'data') on two slices or hosts, so the compiler reduces within each group first).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from resnet_jax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh(devices=None, mesh_config=None) -> Mesh:
  """The mesh of `config.mesh` (`axes` and `shape`, one -1 taking the remaining devices) over `devices` (default:
  every device of every process); one `data` axis when `mesh_config` is None."""
  devices = np.asarray(devices if devices is not None else jax.devices()).ravel()
  axes, shape = (DATA_AXIS,), (-1,)
  if mesh_config is not None:
    axes, shape = tuple(mesh_config.axes), tuple(int(d) for d in mesh_config.shape)
  if len(axes) != len(shape) or len(set(axes)) != len(axes) or shape.count(-1) > 1 or \
      any(d == 0 or d < -1 for d in shape):
    raise ConfigError(f'config.mesh: axes={axes} and shape={shape} need one distinct name per dimension and sizes '
                      '>= 1, with at most one -1 (the remaining devices); e.g. axes=("data",), shape=(-1,).')
  known = int(np.prod([d for d in shape if d != -1]))
  if devices.size % known or (-1 not in shape and known != devices.size):
    raise ConfigError(f'config.mesh.shape={shape} does not fit the {devices.size} devices: the sizes must multiply '
                      f'to {devices.size} (use -1 for one axis to take the rest).')
  return Mesh(devices.reshape(tuple(devices.size // known if d == -1 else d for d in shape)), axes)


def local_mesh() -> Mesh:
  """One `data` axis over this process's devices: where evaluation and BN recalibration run their own batches."""
  return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def batch_spec(mesh: Mesh) -> P:
  """The PartitionSpec of a batch: its example dimension split over every mesh axis, so each device holds
  global_batch / num_devices examples whatever the mesh's shape."""
  names = mesh.axis_names
  return P(names[0] if len(names) == 1 else tuple(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))
