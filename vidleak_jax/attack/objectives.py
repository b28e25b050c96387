"""Gradient-matching objectives: cosine (Inverting Gradients), l2 (DLG), l1."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from vidleak_jax.attack.fast_convs import fast_convs
from vidleak_jax.fl.local import UpdateFn
from vidleak_jax.fl.updates import client_update
from vidleak_jax.registry import Registry
from vidleak_jax.tree_io import leaf_paths  # re-exported: other attack modules import it from here
from vidleak_jax.tree_io import validate_target_grads
from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params

# A distance takes per-layer lists (candidate grads, target grads, weights) and returns a scalar.
Distance = Callable[[Sequence[jax.Array], Sequence[jax.Array], Sequence[float]], jax.Array]
DISTANCES: Registry[Distance] = Registry("gradient-matching metric")
_EPS = 1e-12


@DISTANCES.register("cosine")
def cosine_distance(grads, targets, weights) -> jax.Array:
  """1 - weighted cosine similarity of the concatenated gradients (0 when they are parallel)."""
  dot = sum(w * jnp.vdot(g, t) for g, t, w in zip(grads, targets, weights))
  g_sq = sum(w * jnp.vdot(g, g) for g, w in zip(grads, weights))
  t_sq = sum(w * jnp.vdot(t, t) for t, w in zip(targets, weights))
  return 1.0 - dot / (jnp.sqrt(g_sq + _EPS) * jnp.sqrt(t_sq + _EPS))


@DISTANCES.register("l2")
def l2_distance(grads, targets, weights) -> jax.Array:
  """Weighted sum of squared differences (DLG)."""
  return sum(w * jnp.sum(jnp.square(g - t)) for g, t, w in zip(grads, targets, weights))


@DISTANCES.register("l1")
def l1_distance(grads, targets, weights) -> jax.Array:
  """Weighted sum of absolute differences."""
  return sum(w * jnp.sum(jnp.abs(g - t)) for g, t, w in zip(grads, targets, weights))


def resolve_layer_weights(tree, layer_weights: Mapping[str, float] | None) -> list[float]:
  """Per-leaf weights: the weight of the longest matching path prefix, else 1.

  A prefix matches a leaf path when it equals it or names one of its parent modules
  (e.g. "conv1" matches "conv1/kernel" and "conv1/bias"). Prefixes matching nothing are an error.
  """
  paths = leaf_paths(tree)
  if not layer_weights:
    return [1.0] * len(paths)

  def matches(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")

  unused = [p for p in layer_weights if not any(matches(p, path) for path in paths)]
  if unused:
    raise ValueError(f"layer_weights names {unused} match no parameter; parameters: {paths}")
  weights = []
  for path in paths:
    hits = [p for p in layer_weights if matches(p, path)]
    weights.append(float(layer_weights[max(hits, key=len)]) if hits else 1.0)
  return weights


def validate_mask(params: Params, mask: Grads) -> None:
  """ValueError unless `mask` has params' structure and, leaf by leaf, its shape."""
  p_paths, m_paths = leaf_paths(params), leaf_paths(mask)
  if p_paths != m_paths:
    raise ValueError(f"mask does not match the model's parameters: missing "
                     f"{sorted(set(p_paths) - set(m_paths))[:5]}, unexpected "
                     f"{sorted(set(m_paths) - set(p_paths))[:5]}")
  for path, p, m in zip(p_paths, jax.tree.leaves(params), jax.tree.leaves(mask)):
    if jnp.shape(p) != jnp.shape(m):
      raise ValueError(f"mask[{path!r}] has shape {jnp.shape(m)}, expected {jnp.shape(p)}")


def _masked(leaves: Sequence[jax.Array], keep: Sequence[jax.Array]) -> list[jax.Array]:
  return [jnp.where(k, x, jnp.zeros((), x.dtype)) for x, k in zip(leaves, keep)]


def gradient_matching_loss(apply_fn: ApplyFn, params: Params, target_grads: Grads, clips: Clip,
                           labels: Labels, metric: str = "cosine", *,
                           layer_weights: Mapping[str, float] | None = None,
                           conv: str = "auto", update_fn: UpdateFn = client_update,
                           mask: Grads | None = None) -> jax.Array:
  """Scalar distance between the update of (clips[B,T,H,W,C], labels[B]) and target_grads.

  `update_fn(apply_fn, params, clips, labels)`: what the client computed, by default its FedSGD
  gradient (`client_update`); for FedAvg, `vidleak_jax.fl.replay(...)` replays its local training.

  `mask`: a pytree like params (bool, or numbers where nonzero = kept); the distance then sees
  only the entries it keeps, in both updates (e.g. `vidleak_jax.fl.support(target_grads)` against
  a sparsified update: a zero the client did not send is not matched; cosine's norms are those of
  the kept entries). None: every entry (the same numbers as without the argument).

  Pure: differentiable w.r.t. `clips` and usable under `jax.jit` / `jax.vmap`. `clips` and `labels`
  as in `client_update` (floating clips in [0, 1]; int labels [B] in [0, K) or label probabilities
  [B, K]). Bad inputs raise ValueError: `target_grads` must have params' structure, shapes and
  dtypes; values (of clips and labels) are checked only when concrete, so under jit the checks
  run once at trace time and cost nothing at run time.

  conv: how the model's convolutions are computed. "im2col": as patches + matrix products
  (`fast_convs` rewrites `apply_fn`'s traced program, whatever library built it), which keeps the
  derivatives an attack needs (per-candidate weight gradients, grad-of-grad, under `vmap`) at
  matmul speed; "xla": as written (`lax.conv_general_dilated`); "auto": "im2col" when the call is
  traced (under jit, vmap or grad: where the rewrite pays), "xla" when `clips` and `params` are
  concrete (an eager evaluation, which nothing differentiates or batches afterwards: one dispatch
  per convolution, and exactly the client's computation). Same function either way, to float
  rounding. The rewrite happens once per trace of the caller.
  """
  distance = DISTANCES.get(metric)
  validate_target_grads(params, target_grads, check_values=False)  # finiteness: reconstruct's
  if conv == "auto" and not any(isinstance(leaf, jax.core.Tracer)
                                for leaf in jax.tree.leaves((params, clips))):
    conv = "xla"
  grads = update_fn(fast_convs(apply_fn, conv), params, clips, labels)
  weights = resolve_layer_weights(params, layer_weights)
  grads, targets = jax.tree.leaves(grads), jax.tree.leaves(target_grads)
  if mask is not None:
    validate_mask(params, mask)
    keep = [jnp.asarray(m).astype(bool) for m in jax.tree.leaves(mask)]
    grads, targets = _masked(grads, keep), _masked(targets, keep)
  return distance(grads, targets, weights)
