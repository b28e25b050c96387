"""The attack as an optax-style pair: `init(key) -> AttackState`, `run(state, n) -> (state, metrics)`.

Nothing here is jitted; `reconstruct` (or a caller's runner) jits `run` once. All R restarts are
updated inside one call, batched by `vmap` or a `lax.map` over small vmapped groups (see
`AttackConfig.batching`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vidleak_jax.attack.config import (AttackConfig, resolve_batching, resolve_conv,
                                       resolve_map_batch_size)
from vidleak_jax.attack.objectives import gradient_matching_loss
from vidleak_jax.attack.optimizers import make_optimizer
from vidleak_jax.attack.parametrize import make_parametrization
from vidleak_jax.attack.priors import PRIORS
from vidleak_jax.data.clips import resize
from vidleak_jax.models.layers import conv_implementation
from vidleak_jax.types import ApplyFn, Grads, Labels, Params


class AttackState(NamedTuple):
  """Candidates [R,B,T,h,w,C] (latents, see `parametrize`), their optimizer state, the step, and
  the best seen per restart."""

  candidates: jax.Array
  opt_state: Any
  step: jax.Array  # int32 []
  best_loss: jax.Array  # [R]
  best_candidates: jax.Array  # [R,B,T,h,w,C]


class Attack(NamedTuple):
  """init(key) -> state; run(state, n) -> (state, metrics); objective(latents) -> (loss, aux);
  finalize(state) -> state with the last candidates scored too; decode(latents) -> clips at the
  victim's resolution; lowres(latents) -> clips at the attack's resolution."""

  init: Callable[[jax.Array], AttackState]
  run: Callable[[AttackState, jax.Array], tuple[AttackState, dict[str, jax.Array]]]
  objective: Callable[[jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
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


def make_attack(apply_fn: ApplyFn, params: Params, target_grads: Grads, labels: Labels,
                clip_shape: tuple[int, ...], config: AttackConfig, *,
                references: jax.Array | None = None) -> Attack:
  """Builds the attack for clips of `clip_shape` (B,T,H,W,C) with known/recovered `labels` [B].

  `references` [k,H,W,C]: the attacker's frames of the same camera (used by init="reference" and
  param="background_residual"). The optimised latents follow `config.param` and
  `config.attack_scale` (see `vidleak_jax.attack.parametrize`).
  """
  if config.init == "reference":
    expected = (*clip_shape[2:],)
    if references is None or references.ndim != 4 or references.shape[0] < 1 or (
        tuple(references.shape[1:]) != expected):
      raise ValueError(f"init='reference' needs references [k>=1, {', '.join(map(str, expected))}]"
                       f", got {None if references is None else tuple(references.shape)}")
  param = make_parametrization(clip_shape, config, references)
  opt = make_optimizer(config.optimizer, config.lr, config.schedule, config.steps)
  priors = [(PRIORS.get(name), w) for name, w in sorted(config.priors.items()) if w > 0]
  batching, conv = resolve_batching(config.batching), resolve_conv(config.conv)
  map_candidates = functools.partial(
      _map_candidates, batching=batching,
      batch_size=resolve_map_batch_size(config.map_batch_size, clip_shape))

  def objective(latents: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    clips = param.decode(latents)
    with conv_implementation(conv):  # read while tracing: selects the victim's conv kernels
      match = gradient_matching_loss(apply_fn, params, target_grads, clips, labels,
                                     config.metric, layer_weights=config.layer_weights)
    total = match + sum(w * fn(clips) for fn, w in priors)
    if param.penalty is not None:
      total = total + param.penalty(latents)
    return total, {"grad_match": match}

  value_fn = lambda x: objective(x)[0]

  def init(key: jax.Array) -> AttackState:
    shape = (config.restarts, *param.latent_shape)
    candidates = param.encode(init_candidates(key, shape, config.init, references))
    opt_state = map_candidates(opt.init, candidates)
    return AttackState(candidates, opt_state, jnp.zeros((), jnp.int32),
                       jnp.full((config.restarts,), jnp.inf, jnp.float32), candidates)

  def candidate_step(x, opt_state):
    (value, aux), grad = jax.value_and_grad(objective, has_aux=True)(x)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
      updates, opt_state = opt.update(grad, opt_state, x, value=value, grad=grad,
                                      value_fn=value_fn)
    new_x = param.project(optax.apply_updates(x, updates))
    return new_x, opt_state, value, aux["grad_match"]

  def one_step(state: AttackState) -> tuple[AttackState, dict[str, jax.Array]]:
    new_x, opt_state, loss, match = map_candidates(candidate_step, state.candidates,
                                                   state.opt_state)
    # `loss` is the objective at the pre-update candidates.
    best_loss, best = _keep_best(state, loss, state.candidates)
    return (AttackState(new_x, opt_state, state.step + 1, best_loss, best),
            {"loss": loss, "grad_match": match})

  def run(state: AttackState, num_steps: jax.Array) -> tuple[AttackState, dict[str, jax.Array]]:
    """Runs min(num_steps, log_every) steps in one scan; metrics are [log_every, R] (NaN if idle)."""

    def idle(s):
      nan = jnp.full_like(s.best_loss, jnp.nan)  # [R] (or this device's shard of R)
      return s, {"loss": nan, "grad_match": nan}

    def body(state, i):
      return jax.lax.cond(i < num_steps, one_step, idle, state)

    return jax.lax.scan(body, state, jnp.arange(config.log_every))

  def finalize(state: AttackState) -> AttackState:
    loss = map_candidates(value_fn, state.candidates)
    best_loss, best = _keep_best(state, loss, state.candidates)
    return state._replace(best_loss=best_loss, best_candidates=best)

  return Attack(init, run, objective, finalize, param.decode, param.lowres)
