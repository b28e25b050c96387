"""`reconstruct`: the gradient-inversion attack from a shared update to candidate clips."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.attack import checkpoint
from vidleak_jax.attack.config import AttackConfig
from vidleak_jax.attack.driver import MAX_SNAPSHOTS, ProgressFn, check_state_fits, drive
from vidleak_jax.attack.engine import AttackState, make_attack
from vidleak_jax.attack.labels import recover_labels
from vidleak_jax.attack.objectives import validate_mask
from vidleak_jax.fl.local import UpdateFn
from vidleak_jax.fl.updates import client_update
from vidleak_jax.inputs import check_clips, check_labels
from vidleak_jax.tree_io import validate_target_grads
from vidleak_jax.types import ApplyFn, Grads, Params

__all__ = ["MAX_SNAPSHOTS", "ProgressFn", "Reconstruction", "reconstruct", "validate_clip_shape",
           "validate_target_grads"]


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


def validate_clip_shape(apply_fn: ApplyFn, params: Params, clip_shape) -> tuple[int, ...]:
  """Checks clip_shape is 5 positive ints (B,T,H,W,C) that the model accepts and maps to logits
  [B, K] (a shape-only trace); returns it."""
  return _checked_shapes(apply_fn, params, clip_shape)[0]


def _checked_shapes(apply_fn: ApplyFn, params: Params, clip_shape) -> tuple[tuple[int, ...], int]:
  """(clip_shape as `validate_clip_shape` checks it, K) from one shape-only trace."""
  shape = tuple(int(s) for s in clip_shape)
  if len(shape) != 5 or min(shape) < 1:
    raise ValueError(f"clip_shape must be 5 positive integers (B, T, H, W, C), got {clip_shape}")
  out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(shape, jnp.float32))
  if not (hasattr(out, "shape") and len(out.shape) == 2 and out.shape[0] == shape[0]
          and jnp.issubdtype(out.dtype, jnp.floating)):
    raise ValueError(f"apply_fn must map clips {shape} to float logits [B, K] = [{shape[0]}, K], "
                     f"got {getattr(out, 'shape', type(out).__name__)} "
                     f"{getattr(out, 'dtype', '')}".rstrip())
  return shape, int(out.shape[1])


def reconstruct(key: jax.Array, apply_fn: ApplyFn, params: Params, target_grads: Grads, *,
                clip_shape: tuple[int, ...], labels: jax.Array | None = None,
                config: AttackConfig = AttackConfig(),
                progress: ProgressFn | None = None,
                mesh: jax.sharding.Mesh | None | str = "auto",
                references: jax.Array | None = None,
                checkpoint_dir: str | None = None, checkpoint_every: int = 1,
                should_stop: Callable[[], bool] | None = None,
                update_fn: UpdateFn = client_update,
                label_trajectory: tuple[int, float] | None = None,
                mask: Grads | None = None) -> Reconstruction:
  """Optimises R candidate batches of clips [B,T,H,W,C] whose gradient matches `target_grads`.

  `target_grads`: params' structure, shapes and dtypes (float32 gradients of float32 params),
  finite. `labels`: int class indices [B] in [0, K) (K: the model's number of logits) or
  probabilities [B, K]; `labels=None` recovers them analytically from the last layer's gradient.
  Bad inputs raise ValueError naming the argument. The attack step is jitted once;
  `config.log_every` steps run per dispatch, then `progress` is called.
  `mesh`: restarts are split over its devices; "auto" uses all devices when R divides evenly
  (see `candidate_mesh`), None keeps everything on the default device. `references` [k,H,W,C]
  are the attacker's frames of the same camera (for `config.init="reference"`, and the probes of
  label recovery at B > 1).

  `checkpoint_dir`: the attack resumes from the latest checkpoint there (refused with a
  ValueError if it belongs to a different attack) and saves one after every `checkpoint_every`-th
  dispatch (of `config.log_every` steps) except the last; a resumed run returns exactly what an
  uninterrupted one returns. `should_stop` is asked after every dispatch; when it returns True
  (on any process) a checkpoint is saved and `checkpoint.AttackInterrupted` raised.

  `update_fn`: what the client computed from its clips; the default is the FedSGD gradient; for
  a FedAvg delta pass `vidleak_jax.fl.replay(local, order=...)` (the attack then matches the
  replayed local training) and `label_trajectory=(local steps, local lr)` for label recovery.
  `mask` (a pytree like params, bool or 0/1): match only the entries it keeps, e.g.
  `vidleak_jax.fl.support(target_grads)` against a sparsified update; None matches all.
  """
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1 (dispatches), got {checkpoint_every}")
  clip_shape, logits = _checked_shapes(apply_fn, params, clip_shape)
  validate_target_grads(params, target_grads)
  if mask is not None:
    validate_mask(params, mask)
  if labels is not None:
    labels = check_labels(labels, logits, clip_shape[0])
  if references is not None:
    references = check_clips(references, "references", layout=None)
  label_key, init_key = jax.random.split(key)
  if labels is None:
    labels = recover_labels(label_key, apply_fn, params, target_grads, clip_shape,
                            references=references, trajectory=label_trajectory,
                            update_fn=update_fn)
  labels = jnp.asarray(labels)

  attack = make_attack(apply_fn, params, target_grads, labels, clip_shape, config,
                       references=None if references is None else jnp.asarray(references),
                       update_fn=update_fn, mask=mask)
  check_state_fits(attack.init, init_key, config)  # before anything is allocated
  state: AttackState = jax.jit(attack.init)(init_key)
  init_candidates = np.asarray(state.candidates)  # host copy: the state's buffers get donated
  # A mask is hashed with the update it restricts: a checkpoint of another mask is refused.
  matched = target_grads if mask is None else {"update": target_grads, "mask": mask}
  identity = None if checkpoint_dir is None else checkpoint.describe(
      key, config, clip_shape, labels, matched, references)
  done = drive(attack, state, config, identity=identity, progress=progress, mesh=mesh,
               checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
               should_stop=should_stop,
               snapshot=lambda candidate: attack.decode(jnp.asarray(candidate)))
  best, loss = done.best_restart, float(done.restart_losses[done.best_restart])
  clips = attack.decode(jnp.asarray(done.best_candidate))
  snapshot_steps = np.asarray([*done.snapshot_steps, config.steps], np.int64)
  snapshot_objectives = np.asarray([*done.snapshot_objectives, loss], np.float32)
  snapshots = np.stack([*done.snapshots, np.asarray(clips)]).astype(np.float32)
  return Reconstruction(clips=clips, labels=labels, loss=loss,
                        restart_losses=done.restart_losses, best_restart=best,
                        init_clips=np.asarray(attack.decode(init_candidates[best])),
                        compile_s=done.compile_s, history=done.history,
                        snapshot_steps=snapshot_steps, snapshot_objectives=snapshot_objectives,
                        snapshots=snapshots,
                        clips_lowres=np.asarray(attack.lowres(done.best_candidate)))
