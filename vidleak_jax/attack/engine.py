"""Optimisations as optax-style pairs: `init(key) -> state`, `run(state, n) -> (state, metrics)`.

`make_optimisation` is the core every attack uses: R candidates minimise one objective, each
with its own optimizer state, keeping the best point seen per restart. `make_attack` is the
gradient-inversion attack on clips built on it. Nothing here is jitted; `driver.drive` (or a
caller's runner) jits `run` once. All R restarts are updated inside one call, batched by `vmap`
or a `lax.map` over small vmapped groups (see `AttackConfig.batching`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from vidleak_jax.attack.config import AttackConfig, resolve_batching, resolve_map_batch_size
from vidleak_jax.attack.objectives import gradient_matching_loss
from vidleak_jax.attack.optimizers import make_optimizer
from vidleak_jax.attack.parametrize import make_parametrization
from vidleak_jax.attack.priors import PRIORS
from vidleak_jax.data.clips import resize
from vidleak_jax.fl.local import UpdateFn
from vidleak_jax.fl.updates import client_update
from vidleak_jax.types import ApplyFn, Grads, Labels, Params

# x [...] (one candidate) -> (objective [], {metric name: []}).
ObjectiveFn = Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
Transform = Callable[[jax.Array], jax.Array]


class Settings(Protocol):
  """The optimisation settings `make_optimisation` reads (`AttackConfig` and
  `features.StageConfig` have them all): optimizer/schedule are registry names, `log_every` the
  steps per `run` call, batching/map_batch_size as in `AttackConfig`."""

  optimizer: str
  lr: float
  lbfgs_memory: int
  schedule: str
  steps: int
  restarts: int
  log_every: int
  batching: str
  map_batch_size: int


class AttackState(NamedTuple):
  """Candidates [R,...] (for clips: latents [R,B,T,h,w,C], see `parametrize`), their optimizer
  state, the step, and the best seen per restart."""

  candidates: jax.Array
  opt_state: Any
  step: jax.Array  # int32 []
  best_loss: jax.Array  # [R]
  best_candidates: jax.Array  # [R,...]


class Attack(NamedTuple):
  """init(key) -> state; run(state, n) -> (state, metrics); objective(x) -> (loss, aux);
  finalize(state) -> state with the last candidates scored too; decode(x) -> the result (clips
  at the victim's resolution for `make_attack`); lowres(x) -> clips at the attack's resolution."""

  init: Callable[[jax.Array], AttackState]
  run: Callable[[AttackState, jax.Array], tuple[AttackState, dict[str, jax.Array]]]
  objective: ObjectiveFn
  finalize: Callable[[AttackState], AttackState]
  decode: Callable[[jax.Array], jax.Array]
  lowres: Callable[[jax.Array], jax.Array]


def init_candidates(key: jax.Array, shape: tuple[int, ...], kind: str,
                    references: jax.Array | None) -> jax.Array:
  """Initial clips [R,B,T,h,w,C]; "reference" starts from the references' median frame (resized
  to h×w by block averaging)."""
  if kind == "uniform":
    return jax.random.uniform(key, shape, jnp.float32)
  if kind == "gaussian":
    return jnp.clip(0.5 + 0.25 * jax.random.normal(key, shape, jnp.float32), 0.0, 1.0)
  noise = 0.01 * jax.random.normal(key, shape, jnp.float32)
  if kind == "reference":  # the static background of the camera, broadcast over R, B and T
    median = resize(jnp.median(references, axis=0), shape[-3:-1], method="area")
    return jnp.clip(median + noise, 0.0, 1.0)
  return 0.5 + noise  # "gray"


def _map_candidates(fn: Callable, *args, batching: str, batch_size: int):
  """fn over the leading candidate axis: all vmapped at once ("vmap"), or a `lax.map` over groups
  of `batch_size` vmapped candidates ("map"; R <= batch_size is a single group, no loop)."""
  restarts = jax.tree.leaves(args)[0].shape[0]
  if batching == "vmap" or restarts <= batch_size:
    return jax.vmap(fn)(*args)
  return jax.lax.map(lambda a: fn(*a), args, batch_size=batch_size)


def _keep_best(state: AttackState, loss: jax.Array, candidates: jax.Array):
  """(best_loss [R], best_candidates) after scoring `candidates` [R,...] with `loss` [R]."""
  improved = loss < state.best_loss
  mask = improved.reshape(-1, *([1] * (candidates.ndim - 1)))
  return (jnp.where(improved, loss, state.best_loss),
          jnp.where(mask, candidates, state.best_candidates))


def make_optimisation(objective: ObjectiveFn, starts: Callable[[jax.Array], jax.Array],
                      settings: Settings, *, project: Transform | None = None,
                      decode: Transform | None = None, lowres: Transform | None = None) -> Attack:
  """Minimises `objective` over R candidates from `starts(key)` [R,...] with the optimizer,
  schedule and batching of `settings` (`settings.steps` sets the schedule's length).

  `project(x)` is applied after every update (e.g. a box; identity if None). The loss of a step
  is the objective at the pre-update point; the best point seen per restart is kept (`finalize`
  scores the last one too). `decode`/`lowres` (identity if None) go into the `Attack` unchanged.
  `settings.map_batch_size` 0 resolves from one candidate's shape (`resolve_map_batch_size`).
  """
  opt = make_optimizer(settings.optimizer, settings.lr, settings.schedule, settings.steps,
                       lbfgs_memory=settings.lbfgs_memory)
  batching = resolve_batching(settings.batching)
  identity = lambda x: x
  project, decode = project or identity, decode or identity
  value_fn = lambda x: objective(x)[0]

  def map_candidates(fn: Callable, *args):
    shape = jax.tree.leaves(args)[0].shape[1:]  # one candidate
    return _map_candidates(fn, *args, batching=batching,
                           batch_size=resolve_map_batch_size(settings.map_batch_size, shape))

  def init(key: jax.Array) -> AttackState:
    candidates = starts(key)
    opt_state = map_candidates(opt.init, candidates)
    return AttackState(candidates, opt_state, jnp.zeros((), jnp.int32),
                       jnp.full(candidates.shape[:1], jnp.inf, jnp.float32), candidates)

  def candidate_step(x, opt_state):
    (value, aux), grad = jax.value_and_grad(objective, has_aux=True)(x)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
      updates, opt_state = opt.update(grad, opt_state, x, value=value, grad=grad,
                                      value_fn=value_fn)
    return project(optax.apply_updates(x, updates)), opt_state, value, aux

  def one_step(state: AttackState) -> tuple[AttackState, dict[str, jax.Array]]:
    new_x, opt_state, loss, aux = map_candidates(candidate_step, state.candidates,
                                                 state.opt_state)
    # `loss` is the objective at the pre-update candidates.
    best_loss, best = _keep_best(state, loss, state.candidates)
    return AttackState(new_x, opt_state, state.step + 1, best_loss, best), {"loss": loss, **aux}

  def run(state: AttackState, num_steps: jax.Array) -> tuple[AttackState, dict[str, jax.Array]]:
    """Runs min(num_steps, log_every) steps in one scan; metrics [log_every, R] (NaN if idle)."""

    def idle(s):
      one = jax.ShapeDtypeStruct(s.candidates.shape[1:], s.candidates.dtype)
      _, aux = jax.eval_shape(objective, one)
      nan = lambda like: jnp.full(s.best_loss.shape, jnp.nan, like.dtype)  # [R] (or a shard)
      return s, {"loss": nan(s.best_loss), **jax.tree.map(nan, aux)}

    def body(state, i):
      return jax.lax.cond(i < num_steps, one_step, idle, state)

    return jax.lax.scan(body, state, jnp.arange(settings.log_every))

  def finalize(state: AttackState) -> AttackState:
    loss = map_candidates(value_fn, state.candidates)
    best_loss, best = _keep_best(state, loss, state.candidates)
    return state._replace(best_loss=best_loss, best_candidates=best)

  return Attack(init, run, objective, finalize, decode, lowres or identity)


def make_attack(apply_fn: ApplyFn, params: Params, target_grads: Grads, labels: Labels,
                clip_shape: tuple[int, ...], config: AttackConfig, *,
                references: jax.Array | None = None,
                update_fn: UpdateFn = client_update, mask: Grads | None = None) -> Attack:
  """Builds the attack for clips of `clip_shape` (B,T,H,W,C) with known/recovered `labels` [B].

  `references` [k,H,W,C]: the attacker's frames of the same camera (used by init="reference" and
  param="background_residual"). The optimised latents follow `config.param` and
  `config.attack_scale` (see `vidleak_jax.attack.parametrize`). `update_fn`: what the client
  computed from its clips; `mask` (like params): the entries matched, None = all (see
  `gradient_matching_loss`).
  """
  if config.init == "reference":
    expected = (*clip_shape[2:],)
    if references is None or references.ndim != 4 or references.shape[0] < 1 or (
        tuple(references.shape[1:]) != expected):
      raise ValueError(f"init='reference' needs references [k>=1, {', '.join(map(str, expected))}]"
                       f", got {None if references is None else tuple(references.shape)}")
  param = make_parametrization(clip_shape, config, references)
  priors = [(PRIORS.get(name), w) for name, w in sorted(config.priors.items()) if w > 0]

  def objective(latents: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    clips = param.decode(latents)
    # config.conv "auto"/"im2col": the victim's convolutions rewritten as patches + matmuls
    # (`fast_convs`), once per trace of the objective.
    match = gradient_matching_loss(apply_fn, params, target_grads, clips, labels, config.metric,
                                   layer_weights=config.layer_weights, conv=config.conv,
                                   update_fn=update_fn, mask=mask)
    total = match + sum(w * fn(clips) for fn, w in priors)
    if param.penalty is not None:
      total = total + param.penalty(latents)
    return total, {"grad_match": match}

  def starts(key: jax.Array) -> jax.Array:
    shape = (config.restarts, *param.latent_shape)
    return param.encode(init_candidates(key, shape, config.init, references))

  # Groups of "map" batching are sized by the clip at the victim's resolution.
  settings = dataclasses.replace(
      config, map_batch_size=resolve_map_batch_size(config.map_batch_size, clip_shape))
  return make_optimisation(objective, starts, settings, project=param.project,
                           decode=param.decode, lowres=param.lowres)
