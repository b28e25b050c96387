"""Training SR networks with optax on (low-res, high-res) frame pairs; orbax checkpoints.

Generic training data needs no download: synthetic surveillance video of random cameras
(`vidleak_jax.data.synthetic_clips`) and scikit-image's bundled photos cut into patches.
`fit` is resumable: with a checkpoint directory it saves every `save_every` steps and continues
from the newest checkpoint; batches depend only on (key, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

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


def _manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def fit(key: jax.Array, model: nnx.Module, pairs: Pairs, *, steps: int, batch_size: int = 16,
        learning_rate: float = 1e-3, checkpoint_dir: str | None = None, save_every: int = 100,
        metadata: dict[str, Any] | None = None) -> tuple[nnx.Module, np.ndarray]:
  """Adam on the mean |model(x) - y| over random augmented batches; returns (model, losses[steps]).

  With `checkpoint_dir` the state is saved every `save_every` steps and at the end (with
  `metadata` as JSON) and training resumes from the newest checkpoint there.
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
  graphdef, params = nnx.split(model)
  opt = optax.adam(learning_rate)
  leaves = {"params": params, "opt_state": opt.init(params)}
  losses, start = np.full(steps, np.nan, np.float32), 0
  manager = None if checkpoint_dir is None else _manager(checkpoint_dir)
  if manager is not None and manager.latest_step() is not None:
    leaves, losses, start = restore(manager, leaves, steps)

  def loss_fn(p, x, y):
    return jnp.abs(nnx.merge(graphdef, p)(x) - y).mean()

  @jax.jit
  def train_step(p, opt_state, step):
    batch_key, aug_key = jax.random.split(jax.random.fold_in(key, step))
    idx = jax.random.randint(batch_key, (batch_size,), 0, pairs.inputs.shape[0])
    x, y = augment(aug_key, pairs.inputs[idx], pairs.targets[idx])
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
      updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  p, opt_state = leaves["params"], leaves["opt_state"]
  for step in range(start, steps):
    p, opt_state, loss = train_step(p, opt_state, jnp.int32(step))
    losses[step] = float(loss)
    if manager is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
      save(manager, step + 1, {"params": p, "opt_state": opt_state}, losses, metadata or {})
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return nnx.merge(graphdef, p), losses


def save(manager: ocp.CheckpointManager, step: int, leaves: dict[str, Any], losses: np.ndarray,
         metadata: dict[str, Any]) -> None:
  arrays = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(leaves))}
  arrays["losses"] = jnp.asarray(losses)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                             meta=ocp.args.JsonSave(metadata)))


def restore(manager: ocp.CheckpointManager, like: dict[str, Any], steps: int):
  """(leaves shaped like `like`, losses[steps], step) from the newest checkpoint."""
  step = manager.latest_step()
  flat, treedef = jax.tree.flatten(like)
  target = {str(i): jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype)
            for i, x in enumerate(flat)}
  target["losses"] = jax.ShapeDtypeStruct((steps,), jnp.float32)
  try:
    arrays = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint {manager.directory} does not match this SR model and "
                     f"--sr_steps={steps}: {e}") from None
  leaves = jax.tree.unflatten(treedef, [arrays[str(i)] for i in range(len(flat))])
  return leaves, np.array(arrays["losses"]), min(int(step), steps)


def read_metadata(directory: str) -> dict[str, Any] | None:
  """The JSON metadata of the newest checkpoint in `directory`, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  manager = _manager(directory)
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return dict(meta)


def train_generic(key: jax.Array, name: str, *, scale: int, size: int, frames: int, steps: int,
                  temporal_radius: int = 0, checkpoint_dir: str | None = None
                  ) -> tuple[nnx.Module, np.ndarray]:
  """SR network `name` (×scale) trained on generic frames (synthetic cameras + photos)."""
  model_key, data_key, fit_key = jax.random.split(key, 3)
  model = create_model(name, model_key, scale=scale, temporal_radius=temporal_radius)
  high = generic_clips(data_key, size, frames)
  pairs = pairs_from_clips(degrade(high, scale), high, temporal_radius=temporal_radius)
  meta = {"model": name, "scale": scale, "temporal_radius": temporal_radius, "steps": steps,
          "size": size}
  return fit(fit_key, model, pairs, steps=steps, checkpoint_dir=checkpoint_dir, metadata=meta)
