"""A FedAvg client's local training: E epochs of SGD (optional momentum) over mini-batches of b
clips, shuffled each epoch by the client's key; it shares its weight delta.

FedSGD is the special case E = 1, b = B (one full-batch step: the delta is lr × the gradient).
The same function is the attacker's replay of the client's training (`replay`): it is pure and
differentiable w.r.t. the clips, so a candidate batch's delta can be matched to the shared one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vidleak_jax.fl.updates import check_update_inputs, client_update, cross_entropy
from vidleak_jax.settings import check, setting
from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params

# What a client shares given (apply_fn, params, clips[B,...], labels[B]): an update like params.
UpdateFn = Callable[[ApplyFn, Params, Clip, Labels], Grads]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalTraining:
  """A FedAvg client's public training settings (what a server tells its clients)."""

  epochs: int = setting(1, help="FedAvg local epochs E over the client's clips.")
  batch_size: int = setting(0, help="FedAvg local mini-batch size b (0: all the client's clips "
                            "in one batch); must divide the client's clips.")
  lr: float = setting(0.1, help="FedAvg local SGD learning rate.")
  momentum: float = setting(0.0, help="FedAvg local SGD momentum (0: plain SGD).")
  shuffle: bool = setting(True, help="FedAvg clients reshuffle their clips every epoch (by "
                          "their own key); else the same order every epoch.")

  def __post_init__(self):
    check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
    check(self.batch_size >= 0, "batch_size", f"must be >= 0 (0: full batch), got "
          f"{self.batch_size}")
    check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")  # also rejects NaN
    check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")

  def minibatch(self, num_clips: int) -> int:
    """b for a client holding `num_clips` clips; ValueError naming batch_size if b does not
    divide them."""
    b = self.batch_size or num_clips
    if b > num_clips or num_clips % b:
      raise ValueError(f"local batch_size={self.batch_size} does not fit the client's "
                       f"{num_clips} clip(s): it must divide them (or be 0 for one full batch)")
    return b

  def steps(self, num_clips: int) -> int:
    """Local SGD steps: E × (clips / b)."""
    return self.epochs * (num_clips // self.minibatch(num_clips))


def minibatch_order(key: jax.Array | None, num_clips: int, local: LocalTraining) -> jax.Array:
  """Clip indices of every local step, int32 [steps, b]: epoch by epoch, a permutation of the
  clips drawn from fold_in(key, epoch) when `local.shuffle` and `key` is given, else in order.
  Works on a traced key (under jit/vmap)."""
  b = local.minibatch(num_clips)
  if not local.shuffle or key is None:
    return jnp.tile(jnp.arange(num_clips, dtype=jnp.int32), local.epochs).reshape(-1, b)
  epochs = [jax.random.permutation(jax.random.fold_in(key, e), num_clips)
            for e in range(local.epochs)]
  return jnp.concatenate(epochs).reshape(-1, b).astype(jnp.int32)


def local_train(apply_fn: ApplyFn, params: Params, clips: Clip, labels: jax.Array,
                order: jax.Array, *, learning_rate: float, momentum: float = 0.0,
                remat: bool = False) -> Params:
  """Params after one SGD step (optax.sgd) per row of `order` [steps, b] on
  (clips[order[i]], labels[order[i]]), mean cross-entropy; a `lax.scan`, differentiable w.r.t.
  clips. `remat`: recompute each step's activations in the backward pass (memory ~ one step)."""
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)

  def one_step(carry, idx):
    p, opt_state = carry
    g = jax.grad(lambda q: cross_entropy(apply_fn(q, clips[idx]), labels[idx]))(p)
    updates, opt_state = optimizer.update(g, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  if remat:
    one_step = jax.checkpoint(one_step)
  (trained, _), _ = jax.lax.scan(one_step, (params, optimizer.init(params)), jnp.asarray(order))
  return trained


def fedavg_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                  local: LocalTraining = LocalTraining(), key: jax.Array | None = None,
                  order: jax.Array | np.ndarray | None = None, remat: bool = False) -> Grads:
  """FedAvg update, params_before − params_after, of a client's local training on its clips.

  `clips` [B,...] and `labels` [B] as in `client_update` (checked once, outside the loop).
  The mini-batch `order` [steps, b] is drawn from `key` (see `minibatch_order`) unless given.
  """
  clips, labels = check_update_inputs(apply_fn, params, clips, labels)
  if order is None:
    order = minibatch_order(key, clips.shape[0], local)
  elif np.ndim(order) != 2 or np.shape(order)[0] < 1:
    raise ValueError(f"order must be clip indices [steps, b], got shape {np.shape(order)}")
  trained = local_train(apply_fn, params, clips, labels, order, learning_rate=local.lr,
                        momentum=local.momentum, remat=remat)
  return jax.tree.map(jnp.subtract, params, trained)


APPROXIMATIONS = ("order", "full_batch", "fedsgd")  # what the attacker assumes of a FedAvg round


def replay(local: LocalTraining, *, order: jax.Array | np.ndarray | None = None,
           approximation: str = "order", remat: bool = False) -> UpdateFn:
  """The attacker's model of the client's update, for `gradient_matching_loss(update_fn=...)`.

  approximation "order": replay the client's local training with the mini-batch `order` (known
  to the attacker; None = in order every epoch). "full_batch" (the order is unknown): the same
  number of SGD steps, each on all B candidate clips. "fedsgd": one gradient scaled by
  lr × steps (what a FedSGD attack implicitly assumes).
  """
  if approximation == "order":
    return functools.partial(fedavg_update, local=local, order=order, remat=remat)
  if approximation == "full_batch":
    return functools.partial(_replay_full_batch, local=local, remat=remat)
  if approximation == "fedsgd":
    return functools.partial(_fedsgd_scaled, local=local)
  raise ValueError(f"approximation={approximation!r}; valid: {', '.join(APPROXIMATIONS)}")


def _replay_full_batch(apply_fn, params, clips, labels, *, local, remat):
  steps = local.steps(clips.shape[0])
  order = np.tile(np.arange(clips.shape[0], dtype=np.int32), (steps, 1))
  return fedavg_update(apply_fn, params, clips, labels, local=local, order=order, remat=remat)


def _fedsgd_scaled(apply_fn, params, clips, labels, *, local):
  scale = local.lr * local.steps(clips.shape[0])
  return jax.tree.map(lambda g: scale * g, client_update(apply_fn, params, clips, labels))
