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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from vidleak_jax.attack.objectives import gradient_matching_loss
from vidleak_jax.attack.optimizers import make_optimizer
from vidleak_jax.attack.priors import tv_spatial, tv_temporal
from vidleak_jax.types import ApplyFn, Grads, Params

Objective = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
  """Optimisation settings of one feature-attack stage (optimizer/schedule: registry names)."""

  optimizer: str = "lbfgs"
  lr: float = 0.1
  schedule: str = "constant"
  steps: int = 300
  metric: str = "l2"  # stage 1 only: gradient-matching distance
  tv_spatial: float = 0.0  # stage 2 only
  tv_temporal: float = 0.0  # stage 2 only
  restarts: int = 1  # stage 1 only: starts optimised at once (vmap), the best objective wins
  restart_noise: float = 0.5  # stage 1 only: restart r > 0 starts at init·(1 + noise·N(0, 1))

  def __post_init__(self):
    if self.steps < 1 or not self.lr > 0:
      raise ValueError(f"steps must be >= 1 and lr > 0, got {self.steps}, {self.lr}")
    if self.restarts < 1 or self.restart_noise < 0:
      raise ValueError(f"restarts must be >= 1 and restart_noise >= 0, got {self.restarts}, "
                       f"{self.restart_noise}")
    if self.tv_spatial < 0 or self.tv_temporal < 0:
      raise ValueError("tv_spatial and tv_temporal must be >= 0")


@dataclasses.dataclass(frozen=True)
class Recovered:
  """Best point found [B,...], its objective, the objective per step [steps]."""

  value: jax.Array
  loss: float
  history: np.ndarray


def optimise(objective: Objective, x0: jax.Array, config: StageConfig, *,
             box: tuple[float, float] | None = None) -> Recovered:
  """Minimises `objective` from x0 with the configured optax optimizer in one jitted scan;
  x0 [R, ...] with `restarts` > 1 starts R optimisations at once and keeps the best."""
  opt = make_optimizer(config.optimizer, config.lr, config.schedule, config.steps)

  def step(carry, _):
    x, state, best_x, best = carry
    value, grad = jax.value_and_grad(objective)(x)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
      updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=objective)
    better = value < best
    best_x, best = jnp.where(better, x, best_x), jnp.where(better, value, best)
    x = optax.apply_updates(x, updates)
    if box is not None:
      x = jnp.clip(x, *box)
    return (x, state, best_x, best), value

  def run(x0):
    carry = (x0, opt.init(x0), x0, jnp.asarray(jnp.inf, jnp.float32))
    (x, _, best_x, best), history = jax.lax.scan(step, carry, None, length=config.steps)
    last = objective(x)  # the final point is scored too
    return jnp.where(last < best, x, best_x), jnp.minimum(last, best), history

  if config.restarts == 1:
    best_x, best, history = jax.jit(run)(x0)
    return Recovered(best_x, float(best), np.asarray(history))
  best_x, best, history = jax.jit(jax.vmap(run))(x0)
  winner = int(jnp.nanargmin(best))
  return Recovered(best_x[winner], float(best[winner]), np.asarray(history[winner]))


def feature_matching_objective(head_apply: ApplyFn, params: Params, target_grads: Grads,
                               labels: jax.Array, metric: str = "l2") -> Objective:
  """features [B,T,D] -> distance between the head's gradient on them and `target_grads`."""
  return lambda f: gradient_matching_loss(head_apply, params, target_grads, f, labels, metric)


def match_features(head_apply: ApplyFn, params: Params, target_grads: Grads, labels: jax.Array,
                   init: jax.Array, config: StageConfig = StageConfig(), *,
                   key: jax.Array | None = None,
                   decode: Callable[[jax.Array], jax.Array] | None = None) -> Recovered:
  """Stage 1 by gradient matching: features [B,T,D] from `init` whose head gradient matches.

  With `decode`, the variable is a code z (`init` is z's start) and the features are decode(z)
  (e.g. coefficients in the span the gradient allows, `analytic.input_span`); the result holds
  the decoded features. With `config.restarts` = R > 1, restart 0 starts at `init` and the others
  at `init` scaled by 1 + restart_noise·N(0, 1) elementwise (from `key`); the best objective wins.
  """
  matching = feature_matching_objective(head_apply, params, target_grads, labels, config.metric)
  objective = matching if decode is None else (lambda z: matching(decode(z)))
  init = jnp.asarray(init, jnp.float32)
  if config.restarts == 1:
    found = optimise(objective, init, config)
  else:
    if key is None:
      raise ValueError("match_features with restarts > 1 needs a key")
    noise = jax.random.normal(key, (config.restarts - 1, *init.shape), init.dtype)
    starts = jnp.concatenate([init[None], init * (1.0 + config.restart_noise * noise)])
    found = optimise(objective, starts, config)
  return found if decode is None else dataclasses.replace(found, value=decode(found.value))


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
                    init_clips: jax.Array, config: StageConfig = StageConfig()) -> Recovered:
  """Stage 2: clips [B,T,H,W,C] in [0, 1], from `init_clips`, whose features match `target`."""
  objective = feature_inversion_objective(extract, jnp.asarray(target, jnp.float32), config)
  return optimise(objective, jnp.asarray(init_clips, jnp.float32), config, box=(0.0, 1.0))


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
