"""Analytic label recovery from the shared gradient of the classifier's last layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.attack.objectives import leaf_paths
from vidleak_jax.types import ApplyFn, Grads, Params


def last_layer_bias_grad(grads: Grads, num_classes: int, *, layer: str = "head") -> jax.Array:
  """Gradient of the output layer's bias, [K]: the leaf `<layer>/bias` (or the unique [K] bias)."""
  paths = leaf_paths(grads)
  leaves = jax.tree.leaves(grads)
  exact = [l for p, l in zip(paths, leaves) if p == f"{layer}/bias"]
  if exact:
    return exact[0]
  candidates = [(p, l) for p, l in zip(paths, leaves)
                if p.endswith("bias") and l.shape == (num_classes,)]
  if len(candidates) != 1:
    raise ValueError(f"cannot locate the output layer's bias of shape ({num_classes},) in the "
                     f"gradient; pass layer=<name>. Bias-like leaves: {[p for p, _ in candidates]}")
  return candidates[0][1]


def counts_from_bias_grad(bias_grad: np.ndarray, batch_size: int,
                          mean_probs: np.ndarray) -> np.ndarray:
  """Label counts n_k ≈ B (p̄_k − ∂L/∂b_k), rounded to sum to B (largest remainder). Host side."""
  estimate = np.clip(batch_size * (mean_probs - bias_grad), 0.0, None)
  if estimate.sum() <= 0:
    estimate = np.clip(-bias_grad, 0.0, None) + 1e-12
  estimate = estimate * batch_size / estimate.sum()
  counts = np.floor(estimate).astype(int)
  order = np.argsort(-(estimate - counts), kind="stable")
  counts[order[: batch_size - counts.sum()]] += 1
  return counts


def recover_labels(key: jax.Array, apply_fn: ApplyFn, params: Params, target_grads: Grads,
                   clip_shape: tuple[int, ...], *, layer: str = "head",
                   references: jax.Array | None = None, num_probe_clips: int = 16) -> jax.Array:
  """Recovers the B labels of the client batch from `target_grads`; returns int32 [B], sorted.

  B = 1: iDLG — for softmax cross-entropy ∂L/∂b = softmax − onehot, whose only negative entry
  is the true label. B > 1: the bias gradient is mean(softmax) − counts / B; mean(softmax) is
  estimated from the model's predictions on probe clips: the attacker's `references` [k,H,W,C]
  (frames of the same camera) held still for T frames when given, else `num_probe_clips` clips of
  uniform noise drawn with `key`. Through a frozen ImageNet extractor the camera's frames predict
  the batch far better than noise (the whole multiset right in 77–100 % of seeds instead of
  5–63 %: experiments/results/label_probes.md). Order within the batch is not identifiable;
  the evaluation matches reconstructions to ground truth.
  """
  batch_size = clip_shape[0]
  logits_shape = jax.eval_shape(apply_fn, params, jnp.zeros((1, *clip_shape[1:]), jnp.float32))
  num_classes = logits_shape.shape[-1]
  bias_grad = np.asarray(last_layer_bias_grad(target_grads, num_classes, layer=layer))
  if batch_size == 1:
    return jnp.asarray([int(np.argmin(bias_grad))], jnp.int32)
  if references is not None and len(references):
    if tuple(references.shape[1:]) != tuple(clip_shape[2:]):
      raise ValueError(f"references must be [k, {', '.join(map(str, clip_shape[2:]))}] frames "
                       f"of the clips' size, got shape {tuple(references.shape)}")
    probes = jnp.repeat(jnp.asarray(references, jnp.float32)[:, None], clip_shape[1], axis=1)
  else:
    probes = jax.random.uniform(key, (num_probe_clips, *clip_shape[1:]))
  mean_probs = np.asarray(jax.nn.softmax(apply_fn(params, probes)).mean(axis=0))
  counts = counts_from_bias_grad(bias_grad, batch_size, mean_probs)
  return jnp.asarray(np.repeat(np.arange(num_classes), counts), jnp.int32)
