"""Client-side defences: transforms of the update a client shares (the FedSGD gradient or the
FedAvg delta, a pytree like params), applied after it is computed and before it is sent.

Each defence is an optax `GradientTransformationExtraArgs` (stateless: `init` returns
`optax.EmptyState()`), built by name from `DEFENSES` (`build("top_k", fraction=0.1)`) or by its
factory, and jit-able (its settings are static, closed over). Defences compose in order, first
one first, with `defend(key, update, defenses)`, `compose(*defenses)` or `optax.chain`.

Randomness (random_mask, qsgd, clip_and_noise) comes from a `key` extra argument of `update`,
not from the state: a client's update is defended once per round with a key the caller derives
from the client and round (the project's explicit-key convention), so there is no state to thread
between rounds and the same (key, update) always gives the same defended update. `defend` and
`compose` hand link i of the chain `fold_in(key, i)` (independent draws per link); `optax.chain`
hands every link the same key, so use it only with at most one random defence. A random defence
called without a key raises ValueError naming `key`.

Scopes and conventions (n: entries of the whole update; a tensor: one leaf):
  top_k           keeps exactly the k largest |entries| of the whole update (ties: lowest index);
                  `fraction` f keeps k = ceil(f·n).
  prune           DLG's pruning: zeros exactly floor(p·n) entries, the smallest |entries| of the
                  whole update (`per_tensor`: of each leaf, floor(p·size) per leaf); it keeps
                  the n − floor(p·n) largest as top_k does (ties: the later entries go).
  random_mask     keeps each entry independently with probability q (no 1/q rescaling).
  fp16            float16 round trip (relative error <= 2^-11 in float16's normal range).
  int8            symmetric uniform int8 per tensor: scale = max|x| / 127, x -> round(x/scale)·scale
                  (error <= scale/2 per entry).
  qsgd            QSGD (Alistarh et al. 2017) per tensor with s levels of |x|/||x||_2, stochastic
                  rounding to a neighbouring level: unbiased, error < ||x||_2 / s per entry.
  sign            signSGD per tensor: sign(x) · mean|x| (zeros stay zero).
  clip_and_noise  the update-level Gaussian mechanism: scale the update to global L2 norm <= C,
                  add N(0, (σC)²) to every entry.

A defence is also named by a spec string, "name" or "name:key=value:key=value" (e.g.
"top_k:fraction=0.1", "clip_and_noise:clip_norm=1:noise_multiplier=0.01"): `parse_spec` reads
one, `from_spec` builds it. `SPARSIFYING` names the defences whose zeros mean "not sent".
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vidleak_jax.registry import Registry
from vidleak_jax.settings import check
from vidleak_jax.types import Grads

Defense = optax.GradientTransformationExtraArgs
DEFENSES: Registry[Callable[..., Defense]] = Registry("defense")
# Defences that zero entries the client then does not send: a zero of their output says nothing
# about the entry's value (an attacker matches only on the update's support).
SPARSIFYING = frozenset({"top_k", "prune", "random_mask"})

_TINY = 1e-30  # guards divisions by a zero norm or scale


def _stateless(name: str, fn: Callable[..., Grads], *, random: bool = False) -> Defense:
  """A stateless defence applying `fn(update)` (or `fn(key, update)` when `random`)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, key: jax.Array | None = None, **extra_args):
    del params, extra_args
    if not random:
      return fn(updates), state
    if key is None:
      raise ValueError(f"key: the {name} defence draws random numbers; pass key=... (or use "
                       "defend(key, update, defenses))")
    return fn(key, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def _size(tree: Grads) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def _split_like(flat: jax.Array, tree: Grads) -> Grads:
  """A flat array of `tree`'s n entries cut into a pytree shaped like it."""
  leaves, treedef = jax.tree.flatten(tree)
  out, start = [], 0
  for leaf in leaves:
    out.append(flat[start:start + leaf.size].reshape(leaf.shape))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


def uniform_like(key: jax.Array, tree: Grads) -> Grads:
  """U[0, 1) float32 entries shaped like `tree`'s leaves (one flat draw: one RNG op to compile,
  whatever the leaves' ranks)."""
  return _split_like(jax.random.uniform(key, (_size(tree),)), tree)


def gaussian_like(key: jax.Array, tree: Grads) -> Grads:
  """N(0, 1) float32 entries shaped like `tree`'s leaves (one flat draw, as `uniform_like`)."""
  return _split_like(jax.random.normal(key, (_size(tree),)), tree)


def _count(x: float) -> float:
  """x rounded to 9 decimals, so that e.g. 0.7 × 10 counts 7 entries, not 7.000000000000001."""
  return round(x, 9)


def _keep_largest(tree: Grads, k: int) -> Grads:
  """`tree` with all but its k largest-magnitude entries (over all leaves) set to zero."""
  flat = jnp.concatenate([jnp.abs(x).astype(jnp.float32).ravel() for x in jax.tree.leaves(tree)])
  if k >= flat.size:
    return tree
  if k <= 0:
    return jax.tree.map(jnp.zeros_like, tree)
  _, idx = jax.lax.top_k(flat, k)
  keep = _split_like(jnp.zeros(flat.shape, bool).at[idx].set(True), tree)
  return jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros((), x.dtype)), keep, tree)


@DEFENSES.register("top_k")
def top_k(*, k: int | None = None, fraction: float | None = None) -> Defense:
  """Top-k sparsification over the whole update: keeps exactly its k largest |entries| (or
  k = ceil(fraction · n) of its n entries), zeros the rest. Give exactly one of k, fraction;
  k > n raises ValueError when the update is seen."""
  check((k is None) != (fraction is None), "k", f"or fraction: give exactly one, got k={k}, "
        f"fraction={fraction}")
  if k is not None:
    check(isinstance(k, (int, np.integer)) and k >= 1, "k", f"must be an integer >= 1, got {k!r}")
  else:
    check(0 < fraction <= 1, "fraction", f"must be in (0, 1], got {fraction}")

  def apply(update):
    n = _size(update)
    kept = int(k) if k is not None else math.ceil(_count(fraction * n))
    check(kept <= n, "k", f"must be <= the update's {n} entries, got {kept}")
    return _keep_largest(update, kept)

  return _stateless("top_k", apply)


@DEFENSES.register("prune")
def prune(p: float, *, per_tensor: bool = False) -> Defense:
  """DLG's gradient pruning: zeros the floor(p · n) smallest-|x| entries of the whole update (or
  of each leaf when `per_tensor`), p in [0, 1)."""
  check(0 <= p < 1, "p", f"(pruned fraction) must be in [0, 1), got {p}")

  def keep(tree):
    n = _size(tree)
    return _keep_largest(tree, n - math.floor(_count(p * n)))

  def apply(update):
    if per_tensor:
      return jax.tree.map(keep, update)
    return keep(update)

  return _stateless("prune", apply)


@DEFENSES.register("random_mask")
def random_mask(q: float) -> Defense:
  """Keeps each entry independently with probability q in (0, 1] (zeros it otherwise; kept
  entries are not rescaled). Needs a key."""
  check(0 < q <= 1, "q", f"(keep probability) must be in (0, 1], got {q}")

  def apply(key, update):
    return jax.tree.map(lambda u, x: jnp.where(u < q, x, jnp.zeros((), x.dtype)),
                        uniform_like(key, update), update)

  return _stateless("random_mask", apply, random=True)


@DEFENSES.register("fp16")
def fp16() -> Defense:
  """float16 round trip of every entry (dtype kept); |x| > 65504 becomes ±inf."""
  return _stateless("fp16", lambda u: jax.tree.map(
      lambda x: x.astype(jnp.float16).astype(x.dtype), u))


def _int8(x: jax.Array) -> jax.Array:
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf)) / 127
  q = jnp.clip(jnp.round(xf / jnp.maximum(scale, _TINY)), -127, 127)
  return (q * scale).astype(x.dtype)


@DEFENSES.register("int8")
def int8() -> Defense:
  """Symmetric uniform int8 per tensor: scale = max|x| / 127, x -> round(x / scale) · scale."""
  return _stateless("int8", lambda u: jax.tree.map(_int8, u))


@DEFENSES.register("qsgd")
def qsgd(s: int) -> Defense:
  """QSGD with s >= 1 levels per tensor: x_i -> ||x||₂ · sign(x_i) · l_i / s with l_i the level
  below or above s|x_i|/||x||₂, the upper one with probability of its distance (unbiased).
  Needs a key."""
  check(isinstance(s, (int, np.integer)) and s >= 1, "s", f"(levels) must be an integer >= 1, "
        f"got {s!r}")

  def quantize(u, x):
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf)))
    level = jnp.abs(xf) / jnp.maximum(norm, _TINY) * s
    lower = jnp.floor(level)
    up = (u < level - lower).astype(jnp.float32)
    return (norm * jnp.sign(xf) * (lower + up) / s).astype(x.dtype)

  return _stateless("qsgd", lambda key, upd: jax.tree.map(quantize, uniform_like(key, upd), upd),
                    random=True)


@DEFENSES.register("sign")
def sign() -> Defense:
  """signSGD per tensor: sign(x) · mean|x| (zeros stay zero)."""
  return _stateless("sign", lambda u: jax.tree.map(
      lambda x: jnp.sign(x) * jnp.mean(jnp.abs(x)), u))


@DEFENSES.register("clip_and_noise")
def clip_and_noise(clip_norm: float, noise_multiplier: float) -> Defense:
  """Update-level Gaussian mechanism: update · min(1, C / ||update||₂) (global norm over all
  leaves) plus N(0, (σC)²) per entry; C = clip_norm > 0, σ = noise_multiplier >= 0. Needs a
  key."""
  check(clip_norm > 0, "clip_norm", f"must be > 0, got {clip_norm}")
  check(noise_multiplier >= 0, "noise_multiplier", f"must be >= 0, got {noise_multiplier}")
  std = noise_multiplier * clip_norm

  def apply(key, update):
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(global_norm(update), _TINY))
    return jax.tree.map(lambda z, x: (x.astype(jnp.float32) * scale + std * z).astype(x.dtype),
                        gaussian_like(key, update), update)

  return _stateless("clip_and_noise", apply, random=True)


def build(name: str, **settings: Any) -> Defense:
  """The defence registered as `name` with its `settings` (e.g. build("prune", p=0.3)).
  KeyError listing the valid names for an unknown one; ValueError naming a setting the
  defence does not take, or one it needs that is missing."""
  factory = DEFENSES.get(name)
  valid = inspect.signature(factory).parameters
  unknown = [s for s in settings if s not in valid]
  if unknown:
    raise ValueError(f"defense {name!r} takes no setting {', '.join(unknown)}; valid: "
                     f"{', '.join(valid) or 'none'}")
  missing = [s for s, p in valid.items() if p.default is p.empty and s not in settings]
  if missing:
    raise ValueError(f"defense {name!r} needs setting(s) {', '.join(missing)}")
  return factory(**settings)


def _spec_value(text: str) -> int | float | bool:
  """A spec value: an integer, a finite float, or true/false."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    pass
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"{text!r} is not a number or true/false") from None
  if not math.isfinite(value):
    raise ValueError(f"{text!r} is not finite")
  return value


def parse_spec(spec: str) -> tuple[str, dict[str, int | float | bool]]:
  """(name, settings) of a spec "name" or "name:key=value:key=value" (values: integers, finite
  floats, true/false), e.g. "prune:p=0.3:per_tensor=true" -> ("prune", {"p": 0.3,
  "per_tensor": True}). ValueError for a malformed spec; the name is not looked up."""
  name, *items = spec.strip().split(":")
  if not name.isidentifier():
    raise ValueError(f"{spec!r}: expected name or name:key=value:key=value")
  settings: dict[str, int | float | bool] = {}
  for item in items:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key.isidentifier() or key in settings:
      raise ValueError(f"{spec!r}: {item!r} is not one key=value (keys once each; settings "
                       f"are separated by ':')")
    try:
      settings[key] = _spec_value(text.strip())
    except ValueError as e:
      raise ValueError(f"{spec!r}: {key}: {e}") from None
  return name, settings


def from_spec(spec: str) -> Defense:
  """The defence a spec names (`parse_spec`, then `build`): KeyError for an unknown name,
  ValueError for a malformed spec or a bad setting."""
  name, settings = parse_spec(spec)
  return build(name, **settings)


def compose(*defenses: Defense) -> Defense:
  """The defences applied in order (first given, first applied), link i drawing from
  fold_in(key, i); like optax.chain but with independent randomness per link. Plain optax
  transforms (e.g. optax.clip_by_global_norm) may be links too."""
  defenses = tuple(optax.with_extra_args_support(d) for d in defenses)

  def init(params):
    return tuple(d.init(params) for d in defenses)

  def update(updates, state, params=None, *, key: jax.Array | None = None, **extra_args):
    new_state = []
    for i, (d, s) in enumerate(zip(defenses, state)):
      link_key = None if key is None else jax.random.fold_in(key, i)
      updates, s = d.update(updates, s, params, key=link_key, **extra_args)
      new_state.append(s)
    return updates, tuple(new_state)

  return optax.GradientTransformationExtraArgs(init, update)


def defend(key: jax.Array | None, update: Grads, defenses: Sequence[Defense]) -> Grads:
  """`update` (a pytree like params) after `defenses` in order, defence i drawing from
  fold_in(key, i); `key` may be None when none of them is random."""
  chain = compose(*defenses)
  defended, _ = chain.update(update, chain.init(update), key=key)
  return defended


def global_norm(update: Grads) -> jax.Array:
  """L2 norm [] (float32) of all of `update`'s entries together."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(update)))


def support(update: Grads) -> Grads:
  """Which entries of `update` are nonzero: a bool pytree like it."""
  return jax.tree.map(lambda x: x != 0, update)
