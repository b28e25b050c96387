"""Attack hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax

from vidleak_jax.attack.objectives import DISTANCES
from vidleak_jax.attack.optimizers import OPTIMIZERS, SCHEDULES
from vidleak_jax.attack.parametrize import ATTACK_SCALES, PARAMETRIZATIONS
from vidleak_jax.attack.priors import PRIORS

BATCHING = ("auto", "vmap", "map")
CONVS = ("auto", "xla", "im2col")
INITS = ("uniform", "gaussian", "gray", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackConfig:
  """Everything that defines a gradient-inversion run (public hyper-parameters only).

  priors: prior name -> weight (see `PRIORS`), added to the gradient-matching objective.
  layer_weights: parameter-path prefix -> weight in the objective (see `resolve_layer_weights`).
  batching: how the R restarts are batched inside the jitted step: "vmap" (one vectorised
  computation) or "map" (`lax.map` over groups of `map_batch_size` vmapped candidates); "auto" =
  "map" on CPU, "vmap" on GPU/TPU.
  map_batch_size: candidates per group with batching "map"; 0 = auto (see `resolve_map_batch_size`).
  conv: implementation of the victim's convolutions while the attack traces them (see
  `vidleak_jax.models.layers`); "auto" = "im2col", which keeps per-candidate weight gradients
  as batched matmuls instead of grouped convolutions. Same function either way.
  log_every: steps per jitted dispatch (a `lax.scan`); also the progress/logging interval.
  init: "uniform" | "gaussian" | "gray" noise, or "reference": the per-pixel median of the attacker's
  reference frames of the same camera (plus a little noise per restart); needs `references`.
  param: "direct" | "background_residual" (clip = references' median + residual, see
  `vidleak_jax.attack.parametrize`); residual_l1 / residual_l2 / residual_tv weigh the residual's
  mean |r|, mean r^2 and spatial TV in the objective.
  attack_scale: candidates live at (H/s, W/s) and are upsampled bicubically to the victim's size.
  """

  metric: str = "cosine"
  optimizer: str = "signed_adam"
  lr: float = 0.1
  schedule: str = "multistep"
  steps: int = 200
  restarts: int = 1
  priors: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"tv_spatial": 1e-2, "tv_temporal": 1e-2})
  layer_weights: Mapping[str, float] | None = None
  box: bool = True
  init: str = "uniform"
  batching: str = "auto"
  map_batch_size: int = 0
  conv: str = "auto"
  log_every: int = 25
  param: str = "direct"
  residual_l1: float = 0.0
  residual_l2: float = 0.0
  residual_tv: float = 0.0
  attack_scale: int = 1

  def __post_init__(self):
    DISTANCES.get(self.metric)
    OPTIMIZERS.get(self.optimizer)
    SCHEDULES.get(self.schedule)
    for name, weight in self.priors.items():
      PRIORS.get(name)
      if weight < 0:
        raise ValueError(f"prior weight for {name!r} must be >= 0, got {weight}")
    for field, valid in (("batching", BATCHING), ("conv", CONVS), ("init", INITS)):
      if getattr(self, field) not in valid:
        raise KeyError(f"unknown {field} {getattr(self, field)!r}; valid: {', '.join(valid)}")
    PARAMETRIZATIONS.get(self.param)
    for field in ("residual_l1", "residual_l2", "residual_tv"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
    if self.attack_scale not in ATTACK_SCALES:
      raise ValueError(f"attack_scale must be one of {ATTACK_SCALES}, got {self.attack_scale!r}")
    if self.map_batch_size < 0:
      raise ValueError(f"map_batch_size must be >= 0 (0 = auto), got {self.map_batch_size}")
    for field in ("steps", "restarts", "log_every"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if not self.lr > 0:  # also rejects NaN
      raise ValueError(f"lr must be > 0, got {self.lr}")


def resolve_batching(batching: str) -> str:
  """"auto" -> "map" on CPU, "vmap" on accelerators; other values unchanged."""
  if batching != "auto":
    return batching
  return "map" if jax.default_backend() == "cpu" else "vmap"


# Clips of at most this many values (B·T·H·W·C) are attacked in pairs when batching is "map".
SMALL_CLIP_VALUES = 65536


def resolve_map_batch_size(map_batch_size: int, clip_shape: tuple[int, ...]) -> int:
  """0 ("auto") -> 2 for clips of <= `SMALL_CLIP_VALUES` values, else 1; other values unchanged.

  Measured on 2 CPU cores (BUILD.md): a pair stays in cache yet batches its matmuls (c3d, 8×32×32,
  R = 32: 1.2× faster per candidate than one at a time, and than all 32 vmapped); at 16×112×112
  a pair is 8–27 % slower than single candidates.
  """
  if map_batch_size:
    return map_batch_size
  return 2 if math.prod(clip_shape) <= SMALL_CLIP_VALUES else 1


def resolve_conv(conv: str) -> str:
  """"auto" -> "im2col"; other values unchanged."""
  return "im2col" if conv == "auto" else conv
