"""Client-side federated updates: what an honest client computes and shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; `labels` int [B] or probabilities [B, K]; logits [B, K]."""
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def client_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels) -> Grads:
  """FedSGD update: d mean-CE(apply_fn(params, clips[B,T,H,W,C]), labels[B]) / d params."""
  return jax.grad(lambda p: cross_entropy(apply_fn(p, clips), labels))(params)


def fedavg_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                  local_steps: int, learning_rate: float) -> Grads:
  """FedAvg update (params_before - params_after) after `local_steps` full-batch SGD steps."""
  if local_steps < 1:
    raise ValueError(f"local_steps must be >= 1, got {local_steps}")

  def sgd(_, p):
    g = client_update(apply_fn, p, clips, labels)
    return jax.tree.map(lambda w, d: w - learning_rate * d, p, g)

  trained = jax.lax.fori_loop(0, local_steps, sgd, params)
  return jax.tree.map(jnp.subtract, params, trained)
