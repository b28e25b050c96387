"""How the attack's optimised variables ("latents") map to clips at the victim's resolution.

Two choices, combinable:
  * `AttackConfig.param`: "direct" optimises the clip itself; "background_residual" optimises a
    residual on top of a fixed background, the per-pixel median of the attacker's reference frames
    of the same camera, with L1 / L2 / TV penalties on the residual (moving content is sparse and
    piecewise smooth, the static scene is already known). With zero reference frames it falls back
    to "direct", so the attack is exactly the one without references.
  * `AttackConfig.attack_scale` s in {1, 2, 4}: latents live at (H/s, W/s) and are upsampled
    bicubically (`jax.image.resize`, differentiable) to the victim's (H, W) inside the objective.
With param="direct" and s=1 every map is the identity, so the attack is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from vidleak_jax.attack.priors import tv_spatial
from vidleak_jax.data.clips import resize
from vidleak_jax.registry import Registry

if TYPE_CHECKING:
  from vidleak_jax.attack.config import AttackConfig

ATTACK_SCALES = (1, 2, 4)


class Parametrization(NamedTuple):
  """Maps between latents [..., h, w, C] and clips; `...` is any leading shape (R, B, T).

  latent_shape: (B, T, h, w, C) of one candidate.
  encode(clips_lowres [..., h, w, C] in [0, 1]) -> latents (used for the initial guess).
  decode(latents) -> clips [..., H, W, C] at the victim's resolution (what the victim sees).
  lowres(latents) -> clips [..., h, w, C] at the attack's resolution (in [0, 1] with `box`).
  project(latents) -> latents after the box constraint (identity when `config.box` is off).
  penalty(latents) -> scalar added to the objective, or None when there is none.
  """

  latent_shape: tuple[int, ...]
  encode: Callable[[jax.Array], jax.Array]
  decode: Callable[[jax.Array], jax.Array]
  lowres: Callable[[jax.Array], jax.Array]
  project: Callable[[jax.Array], jax.Array]
  penalty: Callable[[jax.Array], jax.Array] | None


PARAMETRIZATIONS: Registry[Callable[..., Parametrization]] = Registry("parametrization")


def lowres_shape(clip_shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
  """(B, T, H/s, W/s, C); ValueError naming attack_scale unless s in {1, 2, 4} divides H and W."""
  *lead, height, width, channels = clip_shape
  if scale not in ATTACK_SCALES:
    raise ValueError(f"attack_scale must be one of {ATTACK_SCALES}, got {scale!r}")
  if height % scale or width % scale:
    raise ValueError(f"attack_scale={scale} must divide the clip's height and width, got "
                     f"H={height}, W={width}")
  return (*lead, height // scale, width // scale, channels)


def upsample(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic `jax.image.resize` of [..., h, w, C] to [..., height, width, C] (identity if equal)."""
  if x.shape[-3:-1] == (height, width):
    return x
  return jax.image.resize(x, (*x.shape[:-3], height, width, x.shape[-1]), method="cubic")


def _box(x: jax.Array, config: AttackConfig) -> jax.Array:
  return jnp.clip(x, 0.0, 1.0) if config.box else x


@PARAMETRIZATIONS.register("direct")
def direct(clip_shape: tuple[int, ...], config: AttackConfig,
           references: jax.Array | None = None) -> Parametrization:
  """Latents are the clips at the attack's resolution (no reference frames used)."""
  del references
  latent = lowres_shape(clip_shape, config.attack_scale)
  height, width = clip_shape[-3:-1]
  identity = lambda x: x
  if config.attack_scale == 1:
    decode = identity
  else:  # with the box constraint, bicubic overshoot is clipped to valid pixels
    decode = lambda x: _box(upsample(x, height, width), config)
  return Parametrization(latent, identity, decode, identity,
                         lambda x: _box(x, config), None)


@PARAMETRIZATIONS.register("background_residual")
def background_residual(clip_shape: tuple[int, ...], config: AttackConfig,
                        references: jax.Array | None = None) -> Parametrization:
  """clip = background + upsample(residual); background = median of the references [k,H,W,C].

  The background is fixed (the camera's static scene); the residual is free, so it can also
  correct the background where it is wrong. k = 0 references gives `direct` exactly.
  """
  expected = tuple(clip_shape[-3:])
  if references is None or references.ndim != 4 or tuple(references.shape[1:]) != expected:
    raise ValueError(f"param='background_residual' needs references [k, "
                     f"{', '.join(map(str, expected))}] (the attacker's frames of the camera), "
                     f"got {None if references is None else tuple(references.shape)}")
  if references.shape[0] == 0:
    return direct(clip_shape, config)
  latent = lowres_shape(clip_shape, config.attack_scale)
  height, width = clip_shape[-3:-1]
  background = jnp.median(jnp.asarray(references, jnp.float32), axis=0)  # [H, W, C]
  background_low = resize(background, latent[-3:-1], method="area")  # exact block mean

  def penalty(residual: jax.Array) -> jax.Array:
    return (config.residual_l1 * jnp.abs(residual).mean()
            + config.residual_l2 * jnp.square(residual).mean()
            + config.residual_tv * tv_spatial(residual.reshape(-1, *residual.shape[-4:])))

  def project(residual: jax.Array) -> jax.Array:
    if not config.box:
      return residual
    return jnp.clip(residual, -background_low, 1.0 - background_low)

  return Parametrization(
      latent_shape=latent,
      encode=lambda clips: clips - background_low,
      decode=lambda r: _box(background + upsample(r, height, width), config),
      lowres=lambda r: jnp.clip(background_low + r, 0.0, 1.0),
      project=project,
      penalty=penalty if (config.residual_l1 or config.residual_l2 or config.residual_tv) else None)


def make_parametrization(clip_shape: tuple[int, ...], config: AttackConfig,
                         references: jax.Array | None = None) -> Parametrization:
  """The parametrization `config.param` for clips of `clip_shape` (B, T, H, W, C)."""
  return PARAMETRIZATIONS.get(config.param)(tuple(clip_shape), config, references)
