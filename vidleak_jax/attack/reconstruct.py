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

from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.engine import AttackState, make_attack
from vidleak_jax.attack.labels import recover_labels
from vidleak_jax.attack.objectives import leaf_paths
from vidleak_jax.attack.sharding import candidate_mesh, place_state, shard_candidates
from vidleak_jax.types import ApplyFn, Grads, Params

# progress(step_done, total_steps, {"loss": best objective so far, ...}) after every dispatch.
ProgressFn = Callable[[int, int, dict[str, float]], None]


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
  """Host copies of (possibly multi-process, sharded) arrays."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def reconstruct(key: jax.Array, apply_fn: ApplyFn, params: Params, target_grads: Grads, *,
                clip_shape: tuple[int, ...], labels: jax.Array | None = None,
                config: AttackConfig = AttackConfig(),
                progress: ProgressFn | None = None,
                mesh: jax.sharding.Mesh | None | str = "auto",
                references: jax.Array | None = None) -> Reconstruction:
  """Optimises R candidate batches of clips [B,T,H,W,C] whose gradient matches `target_grads`.

  `labels=None` recovers the labels analytically from the last layer's gradient. The attack step
  is jitted once; `config.log_every` steps run per dispatch, then `progress` is called.
  `mesh`: restarts are split over its devices; "auto" uses all devices when R divides evenly
  (see `candidate_mesh`), None keeps everything on the default device. `references` [k,H,W,C]
  are the attacker's frames of the same camera (for `config.init="reference"`).
  """
  clip_shape = validate_clip_shape(apply_fn, params, clip_shape)
  validate_target_grads(params, target_grads)
  label_key, init_key = jax.random.split(key)
  if labels is None:
    labels = recover_labels(label_key, apply_fn, params, target_grads, clip_shape)
  labels = jnp.asarray(labels)
  if labels.shape[0] != clip_shape[0]:
    raise ValueError(f"labels must have B={clip_shape[0]} entries, got shape {labels.shape}")

  attack = make_attack(apply_fn, params, target_grads, labels, clip_shape, config,
                       references=None if references is None else jnp.asarray(references))
  state: AttackState = jax.jit(attack.init)(init_key)
  init_candidates = np.asarray(state.candidates)  # host copy: the state's buffers get donated
  if mesh == "auto":
    mesh = candidate_mesh(config.restarts)
  if mesh is not None:
    attack, state = shard_candidates(attack, mesh), place_state(state, mesh)
  donate = () if jax.default_backend() == "cpu" else (0,)
  start = time.perf_counter()
  run = jax.jit(attack.run, donate_argnums=donate).lower(state, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - start  # ahead of time: one executable for the whole loop
  logging.info("attack step compiled in %.1fs", compile_s)
  chunks, done, best_seen = [], 0, np.inf
  while done < config.steps:
    state, metrics = run(state, jnp.int32(config.steps - done))
    chunks.append(_fetch(metrics))
    done = min(done + config.log_every, config.steps)
    best_seen = min(best_seen, float(np.nanmin(chunks[-1]["loss"])))
    if progress is not None:
      progress(done, config.steps, {"loss": best_seen})
  state = jax.jit(attack.finalize)(state)
  losses, candidates = _fetch((state.best_loss, state.best_candidates))
  best = int(np.argmin(losses))
  history = {k: np.concatenate([c[k] for c in chunks])[: config.steps] for k in chunks[0]}
  return Reconstruction(clips=jnp.asarray(candidates[best]), labels=labels,
                        loss=float(losses[best]), restart_losses=losses, best_restart=best,
                        init_clips=init_candidates[best], compile_s=compile_s,
                        history=history)
