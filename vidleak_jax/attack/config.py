"""Attack hyper-parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax

from vidleak_jax.attack.objectives import DISTANCES
from vidleak_jax.attack.optimizers import LBFGS_MEMORY, OPTIMIZERS, SCHEDULES
from vidleak_jax.attack.parametrize import ATTACK_SCALES, PARAMETRIZATIONS
from vidleak_jax.attack.priors import PRIORS
from vidleak_jax.fl.local import APPROXIMATIONS
from vidleak_jax.settings import check, check_choice, setting, validate_fields

BATCHING = ("auto", "vmap", "map")
CONVS = ("auto", "xla", "im2col", "pallas")
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
  conv: how the victim's convolutions are computed in the attack's objective: "auto" = "im2col"
  rewrites them, whatever library built the victim, as patches + matmuls
  (`vidleak_jax.attack.fast_convs`), which keeps per-candidate weight gradients as batched matmuls
  instead of grouped convolutions; "pallas" computes those without dilation or groups by an
  implicit-GEMM Pallas kernel that never materialises the patches (`vidleak_jax.attack.pallas_conv`;
  interpret mode, i.e. slow, on CPU); "xla" leaves them as written. Same function either way.
  log_every: steps per jitted dispatch (a `lax.scan`); also the progress/logging interval.
  init: "uniform" | "gaussian" | "gray" noise, or "reference": the per-pixel median of the attacker's
  reference frames of the same camera (plus a little noise per restart); needs `references`.
  param: "direct" | "background_residual" (clip = references' median + residual, see
  `vidleak_jax.attack.parametrize`); residual_l1 / residual_l2 / residual_tv weigh the residual's
  mean |r|, mean r^2 and spatial TV in the objective.
  attack_scale: candidates live at (H/s, W/s) and are upsampled bicubically to the victim's size.
  """

  metric: str = setting("cosine", help="Gradient-matching metric.", choices=DISTANCES.names)
  optimizer: str = setting("signed_adam", help="Attack optimizer.", choices=OPTIMIZERS.names)
  lr: float = setting(0.1, help="Attack learning rate.")
  lbfgs_memory: int = setting(LBFGS_MEMORY, help="L-BFGS: past steps in its curvature model "
                              "(more: better-conditioned steps on hard objectives, 2 candidate-"
                              "sized slots each).")
  schedule: str = setting("multistep", help="Learning-rate schedule.", choices=SCHEDULES.names)
  steps: int = setting(200, help="Attack steps.")
  restarts: int = setting(1, help="Restarts R, optimised as one batch.")
  priors: Mapping[str, float] = setting(
      help="Prior name -> weight (flags --tv_spatial, --tv_temporal).",
      default_factory=lambda: {"tv_spatial": 1e-2, "tv_temporal": 1e-2})
  layer_weights: Mapping[str, float] | None = setting(
      None, help="Parameter-path prefix -> weight in the objective (library only).")
  box: bool = setting(True, help="Project candidates to [0, 1] after every step.")
  init: str = setting("uniform", help="Candidate initialisation (reference: median of the "
                      "--references frames).", choices=INITS)
  batching: str = setting("auto", help="How restarts are batched in the jitted step (auto: map "
                          "on CPU, vmap on GPU/TPU).", choices=BATCHING)
  map_batch_size: int = setting(0, help="With --batching=map: restarts vmapped together per "
                                "lax.map step (0: auto, pairs for clips of <= 65,536 values, else "
                                "one at a time).")
  conv: str = setting("auto", help="Victim convolutions while attacking: rewritten as patches + "
                      "matmuls (auto, im2col), by a Pallas implicit-GEMM kernel (pallas; slow on "
                      "CPU) or as written (xla).", choices=CONVS)
  log_every: int = setting(25, help="Steps per dispatch / log line.")
  param: str = setting("direct", help="What the attack optimises: the clip (direct) or a "
                       "residual on the median of the --references frames (background_residual; "
                       "0 references = direct).", choices=PARAMETRIZATIONS.names)
  residual_l1: float = setting(0.0, help="Weight of mean |residual| (background_residual).")
  residual_l2: float = setting(0.0, help="Weight of mean residual^2 (background_residual).")
  residual_tv: float = setting(0.0, help="Weight of the residual's spatial TV "
                               "(background_residual).")
  attack_scale: int = setting(1, help="Candidates live at H/s x W/s and are upsampled "
                              "bicubically to the victim's size.", choices=ATTACK_SCALES)
  replay: str = setting("order", help="Against a FedAvg update: replay the client's local "
                        "training in its mini-batch order (order: the attacker knows it), with "
                        "every step on the whole batch (full_batch: the order is unknown), or "
                        "match one scaled gradient (fedsgd: the FedSGD approximation).",
                        choices=APPROXIMATIONS)

  def __post_init__(self):
    validate_fields(self)
    for name, weight in self.priors.items():
      check_choice("priors", name, PRIORS.names())
      check(weight >= 0, "priors", f"weight for {name!r} must be >= 0, got {weight}")
    for field in ("residual_l1", "residual_l2", "residual_tv"):
      check(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}")
    check(self.map_batch_size >= 0, "map_batch_size",
          f"must be >= 0 (0 = auto), got {self.map_batch_size}")
    for field in ("steps", "restarts", "log_every", "lbfgs_memory"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
    check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")  # also rejects NaN


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
