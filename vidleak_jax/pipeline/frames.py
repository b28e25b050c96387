"""The raw-frame pipeline's stages: `data` (client batch and references) and `attack` (the client's
update, then `attack.reconstruct` on what the attacker sees)."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from vidleak_jax import attack
from vidleak_jax.data import sources
from vidleak_jax.pipeline import clients, rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.types import Grads


def stage_data(cfg: RunConfig) -> None:
  """Loads the attacked round's private clips (data.npz: client i's B clips, drawn with the data
  key folded with i for i >= 1, so client 0's batch is the single-client run's) and the
  attacker's reference frames of client 0's camera (references.npz)."""
  t, h, w, c = cfg.clip_shape
  data_key = rundir.keys(cfg.seed)["data"]
  batches = [sources.load_client_batch(
      jax.random.fold_in(data_key, i) if i else data_key, cfg.data, batch_size=cfg.batch_size,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      num_references=0 if i else cfg.references, tfds_dir=cfg.tfds_dir, split=cfg.data_split)
      for i in range(cfg.clients)]
  labels = np.concatenate([b.labels for b in batches])
  rundir.save(cfg, "data.npz", clips=np.concatenate([b.clips for b in batches]), labels=labels,
              origins=np.asarray([o for b in batches for o in b.origins]))
  rundir.save(cfg, "references.npz", frames=batches[0].references)
  logging.info("data: %d client(s) × %d clip(s) of %s from %s, labels %s, %d reference "
               "frame(s)", cfg.clients, cfg.batch_size, cfg.clip_shape, cfg.data,
               labels.tolist(), len(batches[0].references))


def stage_attack(cfg: RunConfig, captured: Grads | None = None) -> None:
  """Client computes its update (or `captured` is given); the attacker sees only (model, params,
  update) and inverts it into reconstruction.npz."""
  apply_fn, params = build_victim(cfg)
  shared, known = clients.shared_update(cfg, apply_fn, params, captured)
  # --- attacker side: from here on only public information and the shared update ---
  clip_shape = (clients.attacked_clips(cfg), *cfg.clip_shape)
  references = rundir.attack_references(cfg)
  support = clients.match_support(cfg, shared)  # the defences are public: the attack adapts
  with rundir.tracked(cfg) as tracking:
    rec = attack.reconstruct(rundir.keys(cfg.seed)["attack"], apply_fn, params, shared,
                             clip_shape=clip_shape, labels=known,
                             config=clients.attack_config(cfg), references=references,
                             update_fn=clients.attacker_update_fn(cfg, support=support),
                             label_trajectory=clients.label_trajectory(cfg), mask=support,
                             **tracking)
  rundir.save(cfg, "reconstruction.npz", clips=np.asarray(rec.clips),
              clips_lowres=rec.clips_lowres, labels=np.asarray(rec.labels),
              loss=np.asarray(rec.loss), restart_losses=rec.restart_losses,
              init_clips=rec.init_clips, compile_s=np.asarray(rec.compile_s),
              snapshot_steps=rec.snapshot_steps, snapshot_objectives=rec.snapshot_objectives,
              snapshots=rec.snapshots, **{f"history_{k}": v for k, v in rec.history.items()})
  rundir.drop_checkpoints(cfg)
  logging.info("attack: objective %.5g (best of %d restarts), labels %s", rec.loss,
               cfg.attack.restarts, np.asarray(rec.labels).tolist())
