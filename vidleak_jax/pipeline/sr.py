"""The pipeline's `sr` stage: reconstruction.npz -> sr.npz.

sr.npz: clips [B,T,H,W,C] in [0, 1] at the victim's resolution (the SR output, clipped) and
inputs [B,T,H/s,W/s,C], what SR started from: the attack's `clips_lowres` when the attack ran at
H/s (`--attack_scale=s`), else the reconstruction block-averaged down by s.

With the reference prior (`--param=background_residual`) the attacker knows the background at full
resolution, so SR keeps its detail: out = SR(inputs) + background - SR(background block-averaged);
static background pixels come out as the background itself, and for bicubic SR this equals the
attack's own decoding background + bicubic(residual).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vidleak_jax import attack
from vidleak_jax.data.synthetic import synthetic_clips
from vidleak_jax.pipeline import clients, rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.settings import InvalidSetting
from vidleak_jax.sr import train
from vidleak_jax.sr.methods import SR_METHODS, Simulator, SRSetup, with_background_detail

_SR_STREAM = 0x5352  # the SR stage's random stream: fold_in(key(seed), _SR_STREAM)


def sr_scale(cfg: RunConfig) -> int:
  """sr.scale, defaulting to the attack's attack_scale."""
  return cfg.sr.scale if cfg.sr.scale is not None else cfg.attack.attack_scale


def sr_input(clips: np.ndarray, clips_lowres: np.ndarray | None, scale: int) -> jax.Array:
  """The low-res clips SR starts from [B,T,H/s,W/s,C]: `clips_lowres` if it has that size, else
  `clips` [B,T,H,W,C] block-averaged; ValueError naming sr_scale unless s divides H and W."""
  h, w = clips.shape[2:4]
  if h % scale or w % scale:
    raise ValueError(f"sr_scale={scale} must divide the clips' height and width, got {h}x{w}")
  if clips_lowres is not None and clips_lowres.shape[2:4] == (h // scale, w // scale):
    return jnp.asarray(clips_lowres)
  return train.degrade(jnp.asarray(clips), scale)


def make_simulator(cfg: RunConfig, apply_fn, params, references: np.ndarray,
                   scale: int) -> Simulator:
  """Attacks on the attacker's own synthetic clips (over the references' median background when
  it has references) with the run's victim, update and attack settings at fewer steps."""
  t, h, w, c = cfg.clip_shape
  shape = (clients.attacked_clips(cfg), t, h, w, c)
  background = np.median(references, axis=0) if len(references) else None
  steps = cfg.sr.simulation_steps
  config = dataclasses.replace(clients.attack_config(cfg), steps=steps, restarts=1,
                               log_every=min(cfg.attack.log_every, steps))

  def simulate(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    data_key, attack_key = jax.random.split(key)
    clips, labels = synthetic_clips(data_key, shape[0], frames=t, height=h, width=w,
                                    channels=c, num_classes=cfg.num_classes,
                                    background=background)
    update = clients.client_side(cfg, apply_fn, params, clips, labels)
    rec = attack.reconstruct(attack_key, apply_fn, params, update, clip_shape=shape,
                             labels=labels, config=config, mesh=None,
                             references=jnp.asarray(references),
                             update_fn=clients.attacker_update_fn(cfg))
    return sr_input(np.asarray(rec.clips), rec.clips_lowres, scale), clips

  return simulate


def stage_sr(cfg: RunConfig) -> None:
  """Super-resolves reconstruction.npz into sr.npz with `cfg.sr` (skipped for method "none")."""
  if cfg.sr.method == "none":
    logging.info("sr: skipped (method none)")
    return
  rec = rundir.require(cfg, "reconstruction.npz", "attack")
  references = rundir.references(cfg)
  scale = sr_scale(cfg)
  low = sr_input(rec["clips"], rec.get("clips_lowres"), scale)
  simulate = None
  if cfg.sr.method == "restoration":
    simulate = make_simulator(cfg, *build_victim(cfg), references, scale)
  key = jax.random.fold_in(jax.random.key(cfg.seed), _SR_STREAM)
  try:
    upscale = SR_METHODS.get(cfg.sr.method)(key, SRSetup(cfg.sr, scale, references, simulate))
  except InvalidSetting as e:  # an SRConfig field: name it within the run's settings
    raise e.within("sr") from None
  if cfg.attack.param == "background_residual" and len(references):
    upscale = with_background_detail(upscale, references, scale)
  out = np.asarray(jnp.clip(upscale(low), 0.0, 1.0))
  if out.shape != rec["clips"].shape:
    raise ValueError(f"sr method {cfg.sr.method!r} gave clips {out.shape}, expected "
                     f"{rec['clips'].shape}")
  rundir.save(cfg, "sr.npz", clips=out, inputs=np.asarray(low))
  logging.info("sr: %s ×%d of %s -> %s", cfg.sr.method, scale, low.shape, out.shape)
