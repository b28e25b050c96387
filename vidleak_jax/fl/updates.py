"""Client-side federated updates: what an honest client computes and shares."""

from __future__ import annotations

import jax
import numpy as np
import optax

from vidleak_jax.inputs import CLIP_LAYOUT, check_clips, check_labels, num_classes
from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; `labels` int [B] or probabilities [B, K]; logits [B, K]."""
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def check_update_inputs(apply_fn: ApplyFn, params: Params, clips: Clip,
                        labels: Labels) -> tuple[Clip, jax.Array]:
  """(clips, labels) as arrays after checking them as `client_update` documents; ValueError else.

  Static under jit/vmap/grad (dtypes and shapes); the values of concrete arrays are checked too.
  K is read from the model's output shape (`jax.eval_shape`) only when the labels need it.
  """
  video = np.ndim(clips) == len(CLIP_LAYOUT.split(","))  # else a head's inputs, e.g. features
  clips = check_clips(clips, "clips", layout=CLIP_LAYOUT if video else None,
                      value_range=(0.0, 1.0) if video else None)
  labels = check_labels(labels, lambda: num_classes(apply_fn, params, clips), clips.shape[0])
  return clips, labels


def _client_grads(apply_fn: ApplyFn, params: Params, clips: Clip, labels: jax.Array) -> Grads:
  return jax.grad(lambda p: cross_entropy(apply_fn(p, clips), labels))(params)


def client_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels) -> Grads:
  """FedSGD update: d mean-CE(apply_fn(params, clips[B,T,H,W,C]), labels[B]) / d params.

  `clips`: float32 (any floating dtype) [B,T,H,W,C] in [0, 1]; uint8 video is refused: scale it
  to float32 in [0, 1] first (`clips.astype(np.float32) / 255`). For a head alone, its floating
  inputs [B,...] (e.g. features [B,T,D]), whose values are not range-checked. `labels`: int class
  indices [B] in [0, K) (K: the model's number of logits) or class probabilities [B, K].
  Bad inputs raise ValueError; under jit/vmap/grad only dtypes and shapes are checked.
  """
  clips, labels = check_update_inputs(apply_fn, params, clips, labels)
  return _client_grads(apply_fn, params, clips, labels)

