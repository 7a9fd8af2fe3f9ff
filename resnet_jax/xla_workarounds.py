"""Ways of writing parts of the network that the paper does not care about and XLA does.

models.py reads as the paper; what it computes here is the same function, written so that XLA compiles it well.
Each piece says what it buys and on which backend. Tests in tests/test_models.py check that each one has the same
values and gradients as the plain form, and keep the compiled property it exists for.

  relu                           all backends: XLA stores each block output once (CPU: 2.5-5x faster backward on
                                 deep nets; GPU: not measured; docs/performance.md).
  conv_with_explicit_gradients   XLA:CPU, inside a loop body only: gradient convolutions in the layout of its fast
                                 kernels (a scanned ResNet-56 step on one core: 75.5 s -> 1.71 s).
  scanned_blocks                 all backends, compile time: a stage's identical blocks as one `nn.scan`, so
                                 ResNet-1202 compiles in seconds instead of minutes (config.model.scan_blocks).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

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
  step took 75.5 s on one core instead of 1.71 s. The values are the same (`tests/test_models.py`); other convolutions (strided, dilated,
  grouped) fall through to `lax.conv_general_dilated` unchanged.
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
