"""Learned super-resolution networks (Flax NNX): ESPCN and an EDSR-style residual net.

Both map a low-resolution frame stack [N, h, w, C * F] (F = 2r + 1 neighbouring frames, centre
frame in the middle, see `apply.stack_neighbours`) to [N, h*s, w*s, C] and predict a correction on
top of the bicubic upsampling of the centre frame, so an untrained net starts near bicubic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vidleak_jax.registry import Registry

SR_SCALES = (1, 2, 4)
SR_MODELS: Registry[type[nnx.Module]] = Registry("SR model")


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """Sub-pixel shuffle [..., h, w, C*s*s] -> [..., h*s, w*s, C]; channels ordered (sy, sx, c)."""
  *lead, h, w, c = x.shape
  out = c // (scale * scale)
  x = x.reshape(*lead, h, w, scale, scale, out)
  x = jnp.swapaxes(x, -4, -3)  # [..., h, sy, w, sx, C]
  return x.reshape(*lead, h * scale, w * scale, out)


def center_frame(stack: jax.Array, channels: int) -> jax.Array:
  """The middle frame of a stack [N, h, w, C*F]: [N, h, w, C]."""
  frames = stack.shape[-1] // channels
  start = (frames // 2) * channels
  return stack[..., start:start + channels]


def bicubic_skip(stack: jax.Array, channels: int, scale: int) -> jax.Array:
  """`jax.image.resize` bicubic upsampling of the stack's centre frame: [N, h*s, w*s, C]."""
  centre = center_frame(stack, channels)
  n, h, w, c = centre.shape
  if scale == 1:
    return centre
  return jax.image.resize(centre, (n, h * scale, w * scale, c), method="cubic")


def _check_scale(scale: int) -> int:
  if scale not in SR_SCALES:
    raise ValueError(f"SR scale must be one of {SR_SCALES}, got {scale!r}")
  return scale


@SR_MODELS.register("espcn")
class ESPCN(nnx.Module):
  """Shi et al. 2016: conv5×5(64)-tanh, conv3×3(32)-tanh, conv3×3(C·s²), pixel shuffle."""

  def __init__(self, *, scale: int, channels: int = 3, frames: int = 1, features: int = 64,
               rngs: nnx.Rngs):
    self.scale, self.channels = _check_scale(scale), channels
    self.conv1 = nnx.Conv(channels * frames, features, (5, 5), rngs=rngs)
    self.conv2 = nnx.Conv(features, features // 2, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(features // 2, channels * scale * scale, (3, 3), rngs=rngs,
                          kernel_init=nnx.initializers.zeros)

  def __call__(self, stack: jax.Array) -> jax.Array:
    x = jnp.tanh(self.conv2(jnp.tanh(self.conv1(stack))))
    return bicubic_skip(stack, self.channels, self.scale) + pixel_shuffle(self.conv3(x),
                                                                          self.scale)


class _ResBlock(nnx.Module):
  def __init__(self, features: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(features, features, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + 0.1 * self.conv2(jax.nn.relu(self.conv1(x)))  # EDSR's residual scaling


@SR_MODELS.register("edsr")
class EDSR(nnx.Module):
  """Lim et al. 2017, small: head conv, residual blocks + skip, ×2 pixel-shuffle stages, tail."""

  def __init__(self, *, scale: int, channels: int = 3, frames: int = 1, features: int = 32,
               blocks: int = 4, rngs: nnx.Rngs):
    self.scale, self.channels = _check_scale(scale), channels
    self.head = nnx.Conv(channels * frames, features, (3, 3), rngs=rngs)
    self.blocks = nnx.List([_ResBlock(features, rngs) for _ in range(blocks)])
    self.body = nnx.Conv(features, features, (3, 3), rngs=rngs)
    stages = {1: 0, 2: 1, 4: 2}[scale]
    self.upsample = nnx.List([nnx.Conv(features, 4 * features, (3, 3), rngs=rngs)
                              for _ in range(stages)])
    self.tail = nnx.Conv(features, channels, (3, 3), rngs=rngs,
                         kernel_init=nnx.initializers.zeros)

  def __call__(self, stack: jax.Array) -> jax.Array:
    x = self.head(stack)
    y = x
    for block in self.blocks:
      y = block(y)
    x = x + self.body(y)
    for conv in self.upsample:
      x = pixel_shuffle(conv(x), 2)
    return bicubic_skip(stack, self.channels, self.scale) + self.tail(x)


def create_model(name: str, key: jax.Array, *, scale: int, channels: int = 3,
                 temporal_radius: int = 0) -> nnx.Module:
  """SR network `name` for ×`scale`, taking 2·temporal_radius + 1 neighbouring frames."""
  if temporal_radius < 0:
    raise ValueError(f"temporal_radius must be >= 0, got {temporal_radius}")
  return SR_MODELS.get(name)(scale=scale, channels=channels, frames=2 * temporal_radius + 1,
                             rngs=nnx.Rngs(key))
