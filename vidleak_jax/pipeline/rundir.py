"""The run directory: keyed random streams, files saved by the writer process and required by later
stages, the one reader of `references.npz`, and the honest client's side of the protocol.

Under `jax.distributed` every process computes every value; process 0 (the writer) writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import os
import shutil
import socket
from typing import Any, Iterator

import jax
import numpy as np

from vidleak_jax import fl
from vidleak_jax import io as vio
from vidleak_jax.attack import AttackConfig, checkpoint
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.logs import AttackLog
from vidleak_jax.settings import InvalidSetting
from vidleak_jax.tree_io import flatten_tree, unflatten_like
from vidleak_jax.types import Grads


LOCK_FILE = ".lock"


class RunDirBusy(OSError):
  """Another process holds the run directory's lock; the message names it."""


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
  """While inside, this process alone writes `workdir`: it holds `<workdir>/.lock` (an fcntl
  lock, released by the OS when the process ends, even by SIGKILL), whose text names the holder.
  RunDirBusy naming the holder if another process holds it; ValueError if `workdir` is a file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InvalidSetting("workdir", f"workdir={workdir!r} is a file, not a directory")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise RunDirBusy(f"workdir {workdir!r} is in use by {holder}; wait for it to finish or "
                       f"use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def keys(seed: int) -> dict[str, jax.Array]:
  """One seed, split once by purpose: "data", "victim", "attack"; "train" (the FL population
  and its rounds) and "clients" (the attacked round's mini-batch orders) are folded in, so the
  first three stay what they were."""
  root = jax.random.key(seed)
  data_key, victim_key, attack_key = jax.random.split(root, 3)
  return {"data": data_key, "victim": victim_key, "attack": attack_key,
          "train": jax.random.fold_in(root, 1), "clients": jax.random.fold_in(root, 2)}


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def path(cfg: RunConfig, name: str) -> str:
  return os.path.join(cfg.workdir, name)


def save(cfg: RunConfig, name: str, **arrays) -> None:
  """The writer process saves `name` (npz, atomically) in the workdir; the others do nothing."""
  if is_writer():
    vio.save_npz(path(cfg, name), **arrays)


def require(cfg: RunConfig, name: str, stage: str) -> dict[str, np.ndarray]:
  """The arrays of `name`; FileNotFoundError naming the `stage` that writes it if it is missing."""
  file = path(cfg, name)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found: run the {stage!r} stage first (stages)")
  return vio.load_npz(file)


def references(cfg: RunConfig) -> np.ndarray:
  """All the attacker's reference frames [k,H,W,C] (k = 0 when the data stage wrote none)."""
  file = path(cfg, "references.npz")
  if not os.path.exists(file):
    return np.zeros((0, *cfg.clip_shape[1:]), np.float32)
  return vio.load_npz(file)["frames"]


def attack_references(cfg: RunConfig) -> np.ndarray | None:
  """The reference frames [k,H,W,C] when the attack uses them (init "reference" or param
  "background_residual"), else None; ValueError if init "reference" finds none."""
  if cfg.attack.init != "reference" and cfg.attack.param != "background_residual":
    return None
  frames = require(cfg, "references.npz", "data")["frames"]
  if len(frames) == 0 and cfg.attack.init == "reference":
    raise InvalidSetting("references", "attack.init='reference' needs reference frames: rerun "
                         "the 'data' stage with references=k (k >= 1)")
  return frames


def attacked_clips(cfg: RunConfig) -> int:
  """Clips in the attacked round: N clients × B clips."""
  return cfg.clients * cfg.batch_size


def client_batch(cfg: RunConfig) -> tuple[jax.Array, jax.Array]:
  """The attacked round's private clips [N·B,T,H,W,C] and labels [N·B] from data.npz (client i
  holds rows i·B .. i·B+B−1), checked against cfg."""
  batch = require(cfg, "data.npz", "data")
  clips, labels = jax.numpy.asarray(batch["clips"]), jax.numpy.asarray(batch["labels"])
  expected = (attacked_clips(cfg), *cfg.clip_shape)
  if clips.shape != expected:
    raise InvalidSetting("clip_shape", f"data.npz holds clips of shape {clips.shape}, but "
                         f"clients={cfg.clients}, batch_size={cfg.batch_size} and clip_shape="
                         f"{cfg.clip_shape} ask for {expected}: rerun the 'data' stage")
  return clips, labels


def client_orders(cfg: RunConfig) -> jax.Array | None:
  """Each attacked client's local mini-batch order, int32 [N, steps, b] (FedAvg), else None."""
  if cfg.update != "fedavg":
    return None
  return jax.vmap(lambda k: fl.minibatch_order(k, cfg.batch_size, cfg.local))(
      fl.client_keys(keys(cfg.seed)["clients"], 0, cfg.clients))


def client_side(cfg: RunConfig, apply_fn, params, clips, labels):
  """What the server sees of the attacked round, like params: the mean of the N clients'
  updates (FedSGD gradients or FedAvg deltas), each on its B clips."""
  n = cfg.clients
  clips = clips.reshape(n, cfg.batch_size, *clips.shape[1:])
  labels = labels.reshape(n, cfg.batch_size, *labels.shape[1:])
  if cfg.update == "fedsgd":
    updates = jax.jit(jax.vmap(fl.client_update, in_axes=(None, None, 0, 0)), static_argnums=0)(
        apply_fn, params, clips, labels)
  else:
    local = cfg.local

    def fedavg(apply_fn, params, c, l, o):
      return fl.fedavg_update(apply_fn, params, c, l, local=local, order=o)

    updates = jax.jit(jax.vmap(fedavg, in_axes=(None, None, 0, 0, 0)), static_argnums=0)(
        apply_fn, params, clips, labels, client_orders(cfg))
  return fl.aggregate([jax.tree.map(lambda u, i=i: u[i], updates) for i in range(n)])


# FedAvg rounds of at least this many local steps are replayed with each step's activations
# recomputed in the backward pass (`jax.checkpoint`): the replay's memory then stays that of one
# step instead of growing with the steps, for about one more forward pass per step.
REMAT_LOCAL_STEPS = 8


def attacker_update_fn(cfg: RunConfig) -> fl.UpdateFn:
  """The attacker's model of what the round's clients computed from N·B candidate clips (their
  public local settings; the mini-batch orders too when `attack.replay` is "order")."""
  if cfg.update == "fedsgd":
    return fl.aggregated([fl.client_update] * cfg.clients)
  remat = cfg.local.steps(cfg.batch_size) >= REMAT_LOCAL_STEPS
  if cfg.attack.replay != "order":
    return fl.aggregated([fl.replay(cfg.local, approximation=cfg.attack.replay, remat=remat)]
                         * cfg.clients)
  return fl.aggregated([fl.replay(cfg.local, order=order, remat=remat)
                        for order in client_orders(cfg)])


def attack_config(cfg: RunConfig) -> AttackConfig:
  """`cfg.attack` with its penalty weights (priors, residual terms) weighed against the update's
  scale. A FedAvg delta is about lr × steps = s times a gradient, so the l2 (l1) match is s²
  (s) times what it is against a FedSGD gradient; the weights are scaled alike, keeping the
  balance that the same attack has against a gradient (cosine is scale-free)."""
  if cfg.update != "fedavg" or cfg.attack.metric == "cosine":
    return cfg.attack
  scale = cfg.local.lr * cfg.local.steps(cfg.batch_size)
  factor = scale ** 2 if cfg.attack.metric == "l2" else scale
  return dataclasses.replace(
      cfg.attack, priors={k: w * factor for k, w in cfg.attack.priors.items()},
      **{k: getattr(cfg.attack, k) * factor for k in ("residual_l1", "residual_l2",
                                                      "residual_tv")})


def label_trajectory(cfg: RunConfig) -> tuple[int, float] | None:
  """(local steps, local lr) of a FedAvg round, for label recovery from its delta; else None."""
  if cfg.update != "fedavg":
    return None
  return cfg.local.steps(cfg.batch_size), cfg.local.lr


def shared_update(cfg: RunConfig, apply_fn, params, captured: Grads | None):
  """(the update the attacker sees, like params; the true labels when the attacker is given
  them, else None): the client's update on data.npz (saved as shared_update.npz), or `captured`."""
  if captured is not None:
    return unflatten_like(params, flatten_tree(captured), name="shared_update.npz"), None
  clips, labels = client_batch(cfg)
  shared = flatten_tree(client_side(cfg, apply_fn, params, clips, labels))
  save(cfg, "shared_update.npz", **shared)
  known = labels if cfg.known_labels else None
  return unflatten_like(params, shared, name="shared_update.npz"), known


CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def tracked(cfg: RunConfig, name: str = "attack") -> Iterator[dict[str, Any]]:
  """Keyword arguments of `attack.reconstruct` / the feature stages that give the optimisation
  `name` a progress bar and log (`AttackLog`), checkpoints (<workdir>/checkpoints for the frame
  attack, <workdir>/checkpoints/<name> otherwise; a rerun resumes) and a SIGTERM stop."""
  directory = path(cfg, CHECKPOINTS if name == "attack" else os.path.join(CHECKPOINTS, name))
  with checkpoint.stop_on_sigterm() as stop, AttackLog(
      cfg.workdir, quiet=cfg.quiet, write=is_writer(), name=name) as log:
    yield {"progress": log, "checkpoint_dir": directory,
           "checkpoint_every": cfg.checkpoint_every, "should_stop": stop.is_set}


def drop_checkpoints(cfg: RunConfig) -> None:
  """Once the attack's outputs are written, the progress the checkpoints hold is not needed."""
  if is_writer():
    shutil.rmtree(path(cfg, CHECKPOINTS), ignore_errors=True)
