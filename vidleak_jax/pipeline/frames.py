"""The raw-frame pipeline's stages: `data` (client batch and references) and `attack` (the client's
update, then `attack.reconstruct` on what the attacker sees)."""

from __future__ import annotations


import numpy as np
from absl import logging

from vidleak_jax import attack
from vidleak_jax.data import sources
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.types import Grads


def stage_data(cfg: RunConfig) -> None:
  """Loads the client's private batch (data.npz) and the attacker's reference frames
  (references.npz)."""
  t, h, w, c = cfg.clip_shape
  batch = sources.load_client_batch(
      rundir.keys(cfg.seed)["data"], cfg.data, batch_size=cfg.batch_size,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      num_references=cfg.references, tfds_dir=cfg.tfds_dir, split=cfg.data_split)
  rundir.save(cfg, "data.npz", clips=batch.clips, labels=batch.labels,
              origins=np.asarray(batch.origins))
  rundir.save(cfg, "references.npz", frames=batch.references)
  logging.info("data: %d clip(s) of %s from %s, labels %s, %d reference frame(s)",
               cfg.batch_size, cfg.clip_shape, cfg.data, batch.labels.tolist(),
               len(batch.references))


def stage_attack(cfg: RunConfig, captured: Grads | None = None) -> None:
  """Client computes its update (or `captured` is given); the attacker sees only (model, params,
  update) and inverts it into reconstruction.npz."""
  apply_fn, params = build_victim(cfg)
  shared, known = rundir.shared_update(cfg, apply_fn, params, captured)
  # --- attacker side: from here on only public information and the shared update ---
  clip_shape = (cfg.batch_size, *cfg.clip_shape)
  references = rundir.attack_references(cfg)
  with rundir.tracked(cfg) as tracking:
    rec = attack.reconstruct(rundir.keys(cfg.seed)["attack"], apply_fn, params, shared,
                             clip_shape=clip_shape, labels=known, config=cfg.attack,
                             references=references, **tracking)
  rundir.save(cfg, "reconstruction.npz", clips=np.asarray(rec.clips),
              clips_lowres=rec.clips_lowres, labels=np.asarray(rec.labels),
              loss=np.asarray(rec.loss), restart_losses=rec.restart_losses,
              init_clips=rec.init_clips, compile_s=np.asarray(rec.compile_s),
              snapshot_steps=rec.snapshot_steps, snapshot_objectives=rec.snapshot_objectives,
              snapshots=rec.snapshots, **{f"history_{k}": v for k, v in rec.history.items()})
  rundir.drop_checkpoints(cfg)
  logging.info("attack: objective %.5g (best of %d restarts), labels %s", rec.loss,
               cfg.attack.restarts, np.asarray(rec.labels).tolist())
