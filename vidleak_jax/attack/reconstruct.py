"""`reconstruct`: the gradient-inversion attack from a shared update to candidate clips."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vidleak_jax.attack import checkpoint
from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.engine import AttackState, make_attack
from vidleak_jax.attack.labels import recover_labels
from vidleak_jax.attack.objectives import leaf_paths
from vidleak_jax.attack.sharding import candidate_mesh, place_state, shard_candidates
from vidleak_jax.types import ApplyFn, Grads, Params

# progress(step_done, total_steps, info) once before the first dispatch (step_done: the step the
# attack starts or resumes from) and after every dispatch. info: "loss" (best objective so far),
# "objective_mean" (mean over restarts at step_done), "grad_match" (gradient-matching term of the
# restart best at step_done), "resumed_from" (the step this call of `reconstruct` started at),
# "compile_s" (after dispatches: the seconds spent compiling before the first one).
ProgressFn = Callable[[int, int, dict[str, float]], None]
MAX_SNAPSHOTS = 32


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """Attack output: best clips [B,T,H,W,C], labels [B], objective, per-step history."""

  clips: jax.Array
  labels: jax.Array
  loss: float
  restart_losses: np.ndarray  # [R] best objective of every restart
  best_restart: int
  init_clips: np.ndarray  # [B,T,H,W,C] the best restart's starting point (a baseline for eval)
  compile_s: float  # compile time of the jitted attack step
  history: dict[str, np.ndarray]  # "loss", "grad_match": [steps, R]
  # The curve: at most MAX_SNAPSHOTS log points, the last one being this result.
  snapshot_steps: np.ndarray  # [S] int steps done
  snapshot_objectives: np.ndarray  # [S] best objective so far
  snapshots: np.ndarray  # [S,B,T,H,W,C] best clips so far (of the best restart)
  clips_lowres: np.ndarray | None = None  # [B,T,H/s,W/s,C] at the attack's resolution


def validate_target_grads(params: Params, target_grads: Grads) -> None:
  """Raises ValueError unless `target_grads` has params' structure, shapes, and finite values."""
  p_paths, g_paths = leaf_paths(params), leaf_paths(target_grads)
  if p_paths != g_paths:
    missing = sorted(set(p_paths) - set(g_paths))[:5]
    extra = sorted(set(g_paths) - set(p_paths))[:5]
    raise ValueError(f"target_grads does not match the model's parameters: missing {missing}, "
                     f"unexpected {extra}")
  for path, p, g in zip(p_paths, jax.tree.leaves(params), jax.tree.leaves(target_grads)):
    if jnp.shape(p) != jnp.shape(g):
      raise ValueError(f"target_grads[{path!r}] has shape {jnp.shape(g)}, expected {jnp.shape(p)}")
    if not np.all(np.isfinite(np.asarray(g))):
      raise ValueError(f"target_grads[{path!r}] contains NaN or Inf values")


def validate_clip_shape(apply_fn: ApplyFn, params: Params, clip_shape) -> tuple[int, ...]:
  """Checks clip_shape is 5 positive ints (B,T,H,W,C) that the model accepts; returns it."""
  shape = tuple(int(s) for s in clip_shape)
  if len(shape) != 5 or min(shape) < 1:
    raise ValueError(f"clip_shape must be 5 positive integers (B, T, H, W, C), got {clip_shape}")
  jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(shape, jnp.float32))  # raises on mismatch
  return shape


def _fetch(tree):
  """Host copies of arrays; arrays spread over several processes are gathered first."""
  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(jax.device_get(a))
  return jax.tree.map(fetch, tree)


def _stop_requested(should_stop: Callable[[], bool] | None) -> bool:
  """Whether any process was asked to stop (all processes stop at the same dispatch).

  Every process passes the same kind of `should_stop`; None (nothing can ask) needs no collective,
  so attacks that run on one process only (e.g. the sr stage's simulations) never wait on others.
  """
  if should_stop is None:
    return False
  stop = bool(should_stop())
  if jax.process_count() > 1:
    stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
  return stop


def _snapshot_dispatches(num_dispatches: int) -> set[int]:
  """Evenly spaced dispatch indices (first and last included) whose best clips form the curve."""
  count = min(MAX_SNAPSHOTS, num_dispatches)
  return set(np.round(np.linspace(0, num_dispatches - 1, count)).astype(int).tolist())


def _best_clips(attack, state: AttackState) -> tuple[float, np.ndarray]:
  """(best objective so far, best clips so far [B,T,H,W,C]) over all restarts."""
  losses, candidates = _fetch((state.best_loss, state.best_candidates))
  best = int(np.argmin(losses))
  return float(losses[best]), np.asarray(attack.decode(jnp.asarray(candidates[best])))


def _log_point(chunk: dict[str, np.ndarray], rows: int, best_seen: float, start: int):
  """The progress info of a dispatch whose metrics `chunk` are [log_every, R] ([:rows] ran)."""
  last = {name: values[rows - 1] for name, values in chunk.items()}  # [R] at its last step
  best = int(np.argmin(np.nan_to_num(last["loss"], nan=np.inf)))
  return {"loss": best_seen, "objective_mean": float(np.mean(last["loss"])),
          "grad_match": float(last["grad_match"][best]), "resumed_from": start}


def reconstruct(key: jax.Array, apply_fn: ApplyFn, params: Params, target_grads: Grads, *,
                clip_shape: tuple[int, ...], labels: jax.Array | None = None,
                config: AttackConfig = AttackConfig(),
                progress: ProgressFn | None = None,
                mesh: jax.sharding.Mesh | None | str = "auto",
                references: jax.Array | None = None,
                checkpoint_dir: str | None = None, checkpoint_every: int = 1,
                should_stop: Callable[[], bool] | None = None) -> Reconstruction:
  """Optimises R candidate batches of clips [B,T,H,W,C] whose gradient matches `target_grads`.

  `labels=None` recovers the labels analytically from the last layer's gradient. The attack step
  is jitted once; `config.log_every` steps run per dispatch, then `progress` is called.
  `mesh`: restarts are split over its devices; "auto" uses all devices when R divides evenly
  (see `candidate_mesh`), None keeps everything on the default device. `references` [k,H,W,C]
  are the attacker's frames of the same camera (for `config.init="reference"`, and the probes of
  label recovery at B > 1).

  `checkpoint_dir`: the attack resumes from the latest checkpoint there (refused with a
  ValueError if it belongs to a different attack) and saves one after every `checkpoint_every`-th
  dispatch (of `config.log_every` steps) except the last; a resumed run returns exactly what an
  uninterrupted one returns. `should_stop` is asked after every dispatch; when it returns True
  (on any process) a checkpoint is saved and `checkpoint.AttackInterrupted` raised.
  """
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1 (dispatches), got {checkpoint_every}")
  clip_shape = validate_clip_shape(apply_fn, params, clip_shape)
  validate_target_grads(params, target_grads)
  label_key, init_key = jax.random.split(key)
  if labels is None:
    labels = recover_labels(label_key, apply_fn, params, target_grads, clip_shape,
                            references=references)
  labels = jnp.asarray(labels)
  if labels.shape[0] != clip_shape[0]:
    raise ValueError(f"labels must have B={clip_shape[0]} entries, got shape {labels.shape}")

  attack = make_attack(apply_fn, params, target_grads, labels, clip_shape, config,
                       references=None if references is None else jnp.asarray(references))
  state: AttackState = jax.jit(attack.init)(init_key)
  init_candidates = np.asarray(state.candidates)  # host copy: the state's buffers get donated
  record, checkpointer = checkpoint.LoopRecord(), None
  if checkpoint_dir is not None:
    checkpointer = checkpoint.Checkpointer(checkpoint_dir, checkpoint.describe(
        key, config, clip_shape, labels, target_grads, references))
    restored = checkpointer.restore(state)
    if restored is not None:
      state, record = jax.tree.map(jnp.asarray, restored[0]), restored[1]
      logging.info("attack resumed at step %d from %s", record.done, checkpoint_dir)
  start_step, best_seen = record.done, record.best_objective()
  if progress is not None:
    progress(start_step, config.steps, {"loss": best_seen, "resumed_from": start_step})
  if mesh == "auto":
    mesh = candidate_mesh(config.restarts)
  if mesh is not None:
    attack, state = shard_candidates(attack, mesh), place_state(state, mesh)
  donate = () if jax.default_backend() == "cpu" else (0,)
  start = time.perf_counter()
  run = jax.jit(attack.run, donate_argnums=donate).lower(state, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - start  # ahead of time: one executable for the whole loop
  logging.info("attack step compiled in %.1fs", compile_s)
  snapshot_at = _snapshot_dispatches(-(-config.steps // config.log_every))
  try:
    while record.done < config.steps:
      dispatch, rows = record.done // config.log_every, min(config.log_every,
                                                            config.steps - record.done)
      state, metrics = run(state, jnp.int32(config.steps - record.done))
      record.chunks.append(_fetch(metrics))
      record.done += rows
      best_seen = min(best_seen, float(np.nanmin(record.chunks[-1]["loss"])))
      if dispatch in snapshot_at and record.done < config.steps:  # the last one: the result
        objective, clips = _best_clips(attack, state)
        record.snapshot_steps.append(record.done)
        record.snapshot_objectives.append(objective)
        record.snapshots.append(clips)
      if progress is not None:  # before saving: a checkpoint never runs ahead of the log
        progress(record.done, config.steps,
                 {**_log_point(record.chunks[-1], rows, best_seen, start_step),
                  "compile_s": compile_s})
      stop = record.done < config.steps and _stop_requested(should_stop)  # done: keep result
      if checkpointer is not None and (stop or (
          (dispatch + 1) % checkpoint_every == 0 and record.done < config.steps)):
        checkpointer.save(_fetch(state), record)
      if stop:
        where = (f"progress saved in {checkpoint_dir}: run it again to resume" if checkpointer
                 else "no checkpoint_dir, progress lost")
        raise checkpoint.AttackInterrupted(
            f"attack stopped at step {record.done}/{config.steps}; {where}")
  finally:
    if checkpointer is not None:
      checkpointer.close()
  state = jax.jit(attack.finalize)(state)
  losses, candidates = _fetch((state.best_loss, state.best_candidates))
  best = int(np.argmin(losses))
  history = {k: v[: config.steps] for k, v in record.history().items()}
  clips = attack.decode(jnp.asarray(candidates[best]))
  snapshot_steps = np.asarray([*record.snapshot_steps, config.steps], np.int64)
  snapshot_objectives = np.asarray([*record.snapshot_objectives, losses[best]], np.float32)
  snapshots = np.stack([*record.snapshots, np.asarray(clips)]).astype(np.float32)
  return Reconstruction(clips=clips, labels=labels,
                        loss=float(losses[best]), restart_losses=losses, best_restart=best,
                        init_clips=np.asarray(attack.decode(init_candidates[best])),
                        compile_s=compile_s, history=history, snapshot_steps=snapshot_steps,
                        snapshot_objectives=snapshot_objectives, snapshots=snapshots,
                        clips_lowres=np.asarray(attack.lowres(candidates[best])))
