"""Per-frame super-resolution of clips [N, T, h, w, C] in [0, 1] -> [N, T, h*s, w*s, C].

Classical methods are `jax.image.resize` (bicubic, lanczos3); learned ones run an SR network on
each frame, optionally with its neighbouring frames stacked as extra input channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vidleak_jax.sr.models import SR_SCALES


def check_clips(clips: jax.Array, name: str = "clips") -> jax.Array:
  """ValueError naming `name` unless it is a 5-D float array [N, T, h, w, C]."""
  clips = jnp.asarray(clips)
  if clips.ndim != 5 or not jnp.issubdtype(clips.dtype, jnp.floating):
    raise ValueError(f"{name} must be float clips [N, T, h, w, C], got {clips.dtype} "
                     f"{tuple(clips.shape)}")
  return clips


def check_scale(scale: int, name: str = "sr_scale") -> int:
  if scale not in SR_SCALES:
    raise ValueError(f"{name} must be one of {SR_SCALES}, got {scale!r}")
  return scale


def resize_clips(clips: jax.Array, scale: int, method: str) -> jax.Array:
  """`jax.image.resize(clips, (N, T, h*s, w*s, C), method)`, unclipped."""
  clips = check_clips(clips)
  n, t, h, w, c = clips.shape
  return jax.image.resize(clips, (n, t, h * check_scale(scale), w * scale, c), method=method)


def bicubic(clips: jax.Array, scale: int) -> jax.Array:
  """Bicubic upsampling, exactly `jax.image.resize(..., method="cubic")` (may overshoot [0, 1])."""
  return resize_clips(clips, scale, "cubic")


def lanczos3(clips: jax.Array, scale: int) -> jax.Array:
  """Lanczos-3 upsampling, exactly `jax.image.resize(..., method="lanczos3")`."""
  return resize_clips(clips, scale, "lanczos3")


def stack_neighbours(clips: jax.Array, radius: int) -> jax.Array:
  """Each frame with its ±radius neighbours (edges repeated) as channels: [N*T, h, w, C*(2r+1)]."""
  clips = check_clips(clips)
  n, t, h, w, c = clips.shape
  idx = jnp.clip(jnp.arange(t)[:, None] + jnp.arange(-radius, radius + 1)[None], 0, t - 1)
  stacked = clips[:, idx]  # [N, T, F, h, w, C]
  return jnp.moveaxis(stacked, 2, -2).reshape(n * t, h, w, c * (2 * radius + 1))


def apply_model(model: nnx.Module, clips: jax.Array, *, temporal_radius: int = 0,
                chunk: int = 256) -> jax.Array:
  """Runs an SR network on every frame of clips [N, T, h, w, C]: [N, T, h*s, w*s, C], unclipped."""
  clips = check_clips(clips)
  n, t = clips.shape[:2]
  stacks = stack_neighbours(clips, temporal_radius)
  out = jnp.concatenate([model(stacks[i:i + chunk]) for i in range(0, stacks.shape[0], chunk)])
  return out.reshape(n, t, *out.shape[1:])
