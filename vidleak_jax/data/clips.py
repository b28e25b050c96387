"""Simple transforms of the raw-frame pipeline: uint8 frames -> float32 clips in [0, 1].

All array functions are pure jnp and act on the trailing [H, W, C] axes, so they accept a
single frame [H, W, C], a video [T, H, W, C] or a batch [N, T, H, W, C].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.types import Array

RESIZE_METHODS = ("area", "linear", "cubic", "lanczos3")
Size = int | tuple[int, int]


def _is_pos_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _hw(size: Size, name: str) -> tuple[int, int]:
  """(h, w) from an int (square) or a pair of positive ints; ValueError naming `name`."""
  pair = (size, size) if isinstance(size, (int, np.integer)) else size
  if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(map(_is_pos_int, pair)):
    raise ValueError(f"{name} must be a positive int or an (h, w) pair, got {size!r}")
  return int(pair[0]), int(pair[1])


def _check_frames(x: Array, name: str) -> None:
  if x.ndim < 3:
    raise ValueError(f"{name} must be [..., H, W, C], got shape {x.shape}")


def to_float(frames: Any) -> Array:
  """uint8[...] -> float32[...] in [0, 1] (x / 255); float input is cast to float32 unchanged."""
  x = jnp.asarray(frames)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  raise ValueError(f"expected uint8 or float frames, got dtype {x.dtype}")


def resize(clips: Any, size: Size, *, method: str = "area") -> Array:
  """[..., H, W, C] -> float32[..., h, w, C].

  "area" averages each (H/h)×(W/w) block exactly when h divides H and w divides W; otherwise
  (including any upsampling) it falls back to `jax.image.resize(method="linear",
  antialias=True)`, whose widened triangle filter approximates area averaging when shrinking.
  "linear", "cubic" and "lanczos3" are `jax.image.resize` with antialias=True; cubic and
  lanczos3 may overshoot the input range. Integer input is resized in float32 without rescaling.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
  x = jnp.asarray(clips)
  _check_frames(x, "clips")
  x = x.astype(jnp.float32)
  h, w = _hw(size, "size")
  (height, width, channels), lead = x.shape[-3:], x.shape[:-3]
  if (h, w) == (height, width):
    return x
  if method == "area" and height % h == 0 and width % w == 0:
    blocks = x.reshape(*lead, h, height // h, w, width // w, channels)
    return blocks.mean(axis=(-4, -2))
  jax_method = "linear" if method == "area" else method
  return jax.image.resize(x, (*lead, h, w, channels), method=jax_method, antialias=True)


def center_crop(clips: Any, size: Size) -> Array:
  """[..., H, W, C] -> [..., h, w, C], rows [(H-h)//2, +h) and columns [(W-w)//2, +w)."""
  x = jnp.asarray(clips)
  _check_frames(x, "clips")
  h, w = _hw(size, "crop size")
  height, width = x.shape[-3:-1]
  if h > height or w > width:
    raise ValueError(f"crop size {(h, w)} exceeds frame size {(height, width)}")
  top, left = (height - h) // 2, (width - w) // 2
  return x[..., top:top + h, left:left + w, :]


def normalize(clips: Any, mean: Any, std: Any) -> Array:
  """(clips - mean) / std with per-channel (or broadcastable) mean and std: float32[..., C]."""
  x = jnp.asarray(clips).astype(jnp.float32)
  mean = jnp.asarray(mean, dtype=jnp.float32)
  std = jnp.asarray(std, dtype=jnp.float32)
  return (x - mean) / std


def clip_starts(
    num_frames: int, *, frames: int, stride: int, num_clips: int | None = None
) -> np.ndarray:
  """Evenly spaced start indices of clips of `frames` frames at `stride`: int64[num_clips].

  A clip spans L = (frames - 1) * stride + 1 frames. With num_clips=None as many disjoint
  spans as fit are used (num_frames // L). Starts are floor(i * (num_frames - L) / (n - 1)),
  so the first clip starts at 0 and the last ends at the last frame; a single clip is
  centred. Clips overlap only when num_clips > num_frames // L.
  """
  for name, value in (("num_frames", num_frames), ("frames", frames), ("stride", stride)):
    if not _is_pos_int(value):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  span = (frames - 1) * stride + 1
  if num_frames < span:
    raise ValueError(f"video of num_frames={num_frames} is too short for one clip of "
                     f"frames={frames} at stride={stride} (needs {span} frames)")
  last = num_frames - span
  n = num_frames // span if num_clips is None else num_clips
  if not _is_pos_int(n) or n > last + 1:
    raise ValueError(f"num_clips must be an integer in [1, {last + 1}] for num_frames="
                     f"{num_frames}, frames={frames}, stride={stride}; got {num_clips!r}")
  if n == 1:
    return np.array([last // 2], np.int64)
  return (np.arange(n, dtype=np.int64) * last) // (n - 1)


def prepare(
    frames: Any, *, size: Size | None = None, crop: Size | None = None, method: str = "area"
) -> Array:
  """uint8[..., H, W, C] -> float32[..., h, w, C] in [0, 1]: center crop, then resize.

  Scaling to [0, 1] happens before the (linear) resize, which equals resizing first up to
  float rounding; results are clipped to [0, 1] (cubic/lanczos3 may overshoot).
  """
  x = jnp.asarray(frames)
  _check_frames(x, "frames")
  if crop is not None:
    x = center_crop(x, crop)
  x = to_float(x)
  if size is not None:
    x = jnp.clip(resize(x, size, method=method), 0.0, 1.0)
  return x
