"""Victim layers with a switchable convolution implementation.

`Conv` has exactly the parameters of `nnx.Conv` (kernel [*k, Cin, Cout], bias [Cout], SAME padding)
and computes the same function in one of two ways, chosen at trace time:
  "xla"     lax.conv_general_dilated (the default);
  "im2col"  shifted strided slices stacked into patches, then one matmul with the kernel.
Under `jax.vmap` over attack candidates, the per-candidate weight gradients of "xla" convolutions
become grouped convolutions, which XLA runs slowly, and XLA's 3-D convolution gradients are slow
even unbatched; with "im2col" both become batched matmuls. The attack engine selects the
implementation with `conv_implementation` while it traces its objective.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

CONV_IMPLEMENTATIONS = ("xla", "im2col")
_IMPL = contextvars.ContextVar("vidleak_jax_conv_implementation", default="xla")


@contextlib.contextmanager
def conv_implementation(name: str) -> Iterator[None]:
  """Within the block, `Conv` layers traced/run use implementation `name`."""
  if name not in CONV_IMPLEMENTATIONS:
    raise KeyError(f"unknown conv implementation {name!r}; valid: "
                   f"{', '.join(CONV_IMPLEMENTATIONS)}")
  token = _IMPL.set(name)
  try:
    yield
  finally:
    _IMPL.reset(token)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def im2col(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """SAME-padded patches: x [N, *S, C] -> [N, *S_out, prod(kernel_size) * C] (tap-major).

  Built one spatial axis at a time (last first), k strided slices concatenated per axis: XLA:CPU
  runs these few small concatenations (and their transposes) faster than one concatenation of
  prod(k) slices, and compiles them faster (c3d attack steps 10–20 % faster; BUILD.md).
  """
  spatial = x.shape[1:-1]
  pads = [_same_padding(n, k, s) for n, k, s in zip(spatial, kernel_size, strides)]
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  for axis in reversed(range(len(kernel_size))):
    k, s, out = kernel_size[axis], strides[axis], -(-spatial[axis] // strides[axis])
    taps = [jax.lax.slice_in_dim(x, o, o + (out - 1) * s + 1, s, axis=axis + 1) for o in range(k)]
    x = jnp.concatenate(taps, axis=-1)
  return x


def conv_im2col(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                strides: Sequence[int]) -> jax.Array:
  """SAME convolution x [N, *S, Cin] * kernel [*k, Cin, Cout] (+ bias) as patches @ kernel."""
  patches = im2col(x, kernel.shape[:-2], strides)
  y = jnp.einsum("...k,ko->...o", patches, kernel.reshape(-1, kernel.shape[-1]))
  return y if bias is None else y + bias


class Conv(nnx.Conv):
  """`nnx.Conv` (SAME padding, no dilation/groups) whose implementation follows the context."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if _IMPL.get() == "xla":
      return super().__call__(inputs, out_sharding)
    strides = self.strides or 1
    strides = (strides,) * len(self.kernel_size) if isinstance(strides, int) else strides
    bias = None if self.bias is None else self.bias[...]
    return conv_im2col(inputs, self.kernel[...], bias, strides)
