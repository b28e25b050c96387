"""Attacks on the feature pipeline (frozen extractor + trained classifier head).

Stage 1 recovers the feature matrix F [B,T,D] the client's clips produced:
  closed form from the head's first dense layer (`attack.analytic`): exact at B = 1, and for
      the clips that some unit sees alone at B > 1.
  `match_features`  gradient matching in feature space: optimise F̂ until the head's gradient
      on (F̂, labels) matches the shared one (`objectives.gradient_matching_loss` with the head's
      apply_fn); works for every head and batch size, optionally over a code F̂ = decode(z)
      (the pipeline's `subspace` attack: z = coefficients in the first layer's input span).
Stage 2 `invert_features` recovers frames: optimise clips so extractor(clips) ≈ F̂, with spatial
and temporal TV priors, from gray or from the attacker's reference frames.
End to end, the pixels are optimised through extractor + head against the head's gradient: that is
`attack.reconstruct` with `heads.feature_victim`'s apply_fn, nothing new.
Both stages run on the frame attack's core (`engine.make_optimisation`, `driver.drive`): batched
restarts, progress, checkpoint/resume, stop requests and mesh sharding work the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from vidleak_jax.attack import checkpoint
from vidleak_jax.attack.config import BATCHING
from vidleak_jax.attack.driver import ProgressFn, drive
from vidleak_jax.attack.engine import make_optimisation
from vidleak_jax.attack.objectives import DISTANCES, gradient_matching_loss
from vidleak_jax.attack.optimizers import LBFGS_MEMORY, OPTIMIZERS, SCHEDULES
from vidleak_jax.attack.priors import tv_spatial, tv_temporal
from vidleak_jax.fl.local import UpdateFn
from vidleak_jax.fl.updates import client_update
from vidleak_jax.settings import check, setting, validate_fields
from vidleak_jax.types import ApplyFn, Grads, Params

Objective = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
  """Optimisation settings of one feature-attack stage (optimizer/schedule: registry names)."""

  optimizer: str = setting("lbfgs", help="Optimizer of the stage.", choices=OPTIMIZERS.names)
  lr: float = setting(0.1, help="Learning rate (lbfgs: its line search sets the step).")
  lbfgs_memory: int = setting(LBFGS_MEMORY, help="L-BFGS: past steps in its curvature model "
                              "(more: better-conditioned steps on hard objectives, 2 candidate-"
                              "sized slots each).")
  schedule: str = setting("constant", help="Learning-rate schedule.", choices=SCHEDULES.names)
  steps: int = setting(300, help="Optimisation steps.")
  metric: str = setting("l2", help="Stage 1: gradient-matching distance.",
                        choices=DISTANCES.names)
  tv_spatial: float = setting(0.0, help="Stage 2: weight of the spatial TV prior.")
  tv_temporal: float = setting(0.0, help="Stage 2: weight of the temporal TV prior.")
  restarts: int = setting(1, help="Stage 1: starts optimised as one batch; the best objective "
                                  "wins.")
  restart_noise: float = setting(0.5, help="Stage 1: restart r > 0 starts at "
                                           "init*(1 + noise*N(0, 1)).")
  log_every: int = setting(25, help="Steps per dispatch / progress and checkpoint interval.")
  batching: str = setting("vmap", help="How restarts are batched in the jitted step: all at "
                                       "once (vmap), lax.map over groups (map), auto: map on "
                                       "CPU, vmap on accelerators.", choices=BATCHING)
  map_batch_size: int = setting(0, help="With batching=map: restarts vmapped together per "
                                        "lax.map step (0 = auto).")

  def __post_init__(self):
    validate_fields(self)
    for field in ("steps", "restarts", "log_every", "lbfgs_memory"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
    check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")  # also rejects NaN
    for field in ("restart_noise", "tv_spatial", "tv_temporal", "map_batch_size"):
      check(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class Recovered:
  """Best point found [B,...], its objective, the objective per step [steps] (of the winning
  restart), and the best objective of every restart [R]."""

  value: jax.Array
  loss: float
  history: np.ndarray
  restart_losses: np.ndarray


def _minimise(name: str, objective: Callable, starts: jax.Array, config: StageConfig, *,
              project: Callable | None = None, decode: Callable | None = None,
              identity: dict[str, Any], checkpoint_dir: str | None, **run: Any) -> Recovered:
  """Minimises `objective` (x -> (loss, metrics)) from `starts` [R,...] with `driver.drive`;
  the checkpoint identity is the stage `name`, `config`, `starts` and the arrays of `identity`."""
  attack = make_optimisation(objective, lambda _: starts, config, project=project, decode=decode)
  description = None if checkpoint_dir is None else checkpoint.describe_objective(
      name, config, starts=starts, **identity)
  done = drive(attack, attack.init(None), config, identity=description,  # starts need no key
               name=name.replace("_", " "), checkpoint_dir=checkpoint_dir, **run)
  best = done.best_restart
  return Recovered(attack.decode(jnp.asarray(done.best_candidate)),
                   float(done.restart_losses[best]), np.array(done.history["loss"][:, best]),
                   done.restart_losses)


def feature_matching_objective(head_apply: ApplyFn, params: Params, target_grads: Grads,
                               labels: jax.Array, metric: str = "l2", *,
                               update_fn: UpdateFn = client_update,
                               mask: Grads | None = None) -> Objective:
  """features [B,T,D] -> distance between the head's update on them (`update_fn`, default its
  FedSGD gradient) and `target_grads`, on the entries `mask` keeps (`gradient_matching_loss`)."""
  return lambda f: gradient_matching_loss(head_apply, params, target_grads, f, labels, metric,
                                          update_fn=update_fn, mask=mask)


def restart_points(key: jax.Array | None, init: jax.Array, config: StageConfig) -> jax.Array:
  """Starting points [R,...]: restart 0 at `init`, restart r > 0 at init·(1 + restart_noise·N(0,
  1)) elementwise (from `key`, needed when R > 1)."""
  if config.restarts == 1:
    return init[None]
  if key is None:
    raise ValueError("match_features with restarts > 1 needs a key")
  noise = jax.random.normal(key, (config.restarts - 1, *init.shape), init.dtype)
  return jnp.concatenate([init[None], init * (1.0 + config.restart_noise * noise)])


def match_features(head_apply: ApplyFn, params: Params, target_grads: Grads, labels: jax.Array,
                   init: jax.Array, config: StageConfig = StageConfig(), *,
                   key: jax.Array | None = None,
                   decode: Callable[[jax.Array], jax.Array] | None = None,
                   progress: ProgressFn | None = None, checkpoint_dir: str | None = None,
                   checkpoint_every: int = 1, should_stop: Callable[[], bool] | None = None,
                   mesh: jax.sharding.Mesh | None | str = None,
                   update_fn: UpdateFn = client_update, mask: Grads | None = None) -> Recovered:
  """Stage 1 by gradient matching: features [B,T,D] from `init` whose head update matches.

  With `decode`, the variable is a code z (`init` is z's start) and the features are decode(z)
  (e.g. coefficients in the span the gradient allows, `analytic.input_span`); the result holds
  the decoded features. With `config.restarts` = R > 1, restart 0 starts at `init` and the others
  at `init` scaled by 1 + restart_noise·N(0, 1) elementwise (from `key`); the best objective wins.
  progress / checkpoint_dir / checkpoint_every / should_stop / mesh: as in `reconstruct` (a
  checkpoint of another objective, config, start, head, labels or shared update is refused);
  mesh None keeps everything on the default device. `update_fn` / `mask`: the attacker's model of
  the client's update on the candidate features (e.g. a FedAvg replay, a defence's noise-free
  part) and the entries matched (a sparsifying defence's support), as in `reconstruct`.
  """
  matching = feature_matching_objective(head_apply, params, target_grads, labels, config.metric,
                                        update_fn=update_fn, mask=mask)
  code = (lambda f: f) if decode is None else decode

  def objective(z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = matching(code(z))
    return loss, {"grad_match": loss}

  starts = restart_points(key, jnp.asarray(init, jnp.float32), config)
  identity = {} if checkpoint_dir is None else {
      "labels": jnp.asarray(labels), "params": params, "target_grads": target_grads,
      "decoded_start": None if decode is None else decode(starts[0]), "mask": mask}
  return _minimise("feature_matching", objective, starts, config, decode=decode,
                   identity=identity, progress=progress, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=checkpoint_every, should_stop=should_stop, mesh=mesh)


def feature_inversion_objective(extract: Callable[[jax.Array], jax.Array], target: jax.Array,
                                config: StageConfig) -> Objective:
  """clips [B,T,H,W,C] -> ||extract(clips) − target||² / ||target||² + TV priors."""
  scale = 1.0 / jnp.maximum(jnp.sum(jnp.square(target)), 1e-12)

  def objective(clips: jax.Array) -> jax.Array:
    loss = jnp.sum(jnp.square(extract(clips) - target)) * scale
    if config.tv_spatial:
      loss = loss + config.tv_spatial * tv_spatial(clips)
    if config.tv_temporal:
      loss = loss + config.tv_temporal * tv_temporal(clips)
    return loss

  return objective


def invert_features(extract: Callable[[jax.Array], jax.Array], target: jax.Array,
                    init_clips: jax.Array, config: StageConfig = StageConfig(), *,
                    progress: ProgressFn | None = None, checkpoint_dir: str | None = None,
                    checkpoint_every: int = 1, should_stop: Callable[[], bool] | None = None,
                    mesh: jax.sharding.Mesh | None | str = None) -> Recovered:
  """Stage 2: clips [B,T,H,W,C] in [0, 1], from `init_clips`, whose features match `target`.

  One start (`config.restarts` is stage 1's). progress / checkpoint_dir / checkpoint_every /
  should_stop / mesh: as in `match_features` (the checkpoint identity holds the target and the
  start, not the extractor's weights).
  """
  objective = feature_inversion_objective(extract, jnp.asarray(target, jnp.float32), config)
  config = dataclasses.replace(config, restarts=1)
  starts = jnp.asarray(init_clips, jnp.float32)[None]
  identity = {} if checkpoint_dir is None else {"target": jnp.asarray(target, jnp.float32)}
  return _minimise("feature_inversion", lambda x: (objective(x), {}), starts, config,
                   project=lambda x: jnp.clip(x, 0.0, 1.0), identity=identity,
                   progress=progress, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=checkpoint_every, should_stop=should_stop, mesh=mesh)


def match_features_to_truth(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """perm [B] minimising the summed relative error, estimate[perm[i]] ~ truth[i] ([B,T,D] each)."""
  est = np.asarray(estimate, np.float64).reshape(len(truth), -1)
  ref = np.asarray(truth, np.float64).reshape(len(truth), -1)
  cost = np.linalg.norm(est[None, :] - ref[:, None], axis=-1) / np.maximum(
      np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)  # [true, estimate]
  rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e30))
  perm = np.empty_like(cols)
  perm[rows] = cols
  return perm.astype(np.int64)


def feature_errors(estimate: jax.Array, truth: jax.Array) -> dict[str, list[float]]:
  """Per clip ||F̂ − F|| / ||F|| and cosine(F̂, F) of feature matrices [B,T,D], and the relative
  error of their time means [B,D] (all a head that pools over time can reveal); host floats."""
  est = np.asarray(estimate, np.float64).reshape(len(truth), -1, np.shape(truth)[-1])
  ref = np.asarray(truth, np.float64).reshape(est.shape)

  def rel_error(a, b):
    a, b = a.reshape(len(b), -1), b.reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)

  flat_est, flat_ref = est.reshape(len(ref), -1), ref.reshape(len(ref), -1)
  norms = np.linalg.norm(flat_est, axis=1) * np.linalg.norm(flat_ref, axis=1)
  cos = (flat_est * flat_ref).sum(axis=1) / np.maximum(norms, 1e-12)
  return {"feature_rel_error": rel_error(est, ref).tolist(), "feature_cosine": cos.tolist(),
          "pooled_feature_rel_error": rel_error(est.mean(axis=1), ref.mean(axis=1)).tolist()}
