"""Checks of what callers hand the library's entry points: clips, labels (the gradient checks are
`vidleak_jax.tree_io.validate_target_grads`).

Every check raises one ValueError that names the library argument and what was expected. Checks
of dtypes and shapes are static and run under `jax.jit` / `jax.vmap` / `jax.grad` too (at trace
time: they cost nothing at run time); checks of values run only on concrete arrays, never on a
jax Tracer, so every check is safe inside traced code.

Clips are floating [B, T, H, W, C] in [0, 1]. uint8 video is refused, not rescaled: convert it
first with `clips.astype(np.float32) / 255`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

CLIP_LAYOUT = "B, T, H, W, C"
UINT8_HINT = "scale uint8 video to float32 in [0, 1] first: clips.astype(np.float32) / 255"


def is_concrete(x: Any) -> bool:
  """True when `x`'s values can be read on this host: not a jax Tracer (inside jit/vmap/grad),
  and not a jax Array spread over other processes."""
  if isinstance(x, jax.core.Tracer):
    return False
  return bool(getattr(x, "is_fully_addressable", True))


def as_array(x: Any, name: str) -> Any:
  """`x` itself when it is array-like with a shape and dtype (numpy, jax Array, Tracer), else
  `np.asarray(x)` (lists, scalars); object arrays are refused."""
  a = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
  if np.dtype(a.dtype) == np.dtype(object):
    raise ValueError(f"{name} must be a numeric array, got an object array")
  return a


def check_floating(x: Any, name: str) -> Any:
  """`x` as an array after checking its dtype is floating (uint8 video gets the hint to scale)."""
  a = as_array(x, name)
  dtype = np.dtype(a.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    hint = f"; {UINT8_HINT}" if dtype == np.uint8 else ""
    raise ValueError(f"{name} must have a floating dtype (float32 video in [0, 1]), got "
                     f"{dtype.name}{hint}")
  return a


def check_clips(clips: Any, name: str = "clips", *, layout: str | None = CLIP_LAYOUT,
                value_range: tuple[float, float] | None = (0.0, 1.0)) -> Any:
  """`clips` as an array after checking it is floating video of `layout` (one axis per name;
  None: any rank >= 1) with values in `value_range` (None: not checked).

  The values are read only when `clips` is concrete (see `is_concrete`): under jit/vmap/grad only
  the dtype and shape are checked. uint8 clips are refused: scale them to float32 in [0, 1].
  """
  a = check_floating(clips, name)
  shape = tuple(np.shape(a))
  if layout is not None and len(shape) != layout.count(",") + 1:
    raise ValueError(f"{name} must be a {layout.count(',') + 1}-D clip array [{layout}], got "
                     f"shape {shape}")
  if not shape:
    raise ValueError(f"{name} must have a batch axis, got a scalar")
  if value_range is not None and np.prod(shape) > 0 and is_concrete(a):
    lo, hi = (float(v) for v in (a.min(), a.max()))  # on the array's device: two scalars back
    if not (lo >= value_range[0] and hi <= value_range[1]):  # NaN fails both comparisons
      raise ValueError(f"{name} values must lie in [{value_range[0]:g}, {value_range[1]:g}], got "
                       f"min {lo:g}, max {hi:g}")
  return a


def num_classes(apply_fn: Callable, params: Any, inputs: Any) -> int:
  """K, the number of logits `apply_fn(params, inputs)` returns: its output shape by
  `jax.eval_shape` (traces the model, computes nothing)."""
  spec = jax.ShapeDtypeStruct(tuple(np.shape(inputs)), inputs.dtype)
  return int(jax.eval_shape(apply_fn, params, spec).shape[-1])


def check_labels(labels: Any, num_classes: int | Callable[[], int], batch_size: int,
                 name: str = "labels") -> jax.Array:
  """`labels` as a jax array after checking they are integer class indices [B] in [0, K), or
  class probabilities: floating [B, K] in [0, 1].

  `num_classes` is K, or a function returning it, called only when K is needed (concrete integer
  labels, or probabilities), so callers tracing with traced labels never compute it. The values
  are read only when `labels` is concrete: under jit/vmap/grad only dtype and shape are checked.
  """
  a = as_array(labels, name)
  dtype, shape = np.dtype(a.dtype), tuple(np.shape(a))
  k = (lambda: num_classes()) if callable(num_classes) else (lambda: num_classes)
  if jnp.issubdtype(dtype, jnp.integer):
    if shape != (batch_size,):
      raise ValueError(f"{name} must be class indices of shape [B] = [{batch_size}], got shape "
                       f"{shape}")
    if is_concrete(a):
      values, classes = np.asarray(a), k()
      bad = np.flatnonzero((values < 0) | (values >= classes))
      if bad.size:
        shown = ", ".join(f"{values[i]} at position {i}" for i in bad[:5])
        raise ValueError(f"{name} must be class indices in [0, {classes}) (the model has "
                         f"{classes} logits), got {shown}")
  elif jnp.issubdtype(dtype, jnp.floating):
    classes = k()
    if shape != (batch_size, classes):
      raise ValueError(f"{name} must be integer class indices [B] = [{batch_size}] or class "
                       f"probabilities [B, K] = [{batch_size}, {classes}], got {dtype.name} of "
                       f"shape {shape}")
    if np.prod(shape) > 0 and is_concrete(a):
      lo, hi = (float(v) for v in (a.min(), a.max()))
      if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons
        raise ValueError(f"{name} as class probabilities must lie in [0, 1], got min {lo:g}, "
                         f"max {hi:g}")
  else:
    raise ValueError(f"{name} must have an integer dtype (class indices in [0, K)), got "
                     f"{dtype.name}")
  return jnp.asarray(a)
