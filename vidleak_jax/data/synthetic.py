"""Synthetic surveillance-like clips: one static camera background, one moving object per clip.

The class label is the object's motion direction: label k of K moves along angle 2*pi*k/K in image
coordinates (x to the right, y down), so K=4 gives right/down/left/up.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.data.checks import check_int
from vidleak_jax.types import Array, PRNGKey

_ENV_LO, _ENV_HI = 0.05, 0.95
_NUM_RECTS = 4
_CONTRAST = 0.3  # minimum per-channel distance between object colour and the local background mean


def class_directions(num_classes: int) -> Array:
  """Unit motion direction (dx, dy) of each label, image coordinates with y down: float32[K, 2]."""
  num_classes = check_int("num_classes", num_classes, 2)
  angles = 2.0 * np.pi * np.arange(num_classes) / num_classes
  dirs = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  dirs[np.abs(dirs) < 1e-6] = 0.0  # exact axis-aligned directions for K divisible by 4
  return jnp.asarray(dirs, dtype=jnp.float32)


def _grid(height: int, width: int) -> tuple[Array, Array]:
  """Pixel-centre coordinates (y, x), each float32[H, W]."""
  ys = jnp.arange(height, dtype=jnp.float32)
  xs = jnp.arange(width, dtype=jnp.float32)
  return jnp.meshgrid(ys, xs, indexing="ij")


_Specs = list[tuple[tuple[int, ...], float, float]]  # (shape, low, high) of each random parameter


def _param_bounds(specs: _Specs) -> tuple[np.ndarray, np.ndarray]:
  """Flat (low, high) bounds, float32[P] each, for a list of (shape, low, high) parameter specs."""
  lows = [np.full(math.prod(shape), low, np.float32) for shape, low, _ in specs]
  highs = [np.full(math.prod(shape), high, np.float32) for shape, _, high in specs]
  return np.concatenate(lows), np.concatenate(highs)


def _unflatten(flat: Array, specs: _Specs) -> list[Array]:
  """Splits a flat float32[P] parameter vector into one array per (shape, low, high) spec."""
  out, pos = [], 0
  for shape, _, _ in specs:
    size = math.prod(shape)
    out.append(flat[pos:pos + size].reshape(shape))
    pos += size
  return out


def _hash_noise(seed: Array, iy: Array, ix: Array, ic: Array) -> Array:
  """Integer-hash white noise in [0, 1) of broadcast uint32 coordinates: float32[H, W, C]."""
  h = (iy * jnp.uint32(0x8DA6B343)) ^ (ix * jnp.uint32(0xD8163841)) ^ (ic * jnp.uint32(0xCB1AB31F))
  h = h ^ seed
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  h = h ^ (h >> 16)
  return (h >> 8).astype(jnp.float32) / float(1 << 24)


def _env_specs(channels: int) -> _Specs:
  """Random parameters of one camera: gradient, waves, rectangles, stripes, noise seeds."""
  c, r = channels, _NUM_RECTS
  return [
      ((c,), 0.25, 0.75), ((2, c), -0.3, 0.3),  # smooth colour gradient
      ((2, 1), 0.5, 2.0), ((2, 1), 0.0, 2.0 * np.pi), ((2, 1), 0.0, 2.0 * np.pi),
      ((2, c), -0.08, 0.08),  # two low-frequency colour waves
      ((r, 2), -0.1, 0.8), ((r, 2), 0.12, 0.45), ((r, c), 0.1, 0.9), ((r,), 0.5, 0.9),  # rectangles
      ((2,), 0.0, 0.6), ((2,), 0.2, 0.4), ((), 0.0, np.pi), ((c,), -0.15, 0.15),  # striped patch
      ((2,), 0.0, 1.0),  # texture noise seeds
  ]


def environment(key: PRNGKey, height: int, width: int, channels: int) -> Array:
  """Static textured camera background in [0.05, 0.95]: float32[H, W, C]."""
  height = check_int("height", height, 1)
  width = check_int("width", width, 1)
  channels = check_int("channels", channels, 1)
  low, high = _param_bounds(_env_specs(channels))
  return _render_environment(jax.random.uniform(key, low.shape, minval=low, maxval=high), height,
                             width, channels)


def _render_environment(flat: Array, height: int, width: int, channels: int) -> Array:
  """Background from its flat parameter vector (see `_env_specs`): float32[H, W, C]."""
  c, r = channels, _NUM_RECTS
  (base, grad, w_freq, w_orient, w_phase, w_amp, r_corner, r_extent, r_colour, r_opacity,
   s_corner, s_extent, s_orient, s_colour, seed_u) = _unflatten(flat, _env_specs(c))
  yy, xx = _grid(height, width)
  v = (yy + 0.5)[..., None] / height  # normalised coordinates in (0, 1), [H, W, 1]
  u = (xx + 0.5)[..., None] / width

  img = base + grad[0] * (u - 0.5) + grad[1] * (v - 0.5)
  for i in range(2):  # uneven lighting
    arg = 2.0 * np.pi * w_freq[i] * (u * jnp.cos(w_orient[i]) + v * jnp.sin(w_orient[i]))
    img = img + w_amp[i] * jnp.sin(arg + w_phase[i])

  for i in range(r):  # semi-opaque rectangles (buildings, signs, parked cars)
    inside = ((u >= r_corner[i, 0]) & (u < r_corner[i, 0] + r_extent[i, 0])
              & (v >= r_corner[i, 1]) & (v < r_corner[i, 1] + r_extent[i, 1]))
    alpha = r_opacity[i] * inside.astype(jnp.float32)
    img = img * (1.0 - alpha) + r_colour[i] * alpha

  # A striped patch (crosswalk / fence) with stripes about 2 pixels wide.
  s_inside = ((u >= s_corner[0]) & (u < s_corner[0] + s_extent[0])
              & (v >= s_corner[1]) & (v < s_corner[1] + s_extent[1]))
  s_period = 4.0 / min(height, width)
  s_arg = 2.0 * np.pi * (u * jnp.cos(s_orient) + v * jnp.sin(s_orient)) / s_period
  stripes = jnp.where(jnp.sin(s_arg) >= 0.0, 1.0, -1.0)
  img = img + s_colour * stripes * s_inside.astype(jnp.float32)

  # Mild texture: blocky coarse noise (4x4-pixel cells) plus fine per-pixel noise.
  seeds = (seed_u * float(1 << 24)).astype(jnp.uint32)
  iy = jnp.arange(height, dtype=jnp.uint32)[:, None, None]
  ix = jnp.arange(width, dtype=jnp.uint32)[None, :, None]
  ic = jnp.arange(c, dtype=jnp.uint32)[None, None, :]
  img = img + 0.1 * (_hash_noise(seeds[0], iy // 4, ix // 4, ic) - 0.5)
  img = img + 0.05 * (_hash_noise(seeds[1], iy, ix, ic) - 0.5)

  img = _ENV_LO + (_ENV_HI - _ENV_LO) * jnp.clip(img, 0.0, 1.0)
  return jnp.clip(img, _ENV_LO, _ENV_HI).astype(jnp.float32)


def _clip_specs(channels: int) -> _Specs:
  """Per-clip random parameters: label, size, shape, speed, start (x, y), colour offset."""
  return [((), 0.0, 1.0), ((), 0.2, 0.35), ((), 0.0, 1.0), ((), 0.5, 1.0), ((2,), 0.0, 1.0),
          ((channels,), 0.0, 1.0 - 2.0 * _CONTRAST)]


def _one_clip(params: Array, direction: Array, background: Array, frames: int,
              object_size: float | None) -> Array:
  """One object moving along `direction` (float32[2]) over background: float32[T, H, W, C]."""
  height, width, channels = background.shape
  small = float(min(height, width))
  _, size_frac, shape_u, speed, start_u, colour_u = _unflatten(params, _clip_specs(channels))

  # Object diameter (pixels) and shape: disc or square, with a soft one-pixel edge.
  if object_size is None:
    diam = jnp.clip(size_frac * small, min(1.5, small), small)
  else:
    diam = jnp.asarray(object_size, jnp.float32)
  radius = 0.5 * diam
  is_disc = shape_u < 0.5

  # Feasible centre range so that the whole object stays inside the frame.
  lo = radius - 0.5
  hi = jnp.stack([width - 0.5 - radius, height - 0.5 - radius])  # (x, y)
  span = jnp.maximum(hi - lo, 0.0)
  mag = jnp.abs(direction)
  reach = jnp.where(mag > 1e-6, span / jnp.maximum(mag, 1e-6), jnp.inf)
  max_travel = jnp.min(reach)
  travel = speed * max_travel * direction
  start_lo = lo - jnp.minimum(travel, 0.0)
  start_hi = jnp.maximum(hi - jnp.maximum(travel, 0.0), start_lo)
  start = start_lo + start_u * (start_hi - start_lo)

  # Constant velocity: centre of frame t is start + travel * t / (T - 1).
  frac = jnp.arange(frames, dtype=jnp.float32) / max(frames - 1, 1)
  centres = start + frac[:, None] * travel  # [T, 2] as (x, y)
  yy, xx = _grid(height, width)
  dx = jnp.abs(xx - centres[:, 0, None, None])  # [T, H, W]
  dy = jnp.abs(yy - centres[:, 1, None, None])
  dist = jnp.where(is_disc, jnp.sqrt(dx * dx + dy * dy), jnp.maximum(dx, dy))
  alpha = jnp.clip(radius - dist + 0.5, 0.0, 1.0)[..., None]  # [T, H, W, 1], exactly 0 off-object

  # Colour: per channel at least _CONTRAST away from the background mean along the object's path.
  path = jnp.max(alpha, axis=0)  # [H, W, 1]
  local = jnp.sum(path * background, axis=(0, 1)) / jnp.maximum(jnp.sum(path), 1e-6)
  colour = jnp.mod(local + _CONTRAST + colour_u, 1.0)

  clip = background * (1.0 - alpha) + colour * alpha
  return jnp.clip(clip, 0.0, 1.0)


def synthetic_clips(
    key: PRNGKey,
    num_clips: int,
    *,
    frames: int,
    height: int,
    width: int,
    channels: int = 3,
    num_classes: int = 4,
    background: Array | None = None,
    object_size: float | None = None,
) -> tuple[Array, Array]:
  """Clips of an object moving in its label's direction: (float32[N, T, H, W, C], int32[N]).

  `background` (float32[H, W, C]) replaces the randomly drawn environment; `object_size` fixes the
  object's diameter in pixels (default: drawn per clip in [0.2, 0.35] * min(H, W)).
  """
  num_clips = check_int("num_clips", num_clips, 1)
  frames = check_int("frames", frames, 1)
  height = check_int("height", height, 1)
  width = check_int("width", width, 1)
  channels = check_int("channels", channels, 1)
  num_classes = check_int("num_classes", num_classes, 2)
  if object_size is not None:
    try:
      size = float(object_size)
    except (TypeError, ValueError):
      raise ValueError(f"object_size must be a number or None, got {object_size!r}") from None
    if not (math.isfinite(size) and 0.0 < size <= min(height, width)):
      raise ValueError(
          f"object_size must be in (0, min(height, width)] = (0, {min(height, width)}], got {size}")
    object_size = size
  if background is not None:
    background = jnp.asarray(background, dtype=jnp.float32)
    if background.shape != (height, width, channels):
      raise ValueError(
          f"background must have shape (height, width, channels) = {(height, width, channels)}, "
          f"got {tuple(background.shape)}")

  # All randomness comes from one draw (a single random-number kernel keeps compilation cheap).
  env_low, env_high = _param_bounds(_env_specs(channels))
  clip_low, clip_high = _param_bounds(_clip_specs(channels))
  low = np.concatenate([env_low, np.tile(clip_low, num_clips)])
  high = np.concatenate([env_high, np.tile(clip_high, num_clips)])
  flat = jax.random.uniform(key, low.shape, minval=low, maxval=high)
  params = flat[env_low.size:].reshape(num_clips, clip_low.size)  # [N, P]
  if background is None:
    background = _render_environment(flat[:env_low.size], height, width, channels)

  labels = jnp.minimum(jnp.floor(params[:, 0] * num_classes), num_classes - 1).astype(jnp.int32)
  directions = class_directions(num_classes)[labels]  # [N, 2]
  make = lambda p, d: _one_clip(p, d, background, frames, object_size)
  clips = jax.vmap(make)(params, directions)
  return clips.astype(jnp.float32), labels
