"""Local pre-training of a feature extractor (no weights are ever downloaded), resumable.

The extractor is trained with a linear probe on its flattened feature matrix [T·D] -> K classes
(softmax cross-entropy, Adam) on the given clips, by `vidleak_jax.training.train`: minibatch i is
drawn from fold_in(key, i), so a run resumed from a checkpoint continues exactly as an
uninterrupted one. Checkpoints under `directory` hold the probe's parameters (extractor included),
the optimizer state and JSON metadata (the run's identity, the loss of every step so far).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vidleak_jax import training
from vidleak_jax.fl.updates import cross_entropy
from vidleak_jax.settings import check, setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  """steps of Adam (lr) on minibatches of `batch_size` clips; a checkpoint every
  `checkpoint_every` steps and at the end."""

  steps: int = setting(300, help="Pre-training steps.")
  batch_size: int = setting(8, help="Pre-training minibatch.")
  lr: float = setting(3e-3, help="Pre-training Adam learning rate.")
  checkpoint_every: int = setting(50, help="Pre-training steps between checkpoints.")

  def __post_init__(self):
    for field in ("steps", "batch_size", "checkpoint_every"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
    check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


class _Probe(nnx.Module):
  """extractor -> flattened [N, T·D] -> linear -> logits [N, K]."""

  def __init__(self, extractor: nnx.Module, frames: int, num_classes: int, *, rngs: nnx.Rngs):
    self.extractor = extractor
    self.linear = nnx.Linear(frames * extractor.out_features, num_classes, rngs=rngs)

  def __call__(self, clips: jax.Array) -> jax.Array:
    feats = self.extractor(clips)
    return self.linear(feats.reshape(feats.shape[0], -1))


def pretrain(key: jax.Array, extractor: nnx.Module, clips: np.ndarray, labels: np.ndarray, *,
             num_classes: int, directory: str, identity: dict[str, Any],
             config: PretrainConfig = PretrainConfig(),
             progress: Callable[[int, int, float], None] | None = None) -> np.ndarray:
  """Trains `extractor` in place on clips [N,T,H,W,C] / labels [N]; returns the loss per step.

  `identity` (JSON values: architecture name, clip shape, ...) is stored with the checkpoints and
  must match when resuming. Resumes from the latest checkpoint under `directory`.
  """
  if clips.ndim != 5 or len(clips) != len(labels) or len(clips) < 1:
    raise ValueError(f"pretrain needs clips [N,T,H,W,C] and labels [N], got {clips.shape}, "
                     f"{labels.shape}")
  probe_key, batch_key = jax.random.split(key)
  model = _Probe(extractor, clips.shape[1], num_classes, rngs=nnx.Rngs(params=probe_key))
  graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
  data_x, data_y = jnp.asarray(clips, jnp.float32), jnp.asarray(labels, jnp.int32)
  batch = min(config.batch_size, len(clips))

  def loss_fn(params, step):
    idx = jax.random.choice(jax.random.fold_in(batch_key, step), len(clips), (batch,),
                            replace=False)
    logits = nnx.merge(graphdef, _with(param_state, params), rest)(data_x[idx])
    return cross_entropy(logits, data_y[idx])

  identity = {**identity, "lr": config.lr, "batch_size": batch, "num_clips": len(clips)}
  params, losses = training.train(
      loss_fn, nnx.to_pure_dict(param_state), optax.adam(config.lr), steps=config.steps,
      directory=directory, identity=identity, save_every=config.checkpoint_every,
      progress=progress)
  nnx.update(model, _with(param_state, params))
  return losses


def _with(template: nnx.State, pure: Any) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def load_pretrained(extractor: nnx.Module, directory: str, *, identity: dict[str, Any],
                    frames: int, num_classes: int) -> dict[str, Any]:
  """Loads the latest pre-trained weights under `directory` into `extractor`; returns the
  metadata (with "step"). FileNotFoundError when there is no checkpoint."""
  model = _Probe(extractor, frames, num_classes, rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  like = {"params": params, "opt_state": optax.adam(1.0).init(params)}
  found = training.restore(directory, like, identity, steps=None)
  if found is None:
    raise FileNotFoundError(f"no pre-trained extractor under {directory!r}: run the 'pretrain' "
                            f"stage first")
  state, meta = found
  nnx.update(model, _with(nnx.state(model, nnx.Param), state["params"]))
  return meta
