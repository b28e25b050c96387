"""`conv_pallas`: an N-D convolution computed by an implicit-GEMM Pallas kernel, differentiable to
any order in reverse mode.

What: x [N, *S, C] (channels last, 1-, 2-, 3-D) convolved with w [*K, C, O], with window strides
and SAME / VALID / explicit padding, without dilation or groups (the project's victims' kind)
-> y [N, *S_out, O]. Padding is a `lax.pad`; strides are folded into channels (space-to-depth:
the s^d phases of x stacked on the channel axis, the kernel split alike), so the kernel computes
stride-1 VALID convolutions only: on the rows [N, prod(S), C] of x, output row p = sum over taps
t of x[p + offset_t] @ w[t]; each program loads one shifted tile of x per tap and accumulates
`tile @ w[t]` into its output tile (rows whose window wraps around an edge are computed and
dropped: 41 % extra work for 3×3×3 SAME on 8×32×32).

Why: the im2col rewrite (`fast_convs`) materialises patches of prod(K) times the activations (27×
for 3×3×3), and their transposes in the backward and double-backward passes; on a GPU the attack
step is bound by that memory traffic, not by arithmetic. Here the patches never exist.

Derivatives (`jax.custom_vjp`): with y = conv(x, w),
  d x = conv(pad(d y, K - 1), flip(w) with C and O swapped)   (the same kernel)
  d w[t] = sum over rows p of x[p + offset_t]^T @ d y[p]     (a second kernel, `_wgrad`)
and `_wgrad`'s cotangents are `conv`s again, so reverse mode works to any order (grad-of-grad:
the attack's objective), under `jax.jit` and `jax.vmap` (per-candidate weights batch the grid).
Forward mode (`jax.jvp`, `jax.jacfwd`) is not supported: JAX refuses jvp of a custom_vjp.

Where: compiled by Triton on GPU (requested explicitly: Pallas's default there is Mosaic GPU),
channels zero-padded to powers of two >= 16, 64-row × 64-channel output tiles; elsewhere in
Pallas interpret mode, which is slow: on CPU it serves correctness only (use "im2col" there).
That the GPU path lowers to Triton kernels is checked on any host (jax.export for CUDA); its GPU
speed is unmeasured and its GPU tiling (`GPU_TILES`) untuned.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Kernel tiling. rows: output rows per program (a power of two); out: output channels per program
# (0: all); red: input channels per reduction chunk (0: all); align: channels zero-padded to
# powers of two >= align (1: not padded); unroll: the loop over taps unrolled (else a fori_loop,
# faster to compile in interpret mode); interpret: Pallas interpret mode.
Tiles = collections.namedtuple("Tiles", "rows out red align unroll interpret")
GPU_TILES = Tiles(rows=64, out=64, red=32, align=16, unroll=True, interpret=False)


def _tiles() -> Tiles:
  if jax.default_backend() == "gpu":
    return GPU_TILES
  return Tiles(rows=1024, out=0, red=0, align=1, unroll=False, interpret=True)


def _compiler_params(tiles: Tiles):
  """Triton, not Mosaic GPU (Pallas's default on GPU): Mosaic GPU stages whole blocks in shared
  memory, and a block here is one sample's rows (an 8x32x32x16 clip is 0.5 MiB)."""
  return None if tiles.interpret else pltriton.CompilerParams(num_warps=4, num_stages=2)


def _pow2(n: int) -> int:  # the least power of two >= n
  return 1 << max(n - 1, 0).bit_length()


def _channels(c: int, align: int) -> int:  # channels as the kernel sees them (zero-padded)
  return c if align <= 1 else max(align, _pow2(c))


def _resolve_precision(precision):
  """`precision` (lax's forms), else the matmul precision in force. Triton runs HIGHEST as IEEE
  float32 products, DEFAULT and HIGH as TF32 passes."""
  precision = precision[0] if isinstance(precision, (tuple, list)) else precision
  precision = jax.config.jax_default_matmul_precision if precision is None else precision
  if isinstance(precision, lax.DotAlgorithmPreset):
    return precision
  return lax.Precision.DEFAULT if precision is None else lax.Precision(precision)


def _rows(a: jax.Array, n: int) -> jax.Array:
  """a [N, P, ...] cropped or zero-padded to [N, n, ...]."""
  return lax.pad(a, np.zeros((), a.dtype), [(0, 0, 0), (0, n - a.shape[1], 0)]
                 + [(0, 0, 0)] * (a.ndim - 2))


def _pad_last(a: jax.Array, *sizes: int) -> jax.Array:
  """a zero-padded at the end of its last len(sizes) axes to `sizes`."""
  lead = [(0, 0)] * (a.ndim - len(sizes))
  return jnp.pad(a, lead + [(0, s - d) for d, s in zip(a.shape[a.ndim - len(sizes):], sizes)])


# A stride-1 VALID convolution of x [N, *S, C] with a kernel [*K, C, O] on the rows [N, prod(S), C]
# of x: S, K, S_out, the row strides of S, each tap's row offset (tap-major, like
# w.reshape(prod(K), C, O)), output rows per program, rows up to the last valid output, output
# rows computed (a multiple of `rows`), input rows read.
_Geometry = collections.namedtuple(
    "_Geometry", "spatial kernel out strides offsets rows valid_rows out_rows in_rows")


def _geometry(spatial, kernel, tiles: Tiles) -> _Geometry:
  spatial, kernel = tuple(spatial), tuple(kernel)
  out = tuple(s - k + 1 for s, k in zip(spatial, kernel))
  strides = tuple(math.prod(spatial[i + 1:]) for i in range(len(spatial)))
  offsets = tuple(int(np.dot(t, strides)) for t in np.ndindex(*kernel))
  valid = sum((o - 1) * s for o, s in zip(out, strides)) + 1
  rows = min(tiles.rows, _pow2(max(valid, 16)))
  out_rows = -(-valid // rows) * rows
  return _Geometry(spatial, kernel, out, strides, offsets, rows, valid, out_rows,
                   out_rows + offsets[-1])


def _dot(a, b, precision, contract=((1,), (0,))):
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _offset(t, geo: _Geometry):
  """Row offset of tap t (traced) of the kernel."""
  off = 0
  for k, s in zip(reversed(geo.kernel), reversed(geo.strides)):
    off, t = off + (t % k) * s, t // k
  return off


def _conv_kernel(x_ref, w_ref, y_ref, *, geo: _Geometry, red, unroll, precision):
  """One output tile [rows, O_tile] = sum over taps t of x[start + offset_t : +rows] @ w[t]."""
  start, rows, c = pl.program_id(1) * geo.rows, geo.rows, x_ref.shape[-1]

  def tap(t, off, acc):
    if red >= c:
      return acc + _dot(x_ref[pl.ds(start + off, rows), :], w_ref[t], precision)

    def chunk(i, acc):
      c0 = pl.multiple_of(i * red, red)
      return acc + _dot(x_ref[pl.ds(start + off, rows), pl.ds(c0, red)],
                        w_ref[t, pl.ds(c0, red), :], precision)
    return lax.fori_loop(0, c // red, chunk, acc)

  acc = jnp.zeros(y_ref.shape, jnp.float32)
  if unroll:
    for t, off in enumerate(geo.offsets):
      acc = tap(t, off, acc)
  else:
    acc = lax.fori_loop(0, len(geo.offsets), lambda t, acc: tap(t, _offset(t, geo), acc), acc)
  y_ref[...] = acc.astype(y_ref.dtype)


def _wgrad_kernel(x_ref, dy_ref, dw_ref, *, geo: _Geometry, precision):
  """d w[t] (one sample, one channel tile) = sum over row tiles of x[r + offset_t]^T @ d y[r]."""
  off = _offset(pl.program_id(0), geo)

  def tile(i, acc):
    r0 = pl.multiple_of(i * geo.rows, geo.rows)
    return acc + _dot(x_ref[pl.ds(r0 + off, geo.rows), :], dy_ref[pl.ds(r0, geo.rows), :],
                      precision, contract=((0,), (0,)))

  acc = lax.fori_loop(0, geo.out_rows // geo.rows, tile, jnp.zeros(dw_ref.shape, jnp.float32))
  dw_ref[...] = acc.astype(dw_ref.dtype)


def _conv_impl(x, w, precision):
  """Stride-1 VALID convolution by the kernel: x [N, *S, C], w [*K, C, O] -> [N, *S_out, O]."""
  tiles, d = _tiles(), x.ndim - 2
  geo = _geometry(x.shape[1:-1], w.shape[:d], tiles)
  n, (c, o) = x.shape[0], w.shape[-2:]
  cp, op = _channels(c, tiles.align), _channels(o, tiles.align)
  to = min(tiles.out or op, op)
  red = tiles.red if tiles.red and tiles.red < cp else cp
  xr = _pad_last(_rows(x.reshape(n, -1, c), geo.in_rows), cp)  # [N, in_rows, cp]
  wr = _pad_last(w.reshape(len(geo.offsets), c, o), cp, op)
  y = pl.pallas_call(
      functools.partial(_conv_kernel, geo=geo, red=red, unroll=tiles.unroll,
                        precision=precision),
      out_shape=jax.ShapeDtypeStruct((n, geo.out_rows, op), x.dtype),
      grid=(n, geo.out_rows // geo.rows, op // to),
      in_specs=[pl.BlockSpec((None, geo.in_rows, cp), lambda i, j, k: (i, 0, 0)),
                pl.BlockSpec((len(geo.offsets), cp, to), lambda i, j, k: (0, 0, k))],
      out_specs=pl.BlockSpec((None, geo.rows, to), lambda i, j, k: (i, j, k)),
      compiler_params=_compiler_params(tiles), interpret=tiles.interpret)(xr, wr)
  y = _rows(y[:, :geo.valid_rows, :o], math.prod(geo.spatial)).reshape(n, *geo.spatial, o)
  return y[(slice(None), *[slice(0, s) for s in geo.out])]


def _wgrad_impl(x, dy, precision):
  """Kernel gradient by the kernel: x [N, *S, C], d y [N, *S_out, O] -> [*K, C, O]."""
  tiles = _tiles()
  kernel = tuple(s - so + 1 for s, so in zip(x.shape[1:-1], dy.shape[1:-1]))
  geo = _geometry(x.shape[1:-1], kernel, tiles)
  n, c, o, taps = x.shape[0], x.shape[-1], dy.shape[-1], len(geo.offsets)
  cp, op = _channels(c, tiles.align), _channels(o, tiles.align)
  tc, to = min(tiles.out or cp, cp), min(tiles.out or op, op)
  xr = _pad_last(_rows(x.reshape(n, -1, c), geo.in_rows), cp)
  dyr = jnp.pad(dy, [(0, 0), *[(0, s - so) for s, so in zip(geo.spatial, geo.out)], (0, 0)])
  dyr = _pad_last(_rows(dyr.reshape(n, -1, o), geo.out_rows), op)
  dw = pl.pallas_call(
      functools.partial(_wgrad_kernel, geo=geo, precision=precision),
      out_shape=jax.ShapeDtypeStruct((taps, n, cp, op), x.dtype),
      grid=(taps, n, cp // tc, op // to),
      in_specs=[pl.BlockSpec((None, geo.in_rows, tc), lambda t, i, a, b: (i, 0, a)),
                pl.BlockSpec((None, geo.out_rows, to), lambda t, i, a, b: (i, 0, b))],
      out_specs=pl.BlockSpec((None, None, tc, to), lambda t, i, a, b: (t, i, a, b)),
      compiler_params=_compiler_params(tiles), interpret=tiles.interpret)(xr, dyr)
  return dw.sum(axis=1)[:, :c, :o].reshape(*kernel, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, precision):
  return _conv_impl(x, w, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _wgrad(x, dy, precision):
  return _wgrad_impl(x, dy, precision)


def _input_grad(dy, w, precision):
  """d x of a stride-1 VALID convolution with kernel w [*K, C, O], from d y [N, *S_out, O]."""
  k = w.shape[:-2]
  dy = jnp.pad(dy, [(0, 0), *[(ki - 1, ki - 1) for ki in k], (0, 0)])
  return _conv(dy, jnp.swapaxes(jnp.flip(w, tuple(range(len(k)))), -1, -2), precision)


# The forward rules call the custom-vjp'd functions, not the kernels: outer transformations of a
# nested derivative differentiate them too (pallas_call has no usable jvp rule here).
_conv.defvjp(lambda x, w, precision: (_conv(x, w, precision), (x, w)),
             lambda precision, res, dy: (_input_grad(dy, res[1], precision),
                                         _wgrad(res[0], dy, precision)))
_wgrad.defvjp(lambda x, dy, precision: (_wgrad(x, dy, precision), (x, dy)),
              lambda precision, res, g: (_input_grad(res[1], g, precision),
                                         _conv(res[0], g, precision)))


def _space_to_depth(x, w, strides):
  """(x [N, *S, C], w [*K, C, O]) of a strided VALID convolution -> those of the stride-1 one."""
  d, n, (c, o) = len(strides), x.shape[0], w.shape[-2:]
  kernel = w.shape[:d]
  out = [(s - k) // st + 1 for s, k, st in zip(x.shape[1:-1], kernel, strides)]
  q = [-(-k // st) for k, st in zip(kernel, strides)]
  x = lax.pad(x, np.zeros((), x.dtype), [(0, 0, 0), *[(0, (a + b - 1) * st - s, 0) for a, b, st, s
                                                     in zip(out, q, strides, x.shape[1:-1])],
                                         (0, 0, 0)])
  x = x.reshape(n, *[v for a, b, st in zip(out, q, strides) for v in (a + b - 1, st)], c)
  x = x.transpose(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
  x = x.reshape(n, *[a + b - 1 for a, b in zip(out, q)], -1)
  w = jnp.pad(w, [(0, b * st - k) for b, st, k in zip(q, strides, kernel)] + [(0, 0)] * 2)
  w = w.reshape(*[v for b, st in zip(q, strides) for v in (b, st)], c, o)
  w = w.transpose(*range(0, 2 * d, 2), *range(1, 2 * d, 2), 2 * d, 2 * d + 1)
  return x, w.reshape(*q, -1, o)


def conv_pallas(x: jax.Array, w: jax.Array, strides: Sequence[int] | None = None,
                padding: str | Sequence[tuple[int, int]] = "VALID", precision=None) -> jax.Array:
  """x [N, *S, C] convolved with w [*K, C, O] -> [N, *S_out, O] (cross-correlation, like
  `lax.conv_general_dilated` with channels-last dimension numbers) by the Pallas kernel.

  strides: per spatial dim (default 1); padding: "SAME", "SAME_LOWER", "VALID" or (lo, hi) per
  spatial dim (negative crops); precision: of the kernel's matmuls (lax's forms; None: the matmul
  precision in force). Floating x and w of the same dtype.
  """
  if (d := x.ndim - 2) < 1 or w.ndim != d + 2 or w.shape[-2] != x.shape[-1]:
    raise ValueError(f"conv_pallas: x [N, *S, C] and w [*K, C, O] must agree: {x.shape}, {w.shape}")
  if x.dtype != w.dtype or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"conv_pallas: x and w must share a floating dtype: {x.dtype}, {w.dtype}")
  strides = tuple(strides or (1,) * d)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:-1], w.shape[:d], strides, padding)
  x = lax.pad(x, np.zeros((), x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in padding],
                                         (0, 0, 0)])
  if any(s < k for s, k in zip(x.shape[1:-1], w.shape[:d])) or 0 in x.shape or 0 in w.shape:
    raise ValueError(f"conv_pallas: empty output (padded input {x.shape}, kernel {w.shape})")
  if any(s != 1 for s in strides):
    x, w = _space_to_depth(x, w, strides)
  return _conv(x, w, _resolve_precision(precision))


def supports(lhs, rhs, *, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
             preferred_element_type=None, **unused) -> bool:
  """Whether `lax.conv_general_dilated(lhs, rhs, ...)` can be computed by `conv_pallas`: no
  dilation, no groups, floating operands of one dtype, a non-empty output."""
  del unused
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  spatial, kernel = [lhs.shape[i] for i in dn.lhs_spec[2:]], [rhs.shape[i] for i in dn.rhs_spec[2:]]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(spatial, kernel, window_strides, padding)
  return (all(v == 1 for v in (*(lhs_dilation or ()), *(rhs_dilation or ())))
          and feature_group_count == batch_group_count == 1 and lhs.dtype == rhs.dtype
          and jnp.issubdtype(lhs.dtype, jnp.floating)
          and preferred_element_type in (None, lhs.dtype)
          and 0 not in (*lhs.shape, *rhs.shape)
          and all(s + lo + hi >= k for s, (lo, hi), k in zip(spatial, padding, kernel)))


def conv_general_dilated_pallas(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None, precision=None,
                                **unused) -> jax.Array:
  """`lax.conv_general_dilated` with the same arguments, for those `supports` accepts (any
  dimension numbers), by `conv_pallas`; extra keyword arguments of the primitive are ignored."""
  del unused, lhs_dilation, rhs_dilation
  lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                            dimension_numbers)
  x = lhs.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  w = rhs.transpose(*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  y = conv_pallas(x, w, window_strides, padding, precision)
  where = {out_spec[0]: 0, out_spec[1]: y.ndim - 1,
           **{d: i + 1 for i, d in enumerate(out_spec[2:])}}
  return y.transpose([where[d] for d in range(y.ndim)])
