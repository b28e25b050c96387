"""Training SR networks with optax on (low-res, high-res) frame pairs; orbax checkpoints.

Generic training data needs no download: synthetic surveillance video of random cameras
(`vidleak_jax.data.synthetic_clips`) and scikit-image's bundled photos cut into patches.
`fit` is resumable (`vidleak_jax.training`): with a checkpoint directory it saves every
`save_every` steps and continues from the newest checkpoint; batches depend only on (key, step),
so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vidleak_jax import training
from vidleak_jax.data.clips import resize
from vidleak_jax.data.synthetic import synthetic_clips
from vidleak_jax.sr.apply import stack_neighbours
from vidleak_jax.sr.models import create_model

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


class Pairs(NamedTuple):
  """Training pairs: low-res frame stacks [M, h, w, C*F] and high-res centre frames [M, H, W, C]."""

  inputs: jax.Array
  targets: jax.Array


def photo_clips(size: int, frames: int, *, side: int = 96) -> jax.Array:
  """scikit-image photos, shrunk to `side` px (short side), cut into size×size static clips:
  float32[P, frames, size, size, 3]."""
  import skimage.data  # bundled images, no download

  patches = []
  for name in PHOTOS:
    photo = np.asarray(getattr(skimage.data, name)(), np.float32) / 255.0
    h, w = photo.shape[:2]
    small = np.asarray(resize(photo, (side, side * w // h) if h < w else (side * h // w, side)))
    rows, cols = small.shape[0] // size, small.shape[1] // size
    tiles = small[:rows * size, :cols * size].reshape(rows, size, cols, size, 3)
    patches.append(tiles.swapaxes(1, 2).reshape(-1, size, size, 3))
  static = np.concatenate(patches)
  return jnp.asarray(np.repeat(static[:, None], frames, axis=1))


def generic_clips(key: jax.Array, size: int, frames: int, *, cameras: int = 24) -> jax.Array:
  """Synthetic clips of `cameras` random cameras and photo patches: float32[M, T, size, size, 3]."""
  one_camera = lambda k: synthetic_clips(k, 1, frames=frames, height=size, width=size)[0][0]
  video = jax.jit(jax.vmap(one_camera))(jax.random.split(key, cameras))
  return jnp.concatenate([video, photo_clips(size, frames)])


def degrade(clips: jax.Array, scale: int) -> jax.Array:
  """Block-average downsampling by `scale` of clips [..., H, W, C]: [..., H/s, W/s, C]."""
  h, w = clips.shape[-3:-1]
  if h % scale or w % scale:
    raise ValueError(f"scale {scale} must divide the frame size {h}x{w}")
  return resize(clips, (h // scale, w // scale), method="area")


def pairs_from_clips(low: jax.Array, high: jax.Array, *, temporal_radius: int = 0) -> Pairs:
  """Pairs from matching low-res clips [N,T,h,w,C] and high-res clips [N,T,H,W,C]."""
  return Pairs(stack_neighbours(low, temporal_radius), high.reshape(-1, *high.shape[2:]))


def augment(key: jax.Array, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Random horizontal/vertical flips and (square frames) transposes, the same for each pair."""
  flips = jax.random.bernoulli(key, 0.5, (3, inputs.shape[0]))

  def one(x, y, f):
    for axis, flip in ((1, f[0]), (0, f[1])):
      x = jnp.where(flip, jnp.flip(x, axis), x)
      y = jnp.where(flip, jnp.flip(y, axis), y)
    if x.shape[0] == x.shape[1] and y.shape[0] == y.shape[1]:
      x = jnp.where(f[2], jnp.swapaxes(x, 0, 1), x)
      y = jnp.where(f[2], jnp.swapaxes(y, 0, 1), y)
    return x, y

  return jax.vmap(one)(inputs, targets, flips.T)


def fit(key: jax.Array, model: nnx.Module, pairs: Pairs, *, steps: int, batch_size: int = 16,
        learning_rate: float = 1e-3, checkpoint_dir: str | None = None, save_every: int = 100,
        metadata: dict[str, Any] | None = None) -> tuple[nnx.Module, np.ndarray]:
  """Adam on the mean |model(x) - y| over random augmented batches; returns (model, losses[steps]).

  With `checkpoint_dir` (see `vidleak_jax.training`) the state is saved every `save_every` steps
  and at the end, with `metadata` as the run's identity, and training resumes from there.
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
  graphdef, params = nnx.split(model)

  def loss_fn(p, step):
    batch_key, aug_key = jax.random.split(jax.random.fold_in(key, step))
    idx = jax.random.randint(batch_key, (batch_size,), 0, pairs.inputs.shape[0])
    x, y = augment(aug_key, pairs.inputs[idx], pairs.targets[idx])
    return jnp.abs(nnx.merge(graphdef, p)(x) - y).mean()

  identity = {**(metadata or {}), "batch_size": batch_size, "learning_rate": learning_rate}
  params, losses = training.train(loss_fn, params, optax.adam(learning_rate), steps=steps,
                                  directory=checkpoint_dir, identity=identity,
                                  save_every=save_every)
  return nnx.merge(graphdef, params), losses


def train_generic(key: jax.Array, name: str, *, scale: int, size: int, frames: int, steps: int,
                  temporal_radius: int = 0, checkpoint_dir: str | None = None
                  ) -> tuple[nnx.Module, np.ndarray]:
  """SR network `name` (×scale) trained on generic frames (synthetic cameras + photos)."""
  model_key, data_key, fit_key = jax.random.split(key, 3)
  model = create_model(name, model_key, scale=scale, temporal_radius=temporal_radius)
  high = generic_clips(data_key, size, frames)
  pairs = pairs_from_clips(degrade(high, scale), high, temporal_radius=temporal_radius)
  meta = {"model": name, "scale": scale, "temporal_radius": temporal_radius, "size": size,
          "frames": frames}
  return fit(fit_key, model, pairs, steps=steps, checkpoint_dir=checkpoint_dir, metadata=meta)
