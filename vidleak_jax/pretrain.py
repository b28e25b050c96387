"""Local pre-training of a feature extractor (no weights are ever downloaded), resumable.

The extractor is trained with a linear probe on its flattened feature matrix [T·D] -> K classes
(softmax cross-entropy, Adam) on the given clips; minibatch i is drawn from fold_in(key, i), so a
run resumed from a checkpoint continues exactly as an uninterrupted one. Orbax checkpoints under
`directory` hold the extractor's variables, the probe and optimizer state, and JSON metadata
(architecture, the loss of every step so far); rerunning continues from the latest one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from vidleak_jax.fl.updates import cross_entropy
from vidleak_jax.logging_io import without_orbax_info


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  """steps of Adam (lr) on minibatches of `batch_size` clips; a checkpoint every
  `checkpoint_every` steps and at the end."""

  steps: int = 300
  batch_size: int = 8
  lr: float = 3e-3
  checkpoint_every: int = 50

  def __post_init__(self):
    for field in ("steps", "batch_size", "checkpoint_every"):
      if getattr(self, field) < 1:
        raise ValueError(f"pretrain {field} must be >= 1, got {getattr(self, field)}")
    if not self.lr > 0:
      raise ValueError(f"pretrain lr must be > 0, got {self.lr}")


class _Probe(nnx.Module):
  """extractor -> flattened [N, T·D] -> linear -> logits [N, K]."""

  def __init__(self, extractor: nnx.Module, frames: int, num_classes: int, *, rngs: nnx.Rngs):
    self.extractor = extractor
    self.linear = nnx.Linear(frames * extractor.out_features, num_classes, rngs=rngs)

  def __call__(self, clips: jax.Array) -> jax.Array:
    feats = self.extractor(clips)
    return self.linear(feats.reshape(feats.shape[0], -1))


def _manager(directory: str, *, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create,
                                         enable_async_checkpointing=False)
  with without_orbax_info():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _check_meta(meta: dict[str, Any], identity: dict[str, Any], directory: str) -> None:
  stored = {k: meta.get(k) for k in identity}
  if stored != identity:
    raise ValueError(f"checkpoint directory {directory!r} holds a different extractor "
                     f"({stored}, expected {identity}): use another directory")


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
  params = nnx.to_pure_dict(param_state)
  opt = optax.adam(config.lr)
  train = {"params": params, "opt_state": opt.init(params)}
  losses: list[float] = []
  manager = _manager(directory, create=True)
  if manager.latest_step() is not None:
    step = manager.latest_step()
    with without_orbax_info():
      restored = manager.restore(step, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(train), meta=ocp.args.JsonRestore()))
    _check_meta(restored["meta"], identity, directory)
    train, losses = restored["train"], list(restored["meta"]["losses"])[:step]
  data_x, data_y = jnp.asarray(clips, jnp.float32), jnp.asarray(labels, jnp.int32)
  batch = min(config.batch_size, len(clips))

  def loss_fn(p, x, y):
    return cross_entropy(nnx.merge(graphdef, _with(param_state, p), rest)(x), y)

  @jax.jit
  def step_fn(train, i):
    idx = jax.random.choice(jax.random.fold_in(batch_key, i), len(clips), (batch,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(train["params"], data_x[idx], data_y[idx])
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = opt.update(grads, train["opt_state"], train["params"])
    return {"params": optax.apply_updates(train["params"], updates), "opt_state": opt_state}, loss

  for i in range(len(losses), config.steps):
    train, loss = step_fn(train, jnp.int32(i))
    losses.append(float(loss))
    done = i + 1
    if done % config.checkpoint_every == 0 or done == config.steps:
      with without_orbax_info():
        manager.save(done, args=ocp.args.Composite(
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave({**identity, "losses": losses})))
    if progress is not None:
      progress(done, config.steps, losses[-1])
  with without_orbax_info():
    manager.close()
  nnx.update(model, _with(param_state, train["params"]))
  return np.asarray(losses, np.float32)


def _with(template: nnx.State, pure: Any) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def load_pretrained(extractor: nnx.Module, directory: str, *, identity: dict[str, Any],
                    frames: int, num_classes: int) -> dict[str, Any]:
  """Loads the latest pre-trained weights under `directory` into `extractor`; returns the
  metadata. FileNotFoundError when there is no checkpoint."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no pre-trained extractor under {directory!r}: run the 'pretrain' "
                            f"stage first")
  manager = _manager(directory, create=False)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no pre-trained extractor under {directory!r}: run the 'pretrain' "
                            f"stage first")
  model = _Probe(extractor, frames, num_classes, rngs=nnx.Rngs(params=0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  template = {"params": params, "opt_state": optax.adam(1.0).init(params)}
  with without_orbax_info():
    restored = manager.restore(step, args=ocp.args.Composite(
        train=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    manager.close()
  _check_meta(restored["meta"], identity, directory)
  nnx.update(model, _with(nnx.state(model, nnx.Param), restored["train"]["params"]))
  return {**restored["meta"], "step": step}
