"""The run directory: keyed random streams, files saved by the writer process and required by later
stages, the one reader of `references.npz`, and the honest client's side of the protocol.

Under `jax.distributed` every process computes every value; process 0 (the writer) writes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import socket
from typing import Any, Iterator

import jax
import numpy as np

from vidleak_jax import io as vio
from vidleak_jax.attack import checkpoint
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.logs import AttackLog
from vidleak_jax.settings import InvalidSetting


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
  and its rounds), "clients" (the attacked round's mini-batch orders), "defenses" (the attacked
  clients' defences) and "dp_sgd" (their DP-SGD noise) are folded in, so the first three stay
  what they were."""
  root = jax.random.key(seed)
  data_key, victim_key, attack_key = jax.random.split(root, 3)
  return {"data": data_key, "victim": victim_key, "attack": attack_key,
          "train": jax.random.fold_in(root, 1), "clients": jax.random.fold_in(root, 2),
          "defenses": jax.random.fold_in(root, 3), "dp_sgd": jax.random.fold_in(root, 4)}


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
