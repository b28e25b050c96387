"""Soteria (Sun et al., "Provable Defense against Privacy Leakage in Federated Learning from
Representation Perspective", CVPR 2021): the client prunes the representation r (the input of a
dense layer, here the classifier) in the update it shares.

For each feature f of r, over the client's clips X [B, ...]:
    ratio_f = ||r_{:,f}||_2 / ||d(sum_b r_{b,f}) / dX||_2
(how much of the feature is left per unit of what it reveals about the input); the features whose
ratio is below the `percent`-th percentile are the most revealing: the rows of the layer's kernel
gradient [F, K] that carry them are zeroed (the shared update's other leaves are unchanged). The
zeros are not sent, so an attacker matches on the update's support (`fl.support`).

The representation is read through the layer itself: for a dense layer logits = r W + b,
d logits[b, 0] / d W[:, 0] = r_b, so any model works whose `kernel` leaf [F, K] acts that way
(checked: ValueError naming `kernel` otherwise). ||dr_f/dX|| is exact: one reverse-mode pass per
feature (vmapped in chunks of `chunk` features), B clips at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.settings import check
from vidleak_jax.tree_io import leaf_paths
from vidleak_jax.types import ApplyFn, Clip, Grads, Params


def kernel_index(params: Params, kernel: str) -> int:
  """Position of the leaf at path `kernel` ('/'-joined) in `jax.tree.leaves(params)`; ValueError
  naming `kernel` unless exactly that path is a 2-D float leaf."""
  paths = leaf_paths(params)
  leaves = jax.tree.leaves(params)
  matrices = [p for p, l in zip(paths, leaves) if np.ndim(l) == 2]
  if kernel not in paths or np.ndim(leaves[paths.index(kernel)]) != 2:
    raise ValueError(f"kernel={kernel!r} must be the path of a dense layer's 2-D kernel [F, K]; "
                     f"2-D leaves: {matrices}")
  return paths.index(kernel)


def _with_leaf(params: Params, index: int, value: jax.Array) -> Params:
  leaves, treedef = jax.tree.flatten(params)
  leaves[index] = value
  return jax.tree.unflatten(treedef, leaves)


def representation(apply_fn: ApplyFn, params: Params, clips: Clip, index: int) -> jax.Array:
  """r [B, F]: each clip's input to the dense layer whose kernel [F, K] is leaf `index`
  (d logits[b, 0] / d kernel[:, 0])."""
  kernel = jax.tree.leaves(params)[index]

  def first_logit(w, clip):
    return apply_fn(_with_leaf(params, index, w), clip[None])[0, 0]

  return jax.vmap(lambda clip: jax.grad(first_logit)(kernel, clip)[:, 0])(clips)


def revealing_ratios(apply_fn: ApplyFn, params: Params, clips: Clip, index: int, *,
                     chunk: int = 256) -> jax.Array:
  """ratio_f = ||r_{:,f}|| / ||d sum_b r_{b,f} / dX|| for every feature f: [F] float32."""
  rep = lambda x: representation(apply_fn, params, x, index)
  r, pullback = jax.vjp(rep, clips)
  features = r.shape[1]

  def input_norm(f):
    cotangent = jnp.zeros_like(r).at[:, f].set(1.0)
    return jnp.sqrt(jnp.sum(jnp.square(pullback(cotangent)[0])))

  sensitivity = jax.lax.map(input_norm, jnp.arange(features), batch_size=min(chunk, features))
  return jnp.linalg.norm(r, axis=0) / jnp.maximum(sensitivity, 1e-30)


def soteria_mask(apply_fn: ApplyFn, params: Params, clips: Clip, index: int,
                 percent: float) -> jax.Array:
  """Bool [F]: True for the features kept (ratio >= its `percent`-th percentile)."""
  ratios = revealing_ratios(apply_fn, params, clips, index)
  return ratios >= jnp.percentile(ratios, percent)


def check_dense(apply_fn: ApplyFn, params: Params, clips: Clip, index: int, kernel: str) -> None:
  """ValueError naming `kernel` unless logits = r W + c for the representation r it reads
  (concrete inputs only; c: the clip's logits at W = 0)."""
  w = jax.tree.leaves(params)[index]
  r = representation(apply_fn, params, clips, index)
  logits = apply_fn(params, clips)
  offset = apply_fn(_with_leaf(params, index, jnp.zeros_like(w)), clips)
  err = float(jnp.max(jnp.abs(r @ w + offset - logits)))
  scale = 1e-4 * (1.0 + float(jnp.max(jnp.abs(logits))))
  if not err <= scale:
    raise ValueError(f"kernel={kernel!r} does not act as a dense layer's kernel (logits = r W + "
                     f"c off by {err:.3g}): Soteria needs the classifier's kernel [F, K]")


def soteria(apply_fn: ApplyFn, params: Params, clips: Clip, update: Grads, *, kernel: str,
            percent: float) -> Grads:
  """`update` (like params) with the rows of leaf `kernel` [F, K] zeroed for the features of the
  clips' representation that Soteria prunes (the `percent` % most revealing, 0 <= percent <
  100); clips [B,T,H,W,C] are the client's, params the model it computed `update` at."""
  check(0 <= percent < 100, "percent", f"must be in [0, 100), got {percent}")
  index = kernel_index(params, kernel)
  keep = soteria_mask(apply_fn, params, clips, index, percent)
  leaves, treedef = jax.tree.flatten(update)
  leaves[index] = jnp.where(keep[:, None], leaves[index], jnp.zeros((), leaves[index].dtype))
  return jax.tree.unflatten(treedef, leaves)
