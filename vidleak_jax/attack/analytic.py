"""Closed-form stage 1 of the feature attack: what a head's first dense layer gives away.

A dense layer z = x W + b (kernel W [D,H], bias b [H]) on inputs x [B,D] has the batch gradients
dL/dW = xᵀE and dL/db = Σ_b E_b, E [B,H] = dL/dz. Hence:
  `analytic_first_layer`    B = 1: x = dL/dW[:, j] / dL/db[j] for every unit j (least squares).
  `isolated_inputs`         any B: a unit that only clip i drives (ReLU after the layer leaves the
                            others at zero error) still gives x_i exactly; such units are found by
                            agreeing with each other.
  `input_span`              the span of the B inputs (the column space of dL/dW), for matching
                            in B × rank coefficients instead of B × D features.
  `closed_form_features`    the first two for an `MLPHead`'s feature matrix [B,T,D].
  `span_code`               its span as the coefficients to optimise, with their decoder.
  `invisible_input_shifts`  what no attack can recover: shifts x + n vᵀ with Eᵀn = 0, Wᵀv = 0;
                            `singular_value_ratio` of E (`first_layer_errors`) says how close a
                            batch is to having such a shift.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.attack.objectives import client_update, leaf_paths
from vidleak_jax.types import ApplyFn, Grads, Params


def _leaf(grads: Grads, path: str) -> jax.Array:
  for p, leaf in zip(leaf_paths(grads), jax.tree.leaves(grads)):
    if p == path:
      return leaf
  raise KeyError(f"no gradient leaf {path!r}; leaves: {leaf_paths(grads)}")


def _dense_gradient(grads: Grads, layer: str) -> tuple[jax.Array, jax.Array]:
  kernel, bias = _leaf(grads, f"{layer}/kernel"), _leaf(grads, f"{layer}/bias")
  if kernel.ndim != 2 or bias.shape != kernel.shape[-1:]:
    raise ValueError(f"{layer!r} is not a dense layer with bias: kernel {kernel.shape}, bias "
                     f"{bias.shape}")
  return kernel, bias


def analytic_first_layer(grads: Grads, layer: str) -> jax.Array:
  """The input x [D_in] of dense layer `layer` (kernel [D_in, D_out], bias) at batch size 1."""
  kernel, bias = _dense_gradient(grads, layer)
  denom = jnp.vdot(bias, bias)
  if not float(denom) > 0:
    raise ValueError(f"the bias gradient of {layer!r} is zero: its input is not recoverable")
  return kernel @ bias / denom


def input_span(grads: Grads, layer: str, max_rank: int, rtol: float = 1e-4) -> jax.Array:
  """Orthonormal basis U [D_in, r] of the space the inputs of dense layer `layer` lie in.

  dL/dW = xᵀE, so the column space of dL/dW [D_in, H] is spanned by the B inputs whenever E [B,H]
  has rank B (a hidden layer at B <= H; a linear softmax head at B < K): x = A Uᵀ for some
  A [B, r]. r <= max_rank (B): the left singular vectors above rtol × the largest.
  """
  kernel, _ = _dense_gradient(grads, layer)
  u, s, _ = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
  rank = min(int(np.sum(s > rtol * s.max())) if s.size and s.max() > 0 else 0, max_rank)
  if rank == 0:
    raise ValueError(f"the kernel gradient of {layer!r} is zero: it spans no input")
  return jnp.asarray(u[:, :rank], jnp.float32)


def _components(adjacent: np.ndarray) -> list[np.ndarray]:
  """Connected components of a symmetric boolean adjacency matrix [J,J]."""
  label = -np.ones(len(adjacent), int)
  for start in range(len(adjacent)):
    if label[start] >= 0:
      continue
    label[start], frontier = start, [start]
    while frontier:
      node = frontier.pop()
      for other in np.flatnonzero(adjacent[node] & (label < 0)):
        label[other] = start
        frontier.append(other)
  return [np.flatnonzero(label == root) for root in np.unique(label)]


def isolated_inputs(grads: Grads, layer: str, *, rtol: float = 1e-4,
                    min_units: int = 2) -> np.ndarray:
  """Inputs [M, D_in] of dense layer `layer` that some of its units saw alone, at any batch size.

  A unit j that only clip i drives (zero error for the other clips: a ReLU after the layer that
  they leave inactive) has dL/dW[:, j] = x_i · dL/db[j], so its ratio r_j = dL/dW[:, j] / dL/db[j]
  is x_i exactly. A unit that several clips drive gives a weighted mean of their inputs, which
  other units do not reproduce. Ratios that at least `min_units` units share (relative distance
  < rtol) are returned, one per group (that of its unit with the largest |dL/db|), the largest
  group first; M = 0 when no unit isolates a clip (e.g. a softmax output layer at B > 1). At
  B = 1 every unit with a non-zero bias gradient agrees: `analytic_first_layer`.
  """
  if min_units < 1 or not rtol > 0:
    raise ValueError(f"min_units must be >= 1 and rtol > 0, got {min_units}, {rtol}")
  kernel, bias = (np.asarray(a, np.float64) for a in _dense_gradient(grads, layer))
  scale = np.abs(bias).max()
  if not scale > 0:
    raise ValueError(f"the bias gradient of {layer!r} is zero: its input is not recoverable")
  units = np.flatnonzero(np.abs(bias) > 1e-6 * scale)
  ratios = kernel[:, units].T / bias[units, None]  # [J, D_in]
  sq = np.sum(np.square(ratios), axis=1)
  dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * ratios @ ratios.T, 0.0)
  close = dist2 < rtol**2 * np.maximum(sq[:, None], sq[None, :])
  groups = [g for g in _components(close) if len(g) >= min_units]
  groups.sort(key=lambda g: -len(g))
  picks = [g[np.argmax(np.abs(bias[units[g]]))] for g in groups]
  return ratios[picks].astype(np.float32) if picks else np.zeros((0, kernel.shape[0]), np.float32)


def first_layer_errors(head_apply: ApplyFn, params: Params, features: jax.Array,
                       labels: jax.Array, layer: str) -> np.ndarray:
  """E [B,H]: dL_b/dz of dense layer `layer` for each clip b alone (its per-clip bias gradient),
  from the true features [B,T,D] and int labels [B] (an evaluation-side quantity)."""
  def per_clip(f, y):
    return _leaf(client_update(head_apply, params, f[None], y[None]), f"{layer}/bias")

  return np.asarray(jax.jit(jax.vmap(per_clip))(jnp.asarray(features), jnp.asarray(labels)))


def singular_value_ratio(errors: np.ndarray) -> float:
  """σ_B / σ_1 of E [B,H] (0 when H < B): 1 when the gradient carries B well-separated directions
  of the batch, near 0 when one of them is (almost) invisible (`invisible_input_shifts`)."""
  errors = np.asarray(errors, np.float64)
  s = np.linalg.svd(errors, compute_uv=False)
  if len(s) < errors.shape[0] or not s[0] > 0:
    return 0.0
  return float(s[-1] / s[0])


def invisible_input_shifts(errors: jax.Array, kernel: jax.Array,
                           rtol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
  """Input shifts x + n vᵀ that a first dense layer's gradient cannot see.

  x [B,D] is the layer's input, kernel W [D,H], errors E [B,H] = dL/d(pre-activations). Returns
  bases N [B,m] of {n: Eᵀn = 0} and V [D,q] of {v: Wᵀv = 0}. For n in N and v in V, x + n vᵀ has
  the same pre-activations, hence the same E downstream, and the same gradients: dW = xᵀE +
  v (Eᵀn)ᵀ = xᵀE, db = Σ_b E_b. A linear softmax head's E = softmax − onehot has rows summing to
  0, so rank(E) <= K − 1 and m >= B − K + 1: with B >= K clips the gradient leaves a whole family
  of pooled feature matrices open, and no attack can tell them apart.
  """
  def null_space(a: np.ndarray) -> np.ndarray:
    _, s, vt = np.linalg.svd(a)
    rank = int(np.sum(s > rtol * s.max())) if s.size and s.max() > 0 else 0
    return vt[rank:].T

  errors, kernel = np.asarray(errors, np.float64), np.asarray(kernel, np.float64)
  if errors.ndim != 2 or kernel.ndim != 2 or errors.shape[1] != kernel.shape[1]:
    raise ValueError(f"errors must be [B,H] and kernel [D,H], got {errors.shape}, {kernel.shape}")
  return null_space(errors.T), null_space(kernel.T)


def features_from_input(x: jax.Array, frames: int, dim: int, pooling: str) -> jax.Array:
  """Head inputs x [N, D] or [N, T·D] (or one, unbatched) -> feature matrices [N,T,D] (the
  time-mean repeated in every frame when the head pools: frame-to-frame variation is not in the
  gradient)."""
  x = jnp.asarray(x)
  x = x.reshape(-1, x.shape[-1])
  if pooling == "flatten":
    return x.reshape(-1, frames, dim)
  return jnp.broadcast_to(x[:, None, :], (x.shape[0], frames, dim))


def first_layer_name(head) -> str:
  """The first dense layer of an `MLPHead` (`heads.py`): fc1, or the output layer if linear."""
  return "fc1" if head.depth else "head"


def closed_form_features(grads: Grads, head, start: jax.Array) -> tuple[jax.Array, int]:
  """Features [B,T,D] of an `MLPHead`'s batch from its first dense layer: every clip that some
  units see alone (all of them at B = 1), the others kept at `start` [B,T,D]; and how many."""
  batch, frames = start.shape[:2]
  if batch == 1:
    x = analytic_first_layer(grads, first_layer_name(head))[None]
  else:
    x = isolated_inputs(grads, first_layer_name(head))[:batch]
  found = features_from_input(x, frames, head.dim, head.pooling)
  return jnp.concatenate([found, start[len(x):]]).astype(jnp.float32), len(x)


def span_code(grads: Grads, head, start: jax.Array) -> tuple[jax.Array, Callable]:
  """Coefficients [B, r] of `start` [B,T,D] in the span of an `MLPHead`'s first-layer inputs
  (`input_span`), and the decoder coefficients -> features [B,T,D] (coefficients @ spanᵀ)."""
  batch, frames = start.shape[:2]
  span = input_span(grads, first_layer_name(head), batch)
  pooled = start.reshape(batch, -1) if head.pooling == "flatten" else start.mean(1)

  def decode(coefficients: jax.Array) -> jax.Array:
    return features_from_input(coefficients @ span.T, frames, head.dim, head.pooling)

  return pooled @ span, decode
