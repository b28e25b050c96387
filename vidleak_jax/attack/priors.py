"""Image/video priors for the attack objective. Each maps clips [B,T,H,W,C] to a scalar."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vidleak_jax.registry import Registry

PRIORS: Registry[Callable[[jax.Array], jax.Array]] = Registry("prior")


@PRIORS.register("tv_spatial")
def tv_spatial(clips: jax.Array) -> jax.Array:
  """Anisotropic total variation within frames: mean |dx| + mean |dy|."""
  dy = jnp.abs(clips[:, :, 1:] - clips[:, :, :-1])
  dx = jnp.abs(clips[:, :, :, 1:] - clips[:, :, :, :-1])
  return (dy.mean() if dy.size else 0.0) + (dx.mean() if dx.size else 0.0)


@PRIORS.register("tv_temporal")
def tv_temporal(clips: jax.Array) -> jax.Array:
  """Total variation along time: mean |x_t+1 - x_t| (0 for single-frame clips)."""
  if clips.shape[1] < 2:
    return jnp.zeros((), clips.dtype)
  return jnp.abs(clips[:, 1:] - clips[:, :-1]).mean()


@PRIORS.register("l2")
def l2_norm(clips: jax.Array) -> jax.Array:
  """Mean squared distance to mid-grey (keeps pixels from drifting far outside [0, 1])."""
  return jnp.square(clips - 0.5).mean()
