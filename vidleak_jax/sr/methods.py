"""SR methods by name: each builds an upscaler clips [N,T,h,w,C] -> [N,T,h*s,w*s,C] (unclipped).

  bicubic, lanczos3  `jax.image.resize`, no training.
  espcn, edsr        the network trained on generic frames (synthetic cameras + photos), or
                     restored from `SRConfig.checkpoint` (trained and saved there if empty).
  adapted            the generic `SRConfig.model` fine-tuned on the attacker's reference frames
                     (block-averaged -> original pairs, flips/transposes), plus background
                     detail transfer: out = SR(x) + m - SR(m block-averaged), m the references'
                     per-pixel median, so the static scene keeps its full-resolution detail.
  restoration        the generic `SRConfig.model` fine-tuned on (attack output, ground truth) pairs
                     of attacks the attacker simulates on its own clips with the same victim and
                     attack settings (few steps), so it also learns to remove attack artefacts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.registry import Registry
from vidleak_jax.settings import InvalidSetting, check, setting, validate_fields
from vidleak_jax.sr import apply, train
from vidleak_jax.sr.models import SR_MODELS, SR_SCALES

Upscaler = Callable[[jax.Array], jax.Array]
# simulate(key) -> (low-res attack outputs [B,T,h,w,C], their ground truth [B,T,H,W,C])
Simulator = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
GENERIC_SIZE = 32  # side of the generic training frames (divisible by every SR scale)
GENERIC_SEED = 0  # generic networks are one fixed artifact, whatever the run's seed


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRConfig:
  """Settings of the `sr` stage (each field's help says what it sets)."""

  method: str = setting("none", help="Super-resolution of the reconstruction (stage sr): bicubic "
                        "| lanczos3 | espcn | edsr (generic training) | adapted (fine-tuned on the "
                        "--references frames) | restoration (fine-tuned on simulated attacks) | "
                        "none.", choices=lambda: ("none", *SR_METHODS.names()))
  scale: int | None = setting(None, help="Upscaling factor 1, 2 or 4 (default --attack_scale).",
                              choices=SR_SCALES)
  model: str = setting("espcn", help="Network of --sr=adapted / restoration.",
                       choices=SR_MODELS.names)
  steps: int = setting(300, help="Generic SR training steps.")
  finetune_steps: int = setting(150, help="Fine-tuning steps of --sr=adapted / restoration.")
  checkpoint: str | None = setting(None, help="Orbax directory of the generic SR network: "
                                   "restored if it holds one, else trained and saved there "
                                   "(resumable).")
  temporal_radius: int = setting(0, help="Neighbouring frames on each side given to the SR "
                                 "network as extra channels.")
  simulations: int = setting(2, help="Simulated attacks of --sr=restoration.")
  simulation_steps: int = setting(100, help="Attack steps of each simulated attack.")

  def __post_init__(self):
    validate_fields(self)
    for field in ("steps", "finetune_steps", "simulations", "simulation_steps"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
    check(self.temporal_radius >= 0, "temporal_radius",
          f"must be >= 0, got {self.temporal_radius}")


class SRSetup(NamedTuple):
  """What an SR method may use: settings, scale, the references [k,H,W,C], an attack simulator."""

  config: SRConfig
  scale: int
  references: np.ndarray
  simulate: Simulator | None = None


SR_METHODS: Registry[Callable[[jax.Array, SRSetup], Upscaler]] = Registry("SR method")


@SR_METHODS.register("bicubic")
def _bicubic(key: jax.Array, setup: SRSetup) -> Upscaler:
  del key
  return lambda clips: apply.bicubic(clips, setup.scale)


@SR_METHODS.register("lanczos3")
def _lanczos3(key: jax.Array, setup: SRSetup) -> Upscaler:
  del key
  return lambda clips: apply.lanczos3(clips, setup.scale)


def generic_model(setup: SRSetup, name: str):
  """The generic network `name`: trained into, resumed from or loaded from `config.checkpoint`.

  Its weights depend only on (name, scale, temporal radius, steps), not on the run's seed or SR
  method, so one checkpoint serves every run that shares them.
  """
  cfg = setup.config
  try:
    model, _ = train.train_generic(jax.random.key(GENERIC_SEED), name, scale=setup.scale,
                                   size=GENERIC_SIZE, frames=4, steps=cfg.steps,
                                   temporal_radius=cfg.temporal_radius,
                                   checkpoint_dir=cfg.checkpoint)
  except ValueError as e:
    raise InvalidSetting("checkpoint", f"checkpoint={cfg.checkpoint!r}: {e}") from None
  return model


def _network(model, setup: SRSetup) -> Upscaler:
  return lambda clips: apply.apply_model(model, clips,
                                         temporal_radius=setup.config.temporal_radius)


def _generic(name: str) -> Callable[[jax.Array, SRSetup], Upscaler]:
  def build(key: jax.Array, setup: SRSetup) -> Upscaler:
    del key  # the generic network is the same for every run
    return _network(generic_model(setup, name), setup)
  return build


SR_METHODS.register("espcn")(_generic("espcn"))
SR_METHODS.register("edsr")(_generic("edsr"))


def adapt(key: jax.Array, model, references: jax.Array, *, scale: int, steps: int,
          temporal_radius: int = 0):
  """`model` fine-tuned on reference frames [k,H,W,C] (block-averaged -> original pairs)."""
  high = jnp.asarray(references)[:, None]  # static one-frame clips [k,1,H,W,C]
  pairs = train.pairs_from_clips(train.degrade(high, scale), high,
                                 temporal_radius=temporal_radius)
  return train.fit(key, model, pairs, steps=steps, learning_rate=5e-4)[0]


@SR_METHODS.register("adapted")
def _adapted(key: jax.Array, setup: SRSetup) -> Upscaler:
  if len(setup.references) == 0:
    raise InvalidSetting("method", "method='adapted' needs the attacker's reference frames "
                         "(none given)")
  model = adapt(key, generic_model(setup, setup.config.model),
                setup.references, scale=setup.scale, steps=setup.config.finetune_steps,
                temporal_radius=setup.config.temporal_radius)
  return with_background_detail(_network(model, setup), setup.references, setup.scale)


def with_background_detail(upscale: Upscaler, references: np.ndarray, scale: int) -> Upscaler:
  """x -> upscale(x) + m - upscale(m block-averaged), m = median of references [k,H,W,C].

  Pixels that show the static background come out as the full-resolution background; applying
  it twice changes nothing (upscale of the block-averaged m becomes m itself).
  """
  background = jnp.median(jnp.asarray(references), axis=0)[None, None]  # [1,1,H,W,C]
  detail = background - upscale(train.degrade(background, scale))
  return lambda clips: upscale(clips) + detail


@SR_METHODS.register("restoration")
def _restoration(key: jax.Array, setup: SRSetup) -> Upscaler:
  if setup.simulate is None:
    raise ValueError("method='restoration' needs setup.simulate (victim and attack settings)")
  sim_key, fit_key = jax.random.split(key)
  lows, highs = zip(*(setup.simulate(k) for k in
                      jax.random.split(sim_key, setup.config.simulations)))
  pairs = train.pairs_from_clips(jnp.concatenate(lows), jnp.concatenate(highs),
                                 temporal_radius=setup.config.temporal_radius)
  model = generic_model(setup, setup.config.model)
  model = train.fit(fit_key, model, pairs, steps=setup.config.finetune_steps,
                    learning_rate=5e-4)[0]
  return _network(model, setup)
