"""Resumable attacks: the attack's state and the host loop's record in orbax checkpoints.

A checkpoint `<directory>/<step>/` holds
  state   the `AttackState` as host arrays (candidates, optimizer state, step, best per restart)
  record  the per-step history so far ([rows, R] per metric) and the curve snapshots
  meta    JSON: steps done and the run's description (`describe` for the frame attack,
          `describe_objective` for other optimisations), which must match to resume
Orbax writes a checkpoint into a temporary directory and renames it once complete, so a process
killed while saving leaves the previous checkpoint intact. Under jax.distributed every process
saves and restores the same host arrays and process 0 writes them (orbax's multi-process
handling); the directory must then be on a filesystem that all processes share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.engine import AttackState
from vidleak_jax.attack.objectives import leaf_paths
from vidleak_jax.types import Grads


class AttackInterrupted(Exception):
  """A stop was requested between dispatches; the message says where the progress was saved."""


@dataclasses.dataclass
class LoopRecord:
  """What the host loop has gathered: steps done, metric chunks [log_every, R] per dispatch, and
  curve snapshots (step, best objective so far, best restart's best clips [B,T,H,W,C]; none for
  runs without snapshots)."""

  done: int = 0
  chunks: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
  snapshot_steps: list[int] = dataclasses.field(default_factory=list)
  snapshot_objectives: list[float] = dataclasses.field(default_factory=list)
  snapshots: list[np.ndarray] = dataclasses.field(default_factory=list)

  def history(self) -> dict[str, np.ndarray]:
    """Per-step metrics [rows, R] (rows: dispatches × log_every, idle steps NaN)."""
    return {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}

  def best_objective(self) -> float:
    """Lowest objective seen so far (inf before the first dispatch)."""
    if not self.chunks:
      return float("inf")
    loss = self.history()["loss"]
    return float(np.min(np.where(np.isnan(loss), np.inf, loss)))  # idle or diverged: NaN


def _sha256(array) -> str:
  array = np.ascontiguousarray(np.asarray(array))
  return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def _tree_sha256(tree) -> str:
  digest = hashlib.sha256()
  for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree)):
    digest.update(path.encode() + _sha256(leaf).encode())
  return digest.hexdigest()


def describe(key: jax.Array, config: AttackConfig, clip_shape: tuple[int, ...], labels: jax.Array,
             target_grads: Grads, references: jax.Array | None) -> dict[str, Any]:
  """What a checkpoint must match to be resumed (JSON): the attack config, clip shape [5], labels
  [B], hashes of the key, the shared update and the references, the matmul precision in force,
  and a fingerprint of them all."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  description = {
      "config": _config_json(config),
      "clip_shape": list(clip_shape),
      "labels": np.asarray(labels).tolist(),
      "key_sha256": _sha256(key),
      "shared_update_sha256": _tree_sha256(target_grads),
      "references_sha256": None if references is None else _sha256(references),
  }
  return _fingerprinted(description)


def describe_objective(objective: str, config: Any, **arrays: Any) -> dict[str, Any]:
  """The identity of an optimisation other than the frame attack (e.g. a feature stage), as JSON:
  the objective's name, its settings `config` (a dataclass), a hash `<name>_sha256` of every
  array or pytree in `arrays` (None stays None), the matmul precision and a fingerprint. A
  description without "objective" (`describe`) is the frame attack's, so neither resumes the
  other."""
  description = {"objective": objective, "config": _config_json(config),
                 **{f"{name}_sha256": None if tree is None else _tree_sha256(tree)
                    for name, tree in arrays.items()}}
  return _fingerprinted(description)


def _fingerprinted(description: dict[str, Any]) -> dict[str, Any]:
  """`description` with the matmul precision in force and a fingerprint of it all."""
  # jax.default_matmul_precision in force: GPU results differ between "default" and "highest"
  description = {**description, "matmul_precision": jax.config.jax_default_matmul_precision}
  text = json.dumps(description, sort_keys=True)
  return {**description, "fingerprint": hashlib.sha256(text.encode()).hexdigest()}


def _config_json(config: Any) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str))


def _differences(saved: dict[str, Any], current: dict[str, Any],
                 defaults: dict[str, Any]) -> list[str]:
  """What differs between two descriptions; a config field that the saved description lacks
  (added to the config class after it was written) reads as its value in `defaults`."""
  names = []
  for name in sorted(set(saved) | set(current)):
    if name == "fingerprint" or saved.get(name) == current.get(name):
      continue
    if name == "config" and isinstance(saved.get(name), dict):
      old, new = {**defaults, **saved[name]}, current[name]
      names += [f"{field} {old.get(field)!r} -> {new.get(field)!r}"
                for field in sorted(set(old) | set(new)) if old.get(field) != new.get(field)]
    else:
      names.append(name)
  return names


class Checkpointer:
  """Saves and restores one attack's progress in `directory` (the latest checkpoint is kept).

  A checkpoint of a different attack (another config, clip shape, key, labels, shared update or
  references; another objective or any of its hashed arrays) is refused with a ValueError naming
  what differs; it is never overwritten. One written before a config field existed resumes if
  the field has its default value.
  """

  def __init__(self, directory: str, description: dict[str, Any], defaults: Any = None):
    """`defaults`: the config (dataclass) whose values fill in fields that an older checkpoint's
    description lacks; None = `AttackConfig()`."""
    self.directory, self.description = os.path.abspath(directory), description  # orbax needs abs
    self._defaults = _config_json(AttackConfig() if defaults is None else defaults)
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=1, cleanup_tmp_directories=True))

  def _read(self, step: int, **items: ocp.args.CheckpointArgs) -> dict[str, Any]:
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # unreadable or foreign files: never guess
      raise ValueError(f"cannot read the attack checkpoint in {self.directory}/{step}: "
                       f"{type(e).__name__}: {e}; delete {self.directory} to start afresh") from e

  def restore(self, template: AttackState) -> tuple[AttackState, LoopRecord] | None:
    """The latest (state as host arrays shaped like `template`, record), or None if none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._read(step, meta=ocp.args.JsonRestore())["meta"]
    saved = meta.get("description", {})
    differ = ", ".join(_differences(saved, self.description, self._defaults))
    if differ:
      raise ValueError(f"{self.directory} holds a checkpoint of a different attack (differs: "
                       f"{differ}): rerun the command that wrote it to resume it, or delete "
                       f"{self.directory} to start afresh")
    template = jax.tree.map(np.asarray, jax.device_get(template))
    items = self._read(step, state=ocp.args.StandardRestore(template),
                       record=ocp.args.StandardRestore())
    record, snapshots = items["record"], items["record"].get("snapshots")
    return items["state"], LoopRecord(
        done=int(meta["done"]), chunks=[dict(record["history"])],
        snapshot_steps=[] if snapshots is None else snapshots["steps"].tolist(),
        snapshot_objectives=[] if snapshots is None else snapshots["objectives"].tolist(),
        snapshots=[] if snapshots is None else list(snapshots["clips"]))

  def save(self, state: AttackState, record: LoopRecord) -> None:
    """Starts saving `state` (host arrays) and `record` at step `record.done` (asynchronously)."""
    saved = {"history": record.history()}
    if record.snapshots:  # orbax rejects zero-size arrays
      saved["snapshots"] = {"steps": np.asarray(record.snapshot_steps, np.int32),
                            "objectives": np.asarray(record.snapshot_objectives, np.float32),
                            "clips": np.stack(record.snapshots)}
    state = jax.tree.map(np.asarray, state)  # 0-d arrays, never numpy scalars
    self._manager.save(record.done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.StandardSave(saved),
        meta=ocp.args.JsonSave({"done": record.done, "description": self.description})))

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
  """For runners (a library never installs signal handlers): while inside, SIGTERM sets the
  yielded event instead of killing the process; the previous handler is restored on exit.
  Outside the main thread (where handlers cannot be installed) the event is never set."""
  requested = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
  try:
    yield requested
  finally:
    signal.signal(signal.SIGTERM, previous)
