"""Ways of writing parts of the network that the paper does not care about and XLA does.

models.py reads as the paper; what it computes here is the same function, written so that XLA compiles it well.
Each piece says what it buys and on which backend. Tests in tests/test_models.py check that each one has the same
values and gradients as the plain form, and keep the compiled property it exists for.

  relu                           all backends: XLA stores each block output once (a faster backward on deep nets;
                                 measured in docs/performance.md).
  conv_with_explicit_gradients   XLA:CPU, inside a loop body only: gradient convolutions in the layout of its fast
                                 kernels (docs/performance.md).
  scanned_blocks                 all backends, compile time: a stage's identical blocks as one `nn.scan`, so
                                 ResNet-1202 compiles in seconds instead of minutes (config.model.scan_blocks).
  StepCaller                     GPUs and TPUs: config.steps_per_call > 1 steps in one device-side loop, so a fast
                                 accelerator is not held up by Python dispatching each step.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import flax.linen as nn

from resnet_jax import mesh as mesh_lib

ModuleDef = Any


def relu(x):
  """max(x, 0), written as x * (x > 0) so that XLA stores each block's output once instead of recomputing it.

  The same values and the same gradient as `nn.relu` (bitwise; NaN still propagates), but a two-operand product
  where `max(x, 0)` is a one-operand op. XLA's fusion pass freely duplicates one-operand elementwise ops into every
  consumer; with `max` it rebuilt each residual-stream activation from all earlier blocks' convolution outputs
  inside the backward pass (one fusion per block reading every earlier block of the stage), so the CPU step time
  grew with the square of the depth. A two-operand op with a consumer that cannot fuse it (the next convolution)
  is computed once. `tests/test_models.py::test_backward_work_per_block_does_not_grow_with_depth` keeps it so.
  """
  return x * (x > 0).astype(x.dtype)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stride1_conv(x, w, padding, precision):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


def _stride1_conv_fwd(x, w, padding, precision):
  return _stride1_conv(x, w, padding, precision), (x, w)


def _stride1_conv_bwd(padding, precision, residuals, dy):
  x, w = residuals
  # Input gradient: dy convolved with the spatially flipped kernel, input and output features swapped.
  back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape[:2], padding))
  w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = lax.conv_general_dilated(dy, w_flipped, (1, 1), back, dimension_numbers=_NHWC, precision=precision)
  # Kernel gradient: a convolution over the batch, written with the batch as the feature axis:
  # dw[kh, kw, ci, co] = sum_{n, h, w} x_padded[n, h + kh, w + kw, ci] * dy[n, h, w, co].
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), padding,
                                dimension_numbers=_NHWC, precision=precision)
  return dx, dw.transpose(1, 2, 0, 3)


_stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)


def conv_with_explicit_gradients(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                 dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)` whose stride-1 NHWC gradients are written out
  as two convolutions in the one layout XLA's CPU backend sends to its fast kernels (batch-spatial-feature input,
  HWIO kernel).

  Used inside the scanned blocks (`scan_blocks=True`). There, autodiff's own gradient convolutions keep layouts
  that XLA:CPU does not rewrite inside a loop body, and it ran them with its slow generic loop: a scanned ResNet-56
  step took many times longer (docs/performance.md). The values are the same (`tests/test_models.py`); other
  convolutions (strided, dilated, grouped) fall through to `lax.conv_general_dilated` unchanged.
  """
  unit = lambda v: v is None or all(d == 1 for d in v)
  if (all(s == 1 for s in window_strides) and unit(lhs_dilation) and unit(rhs_dilation)
      and feature_group_count == 1 and not isinstance(padding, str) and lhs.ndim == 4
      and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return _stride1_conv(lhs, rhs, tuple(tuple(p) for p in padding), precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, precision=precision)


class _ScanBody(nn.Module):
  """One stride-1 block as the body of `nn.scan`: carry in, carry out."""
  block: ModuleDef

  @nn.compact
  def __call__(self, x, _):
    return self.block(strides=1, name='block')(x), None


def scanned_blocks(block: ModuleDef, conv: ModuleDef, length: int, name: str):
  """`length` identical stride-1 blocks run as one `nn.scan` named `name` (call inside a compact module): the
  compiler sees one block instead of `length`.

  The arithmetic is that of the unrolled blocks. Their parameters are stacked with a leading block axis under
  `<name>/block/...`, so a checkpoint of a scanned net does not load into the unrolled one (hence off by default).
  The scanned convolutions use `conv_with_explicit_gradients`: without it XLA:CPU runs their gradients in its slow
  generic loop. `block` is a partial of the block class with everything but `strides` bound; `conv` its conv."""
  scan = nn.scan(_ScanBody, variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
                 split_rngs={'params': True}, length=length)
  body = functools.partial(block, conv=functools.partial(conv, conv_general_dilated=conv_with_explicit_gradients))
  return lambda x: scan(body, name=name)(x, None)[0]


class StepCaller:
  """The jitted step, called as `steps(state, n, *inputs) -> state` to take n steps (1 <= n <= steps_per_call).
  The state is replicated and donated; the inputs are placed as `input_shardings` says.

  How the n steps of a call run, with config.steps_per_call = N:
    N = 1 (the default), on the CPU and for the streamed input (a new batch each step): one program of one step,
      called n times. XLA:CPU runs convolution gradients inside a loop body in its slow generic loop
      (docs/performance.md), and a CPU step is long enough that calling it from Python costs nothing.
    N > 1 on GPUs and TPUs (`device_loop`), for an input whose step inputs are the same every step (the in-memory
      sets: the batch is a function of the step number, which the state carries): in a `fori_loop` on the device.
      A call of N steps is one program with the trip count fixed at compile time (the device runs it without the
      host between steps); a shorter call (up to a log, evaluation or checkpoint point) one program with the count
      as an argument. Both run the same loop body, and XLA compiles a loop body alike whatever its trip count, so
      the run gives the same bits however it is cut into calls, and any N > 1 the same bits as any other. A lone
      step outside a loop XLA compiles differently: N = 1 and N > 1 differ in float rounding, as runs on different
      device counts do."""

  def __init__(self, step, config, mesh, input_shardings, device_loop: bool | None = None):
    replicated = mesh_lib.replicated(mesh)
    jit = lambda fn, *counts: jax.jit(fn, in_shardings=(replicated, *counts, *input_shardings),
                                      out_shardings=replicated, donate_argnums=(0,))
    self.per_call = config.steps_per_call
    if device_loop is None:
      device_loop = mesh.devices.flat[0].platform != 'cpu'
    self.device_loop = bool(device_loop) and self.per_call > 1 and not config.data.streaming
    if not self.device_loop:
      self._full, self._any, self.steps_per_program = jit(step), None, 1
      return
    loop = lambda state, n, *inputs: jax.lax.fori_loop(0, n, lambda _, s: step(s, *inputs), state)
    self._full = jit(lambda state, *inputs: loop(state, self.per_call, *inputs))
    self._any = jit(loop, replicated)
    self.steps_per_program = self.per_call

  def __call__(self, state, n: int, *inputs):
    """The state after n steps (1 <= n <= steps_per_call)."""
    if not self.device_loop:
      for _ in range(n):
        state = self._full(state, *inputs)
      return state
    if n == self.per_call:
      return self._full(state, *inputs)
    return self._any(state, np.int32(n), *inputs)

  def lower(self, state, *inputs):
    """The lowered program of a full call: `steps_per_program` steps (steps_per_call with the device loop, else 1);
    compiled, it is called as (state, *inputs)."""
    return self._full.lower(state, *inputs)
