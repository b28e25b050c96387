"""Classifiers on frozen features (the trained part of the feature pipeline): [N,T,D] -> [N,K].

In order of complexity:
  linear        mean over time, one linear layer
  mlp1..mlp3    1-3 hidden layers on the time-mean (`pooling="mean"`) or on all T·D features
                (`pooling="flatten"`)
  conv1d        two temporal 3-tap convolutions, mean over time, linear
  gru           GRU over the T feature vectors, last state, linear
  transformer   linear embedding + learned positions, one pre-norm self-attention block, mean
The output layer is always `head` (analytic label recovery reads `head/bias`). `feature_victim`
composes a frozen extractor with a head into the victim the FL client trains.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vidleak_jax.models.pure import pure
from vidleak_jax.models.victims import ACTIVATIONS
from vidleak_jax.registry import Registry
from vidleak_jax.types import ApplyFn, Params

HEADS: Registry[Callable[..., nnx.Module]] = Registry("head")
SWEEP_ORDER = ("linear", "mlp1", "mlp2", "mlp3", "conv1d", "gru", "transformer")
POOLINGS = ("mean", "flatten")


def _check_features(features: jax.Array, frames: int, dim: int) -> None:
  if features.ndim != 3 or features.shape[1:] != (frames, dim):
    raise ValueError(f"features must be [N, T={frames}, D={dim}] for this head, got shape "
                     f"{tuple(features.shape)}")


class MLPHead(nnx.Module):
  """`depth` hidden layers (fc1..fc<depth>, width `hidden`) + output layer `head`; depth 0 =
  linear. Input: the time-mean [N,D] or the flattened matrix [N,T·D] (`pooling`)."""

  def __init__(self, frames: int, dim: int, num_classes: int, *, rngs: nnx.Rngs, depth: int = 1,
               hidden: int = 64, activation: str = "relu", pooling: str = "mean"):
    if pooling not in POOLINGS:
      raise KeyError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    self.frames, self.dim, self.pooling, self.depth = frames, dim, pooling, depth
    self.act = ACTIVATIONS.get(activation)
    width = dim * (frames if pooling == "flatten" else 1)
    for i in range(depth):
      setattr(self, f"fc{i + 1}", nnx.Linear(width, hidden, rngs=rngs))
      width = hidden
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.frames, self.dim)
    if self.pooling == "mean":
      x = features.mean(axis=1)
    else:
      x = features.reshape(features.shape[0], -1)
    for i in range(self.depth):
      x = self.act(getattr(self, f"fc{i + 1}")(x))
    return self.head(x)


class TemporalConvHead(nnx.Module):
  """Two 3-tap 1-D convolutions over time (SAME), mean over time, linear `head`."""

  def __init__(self, frames: int, dim: int, num_classes: int, *, rngs: nnx.Rngs,
               hidden: int = 64, activation: str = "relu"):
    self.frames, self.dim = frames, dim
    self.act = ACTIVATIONS.get(activation)
    self.conv1 = nnx.Conv(dim, hidden, (3,), rngs=rngs)
    self.conv2 = nnx.Conv(hidden, hidden, (3,), rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.frames, self.dim)
    x = self.act(self.conv1(features))
    x = self.act(self.conv2(x))
    return self.head(x.mean(axis=1))


class GRUHead(nnx.Module):
  """GRU over the T feature vectors (unrolled; T is small and static), last state -> `head`."""

  def __init__(self, frames: int, dim: int, num_classes: int, *, rngs: nnx.Rngs,
               hidden: int = 64):
    self.frames, self.dim, self.hidden = frames, dim, hidden
    self.cell = nnx.GRUCell(dim, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.frames, self.dim)
    carry = jnp.zeros((features.shape[0], self.hidden), features.dtype)
    for t in range(self.frames):
      carry, _ = self.cell(carry, features[:, t])
    return self.head(carry)


class TransformerHead(nnx.Module):
  """Embedding + learned positions, one pre-norm block (self-attention, MLP), mean -> `head`."""

  def __init__(self, frames: int, dim: int, num_classes: int, *, rngs: nnx.Rngs,
               hidden: int = 64, num_heads: int = 4, activation: str = "gelu"):
    if hidden % num_heads:
      raise ValueError(f"hidden={hidden} must be a multiple of num_heads={num_heads}")
    self.frames, self.dim = frames, dim
    self.act = ACTIVATIONS.get(activation)
    self.embed = nnx.Linear(dim, hidden, rngs=rngs)
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (frames, hidden)))
    self.norm1 = nnx.LayerNorm(hidden, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads, hidden, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(hidden, rngs=rngs)
    self.mlp_in = nnx.Linear(hidden, 2 * hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.frames, self.dim)
    x = self.embed(features) + self.positions[...]
    x = x + self.attention(self.norm1(x))
    x = x + self.mlp_out(self.act(self.mlp_in(self.norm2(x))))
    return self.head(x.mean(axis=1))


def _mlp(depth: int) -> Callable[..., nnx.Module]:
  def build(frames, dim, num_classes, *, rngs, **kwargs):
    return MLPHead(frames, dim, num_classes, rngs=rngs, depth=depth, **kwargs)
  return build


HEADS.register("linear")(_mlp(0))
for _depth in (1, 2, 3):
  HEADS.register(f"mlp{_depth}")(_mlp(_depth))
HEADS.register("conv1d")(TemporalConvHead)
HEADS.register("gru")(GRUHead)
HEADS.register("transformer")(TransformerHead)


def create_head(name: str, key: jax.Array, *, frames: int, dim: int, num_classes: int,
                **kwargs: Any) -> nnx.Module:
  """Builds head `name` for features [N, frames, dim] -> logits [N, num_classes]."""
  if frames < 1 or dim < 1:
    raise ValueError(f"frames and dim must be positive, got {frames}, {dim}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return HEADS.get(name)(frames, dim, num_classes, rngs=nnx.Rngs(params=key), **kwargs)


def feature_victim(extract: Callable[[jax.Array], jax.Array],
                   head: nnx.Module) -> tuple[ApplyFn, ApplyFn, Params]:
  """(apply_fn, head_apply_fn, params) of the pipeline clips -> extract -> head.

  `apply_fn(params, clips[B,T,H,W,C]) -> logits[B,K]` has the signature of every victim, so
  `fl.client_update` and `attack.reconstruct` work on it unchanged; `params` are the head's only
  (the extractor is closed over as constants and never updated or shared).
  `head_apply_fn(params, features[B,T,D]) -> logits[B,K]` is the head alone.
  """
  head_apply, params = pure(head)

  def apply_fn(params: Params, clips: jax.Array) -> jax.Array:
    return head_apply(params, extract(clips))

  return apply_fn, head_apply, params
