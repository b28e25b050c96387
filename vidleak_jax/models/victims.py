"""Raw-frame video classifiers (the victims): C3D-style 3-D CNN, per-frame CNN + pooling, CNN-RNN.

Every victim takes float32 clips [B, T, H, W, C] in [0, 1]; the "simple transforms" of the raw-frame
pipeline (spatial resize to the model's input size, per-channel normalisation) happen inside the
model, so gradients are taken w.r.t. the clip exactly as a client would store it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vidleak_jax.registry import Registry

VICTIMS: Registry[Callable[..., nnx.Module]] = Registry("victim")
ACTIVATIONS: Registry[Callable[[jax.Array], jax.Array]] = Registry("activation")
ACTIVATIONS.register("sigmoid")(jax.nn.sigmoid)
ACTIVATIONS.register("relu")(jax.nn.relu)
ACTIVATIONS.register("tanh")(jnp.tanh)
ACTIVATIONS.register("gelu")(jax.nn.gelu)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess(nnx.Module):
  """Checks the clip layout, resizes frames to `input_size` and normalises per channel."""

  def __init__(self, frames: int, channels: int, input_size: tuple[int, int],
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    self.frames, self.channels, self.input_size = frames, channels, tuple(input_size)
    if mean is None:
      mean = IMAGENET_MEAN if channels == 3 else (0.5,) * channels
    if std is None:
      std = IMAGENET_STD if channels == 3 else (0.25,) * channels
    if len(mean) != channels or len(std) != channels:
      raise ValueError(f"mean/std need {channels} values (one per channel), got {mean}, {std}")
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)

  def __call__(self, clips: jax.Array) -> jax.Array:
    if clips.ndim != 5 or clips.shape[1] != self.frames or clips.shape[-1] != self.channels:
      raise ValueError(
          f"clips must be [B, T={self.frames}, H, W, C={self.channels}] for this victim, "
          f"got shape {tuple(clips.shape)}")
    b, t, h, w, c = clips.shape
    if (h, w) != self.input_size:
      clips = jax.image.resize(clips, (b, t, *self.input_size, c), method="linear")
    return (clips - jnp.asarray(self.mean, clips.dtype)) / jnp.asarray(self.std, clips.dtype)


def _conv_out(size: int, stride: int) -> int:
  return -(-size // stride)  # SAME padding


class C3D(nnx.Module):
  """3-layer C3D-style 3-D CNN: [B,T,H,W,C] -> logits [B,K]."""

  def __init__(self, frames: int, height: int, width: int, channels: int, num_classes: int, *,
               rngs: nnx.Rngs, features: int = 12, activation: str = "sigmoid",
               input_size: tuple[int, int] | None = None):
    h, w = input_size or (height, width)
    self.preprocess = Preprocess(frames, channels, (h, w))
    self.act = ACTIVATIONS.get(activation)
    f = features
    self.conv1 = nnx.Conv(channels, f, (3, 3, 3), strides=(1, 2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(f, f, (3, 3, 3), strides=(2, 2, 2), rngs=rngs)
    self.conv3 = nnx.Conv(f, f, (3, 3, 3), strides=(1, 1, 1), rngs=rngs)
    t_out = _conv_out(frames, 2)
    h_out, w_out = _conv_out(_conv_out(h, 2), 2), _conv_out(_conv_out(w, 2), 2)
    self.head = nnx.Linear(t_out * h_out * w_out * f, num_classes, rngs=rngs)

  def __call__(self, clips: jax.Array) -> jax.Array:
    x = self.preprocess(clips)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.act(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


class FrameEncoder(nnx.Module):
  """LeNet-style per-frame 2-D CNN: [N,H,W,C] -> flat features [N, D]."""

  def __init__(self, height: int, width: int, channels: int, *, rngs: nnx.Rngs,
               features: int = 12, activation: str = "sigmoid"):
    self.act = ACTIVATIONS.get(activation)
    f = features
    self.conv1 = nnx.Conv(channels, f, (5, 5), strides=(2, 2), rngs=rngs)
    self.conv2 = nnx.Conv(f, f, (5, 5), strides=(2, 2), rngs=rngs)
    self.conv3 = nnx.Conv(f, f, (5, 5), strides=(1, 1), rngs=rngs)
    self.out_features = _conv_out(_conv_out(height, 2), 2) * _conv_out(_conv_out(width, 2), 2) * f

  def __call__(self, frames: jax.Array) -> jax.Array:
    x = self.act(self.conv1(frames))
    x = self.act(self.conv2(x))
    x = self.act(self.conv3(x))
    return x.reshape(x.shape[0], -1)


POOLINGS = ("mean", "max", "concat")


class FrameCNN(nnx.Module):
  """Per-frame 2-D CNN + temporal pooling (mean/max, or concat = late fusion) -> logits [B,K]."""

  def __init__(self, frames: int, height: int, width: int, channels: int, num_classes: int, *,
               rngs: nnx.Rngs, features: int = 12, activation: str = "sigmoid",
               pooling: str = "mean", input_size: tuple[int, int] | None = None):
    if pooling not in POOLINGS:
      raise KeyError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    h, w = input_size or (height, width)
    self.preprocess = Preprocess(frames, channels, (h, w))
    self.encoder = FrameEncoder(h, w, channels, rngs=rngs, features=features,
                                activation=activation)
    self.pooling = pooling
    d = self.encoder.out_features * (frames if pooling == "concat" else 1)
    self.head = nnx.Linear(d, num_classes, rngs=rngs)

  def __call__(self, clips: jax.Array) -> jax.Array:
    x = self.preprocess(clips)
    b, t = x.shape[:2]
    feats = self.encoder(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
    if self.pooling == "mean":
      pooled = feats.mean(axis=1)
    elif self.pooling == "max":
      pooled = feats.max(axis=1)
    else:
      pooled = feats.reshape(b, -1)
    return self.head(pooled)


class CNNRNN(nnx.Module):
  """Per-frame 2-D CNN -> GRU over time -> last hidden state -> logits [B,K]."""

  def __init__(self, frames: int, height: int, width: int, channels: int, num_classes: int, *,
               rngs: nnx.Rngs, features: int = 12, hidden: int = 64, activation: str = "sigmoid",
               input_size: tuple[int, int] | None = None):
    h, w = input_size or (height, width)
    self.preprocess = Preprocess(frames, channels, (h, w))
    self.encoder = FrameEncoder(h, w, channels, rngs=rngs, features=features,
                                activation=activation)
    self.cell = nnx.GRUCell(self.encoder.out_features, hidden, rngs=rngs)
    self.hidden = hidden
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, clips: jax.Array) -> jax.Array:
    x = self.preprocess(clips)
    b, t = x.shape[:2]
    feats = self.encoder(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
    carry = jnp.zeros((b, self.hidden), feats.dtype)
    for i in range(t):  # T is small and static: an unrolled loop keeps grad-of-grad simple
      carry, _ = self.cell(carry, feats[:, i])
    return self.head(carry)


VICTIMS.register("c3d")(C3D)
VICTIMS.register("frame_cnn")(FrameCNN)
VICTIMS.register("cnn_rnn")(CNNRNN)


def create(name: str, key: jax.Array, *, frames: int, height: int, width: int, channels: int,
           num_classes: int, **kwargs: Any) -> nnx.Module:
  """Builds victim `name` for clips [B, frames, height, width, channels] with random init from `key`."""
  for arg, value in (("frames", frames), ("height", height), ("width", width),
                     ("channels", channels)):
    if value < 1:
      raise ValueError(f"{arg} must be a positive integer, got {value}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  cls = VICTIMS.get(name)
  return cls(frames, height, width, channels, num_classes, rngs=nnx.Rngs(params=key), **kwargs)
