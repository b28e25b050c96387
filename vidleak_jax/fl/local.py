"""A FedAvg client's local training: E epochs of SGD (optional momentum) over mini-batches of b
clips, shuffled each epoch by the client's key; it shares its weight delta.

FedSGD is the special case E = 1, b = B (one full-batch step: the delta is lr × the gradient).
The same function is the attacker's replay of the client's training (`replay`): it is pure and
differentiable w.r.t. the clips, so a candidate batch's delta can be matched to the shared one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vidleak_jax.fl.updates import check_update_inputs, cross_entropy
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


# One local step's gradient: (params, mini-batch clips [b,...], labels [b], step index []) ->
# grads like params. The default is the mean cross-entropy's; DP-SGD's clips and noises it.
StepGrad = Callable[[Params, Clip, Labels, jax.Array], Grads]


def mean_ce_grad(apply_fn: ApplyFn) -> StepGrad:
  """The plain SGD step's gradient: of the mini-batch's mean cross-entropy."""
  return lambda p, x, y, step: jax.grad(lambda q: cross_entropy(apply_fn(q, x), y))(p)


def local_train(apply_fn: ApplyFn, params: Params, clips: Clip, labels: jax.Array,
                order: jax.Array, *, learning_rate: float, momentum: float = 0.0,
                remat: bool = False, step_grad: StepGrad | None = None) -> Params:
  """Params after one SGD step (optax.sgd) per row i of `order` [steps, b] on
  (clips[order[i]], labels[order[i]]) with gradient `step_grad` (default `mean_ce_grad`); a
  `lax.scan`, differentiable w.r.t. clips. `remat`: recompute each step's activations in the
  backward pass (memory ~ one step)."""
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)
  step_grad = step_grad or mean_ce_grad(apply_fn)

  def one_step(carry, step_and_idx):
    p, opt_state = carry
    step, idx = step_and_idx
    updates, opt_state = optimizer.update(step_grad(p, clips[idx], labels[idx], step),
                                          opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  if remat:
    one_step = jax.checkpoint(one_step)
  order = jnp.asarray(order)
  steps = jnp.arange(order.shape[0], dtype=jnp.int32)
  (trained, _), _ = jax.lax.scan(one_step, (params, optimizer.init(params)), (steps, order))
  return trained


def fedavg_update(apply_fn: ApplyFn, params: Params, clips: Clip, labels: Labels, *,
                  local: LocalTraining = LocalTraining(), key: jax.Array | None = None,
                  order: jax.Array | np.ndarray | None = None, remat: bool = False,
                  step_grad: StepGrad | None = None) -> Grads:
  """FedAvg update, params_before − params_after, of a client's local training on its clips.

  `clips` [B,...] and `labels` [B] as in `client_update` (checked once, outside the loop).
  The mini-batch `order` [steps, b] is drawn from `key` (see `minibatch_order`) unless given.
  `step_grad`: each step's gradient (default: the mini-batch's mean cross-entropy's).
  """
  clips, labels = check_update_inputs(apply_fn, params, clips, labels)
  if order is None:
    order = minibatch_order(key, clips.shape[0], local)
  elif np.ndim(order) != 2 or np.shape(order)[0] < 1:
    raise ValueError(f"order must be clip indices [steps, b], got shape {np.shape(order)}")
  trained = local_train(apply_fn, params, clips, labels, order, learning_rate=local.lr,
                        momentum=local.momentum, remat=remat, step_grad=step_grad)
  return jax.tree.map(jnp.subtract, params, trained)


APPROXIMATIONS = ("order", "full_batch", "fedsgd")  # what the attacker assumes of a FedAvg round

# The step gradient of a model: apply_fn -> StepGrad (e.g. `mean_ce_grad`, DP-SGD's noise-free
# clipped mean `fl.privacy.clipped_mean_grad(C)`).
StepGradFactory = Callable[[ApplyFn], StepGrad]


def replay(local: LocalTraining, *, order: jax.Array | np.ndarray | None = None,
           approximation: str = "order", remat: bool = False,
           step_grad: StepGradFactory = mean_ce_grad) -> UpdateFn:
  """The attacker's model of the client's update, for `gradient_matching_loss(update_fn=...)`.

  approximation "order": replay the client's local training with the mini-batch `order` (known
  to the attacker; None = in order every epoch). "full_batch" (the order is unknown): the same
  number of SGD steps, each on all B candidate clips. "fedsgd": one step's gradient on all B
  clips scaled by lr × steps (what a FedSGD attack implicitly assumes). Every step's gradient is
  `step_grad(apply_fn)`'s (default: the mean cross-entropy's).
  """
  if approximation not in APPROXIMATIONS:
    raise ValueError(f"approximation={approximation!r}; valid: {', '.join(APPROXIMATIONS)}")

  def update(apply_fn, params, clips, labels):
    grad = step_grad(apply_fn)
    if approximation == "fedsgd":
      clips, labels = check_update_inputs(apply_fn, params, clips, labels)
      scale = local.lr * local.steps(clips.shape[0])
      return jax.tree.map(lambda g: scale * g, grad(params, clips, labels, jnp.int32(0)))
    steps_order = order
    if approximation == "full_batch":
      steps_order = np.tile(np.arange(clips.shape[0], dtype=np.int32),
                            (local.steps(clips.shape[0]), 1))
    return fedavg_update(apply_fn, params, clips, labels, local=local, order=steps_order,
                         remat=remat, step_grad=grad)

  return update
