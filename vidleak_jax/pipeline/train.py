"""The `train` stage: FedAvg rounds that train the global model before the attacked round.

A population of `train.clients` clients, each holding `train.client_clips` clips of `train.data`
(synthetic: every client its own camera), trains with the run's `local` settings in every round;
the test accuracy on `train.test_clips` held-out clips (the utility) is logged and written to
train.json after every round, and the global model is checkpointed with orbax in
<workdir>/global_model after every round (a rerun resumes; `weights.attacked_weights` reads it).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging

from vidleak_jax import fl
from vidleak_jax import io as vio
from vidleak_jax.data import sources
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.pipeline.weights import global_model_dir, training_identity

TRAIN_FILE = "train.json"


def _clips(cfg: RunConfig, key: jax.Array, groups: int, per_group: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """clips [groups, per_group, T,H,W,C] and labels [groups, per_group] of `train.data`, group i
  drawn with fold_in(key, i)."""
  t, h, w, c = cfg.clip_shape
  batches = [sources.load_client_batch(
      jax.random.fold_in(key, i), cfg.train.data, batch_size=per_group,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      tfds_dir=cfg.tfds_dir, split="train") for i in range(groups)]
  return np.stack([b.clips for b in batches]), np.stack([b.labels for b in batches])


def stage_train(cfg: RunConfig) -> None:
  """Trains (or resumes training) the global model for `train.rounds` FedAvg rounds."""
  if cfg.victim_weights:
    logging.info("train: the victim's weights come from %s; nothing to train", cfg.victim_weights)
    return
  if cfg.train.rounds == 0:
    logging.info("train: train.rounds=0, the attacked model is freshly initialised")
    return
  tc = cfg.train
  apply_fn, params = build_victim(cfg, trained=False)
  population_key, test_key, rounds_key = jax.random.split(rundir.keys(cfg.seed)["train"], 3)
  clips, labels = _clips(cfg, population_key, tc.clients, tc.client_clips)
  test_groups = math.ceil(tc.test_clips / tc.client_clips)
  test_clips, test_labels = _clips(cfg, test_key, test_groups, tc.client_clips)
  test_clips = test_clips.reshape(-1, *cfg.clip_shape)[:tc.test_clips]
  test_labels = test_labels.reshape(-1)[:tc.test_clips]
  chance = float(np.bincount(test_labels, minlength=cfg.num_classes).max() / len(test_labels))
  start, seen = time.perf_counter(), []

  def progress(done: int, total: int, acc: float) -> None:
    seen.append(done)  # rounds run by this process (a resumed run skips the others)
    eta = (time.perf_counter() - start) / len(seen) * (total - done)
    logging.info("train round %d/%d: test accuracy %.3f (majority class %.3f), ETA %.0fs",
                 done, total, acc, chance, eta)

  _, accuracies = fl.train_global(
      rounds_key, apply_fn, params, clips, labels, test_clips, test_labels, rounds=tc.rounds,
      local=cfg.local, directory=global_model_dir(cfg), identity=training_identity(cfg),
      progress=progress)
  if rundir.is_writer():
    vio.write_json(rundir.path(cfg, TRAIN_FILE), {
        "test_accuracy": accuracies.tolist(), "final_test_accuracy": float(accuracies[-1]),
        "majority_class_accuracy": chance, "rounds": tc.rounds, "clients": tc.clients,
        "client_clips": tc.client_clips, "test_clips": tc.test_clips})
