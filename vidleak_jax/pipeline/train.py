"""The `train` stage: FedAvg rounds that train the global model before the attacked round.

A population of `train.clients` clients, each holding `train.client_clips` clips of `train.data`
(synthetic: every client its own camera), trains with the run's `local` settings in every round;
the test accuracy on `train.test_clips` held-out clips (the utility) is logged after every round
and written to train.json at the end; the global model is checkpointed with orbax in
<workdir>/global_model every tenth of the rounds and after the last (a rerun resumes;
`weights.attacked_weights` reads it).

The population's clients defend their updates as the attacked round's clients do (`defenses`:
the utility of a defence is the test accuracy of the model trained under it): under dp_sgd every
local step clips and noises its per-example gradients (`fl.dp_fedavg_update`), and train.json
adds the ε that dp-accounting's RDP accountant gives all those steps at δ = DP_DELTA
(`training_epsilon`); soteria prunes its delta's classifier rows; the update transforms follow,
with keys of their own.
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
from vidleak_jax.pipeline import clients, rundir
from vidleak_jax.pipeline.config import DP_SGD, SOTERIA, RunConfig, parse_defenses
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.pipeline.weights import global_model_dir, training_identity
from vidleak_jax.types import ApplyFn, Params

TRAIN_FILE = "train.json"
DP_DELTA = 1e-5  # δ at which train.json reports the training's ε under dp_sgd


def defended_client(cfg: RunConfig, apply_fn: ApplyFn, params: Params
                    ) -> fl.ClientFn | None:
  """What a training client shares under cfg.defenses (None: the undefended FedAvg delta)."""
  chain = dict(parse_defenses(cfg.defenses))
  if not chain:
    return None
  transforms = [d for _, d in clients.update_transforms(cfg)]
  dp, sot = chain.get(DP_SGD), chain.get(SOTERIA)
  kernel = clients.classifier_kernel(cfg, apply_fn, params) if sot else None

  def client(p, c, l, order, key):
    if dp is not None:
      delta = fl.dp_fedavg_update(apply_fn, p, c, l, local=cfg.local, order=order,
                                  key=jax.random.fold_in(key, 1), **dp)
    else:
      delta = fl.fedavg_update(apply_fn, p, c, l, local=cfg.local, order=order)
    if sot is not None:
      delta = fl.soteria.soteria(apply_fn, p, c, delta, kernel=kernel, percent=sot["percent"])
    return fl.defend(jax.random.fold_in(key, 2), delta, transforms) if transforms else delta

  return client


def training_epsilon(cfg: RunConfig) -> float | None:
  """ε at DP_DELTA of the `train` stage's DP-SGD (None without dp_sgd): every client takes
  `local.steps(n)` noised steps per round over `train.rounds` rounds, each on b of its n clips,
  accounted as Poisson sampling at rate b / n (the usual reading of shuffled mini-batches; 1 for
  full-batch FedSGD, no amplification)."""
  dp = dict(parse_defenses(cfg.defenses)).get(DP_SGD)
  if dp is None:
    return None
  n = cfg.train.client_clips
  rate = cfg.local.minibatch(n) / n
  return fl.epsilon(dp["noise_multiplier"], rate, cfg.train.rounds * cfg.local.steps(n),
                    DP_DELTA)


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
      progress=progress, client_fn=defended_client(cfg, apply_fn, params),
      save_every=max(1, tc.rounds // 10))
  if rundir.is_writer():
    vio.write_json(rundir.path(cfg, TRAIN_FILE), {
        "test_accuracy": accuracies.tolist(), "final_test_accuracy": float(accuracies[-1]),
        "majority_class_accuracy": chance, "rounds": tc.rounds, "clients": tc.clients,
        "client_clips": tc.client_clips, "test_clips": tc.test_clips,
        "defenses": list(cfg.defenses), "dp_epsilon": training_epsilon(cfg),
        "dp_delta": DP_DELTA})
