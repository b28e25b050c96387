"""The FedAvg server: example-weighted aggregation of client updates, rounds over N clients, and
a resumable simulation that trains the global model before the attacked round."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax import training
from vidleak_jax.fl.local import LocalTraining, UpdateFn, fedavg_update, minibatch_order
from vidleak_jax.types import ApplyFn, Clip, Grads, Labels, Params

# What one training client shares in a round: (params, clips [n,...], labels [n], mini-batch
# order [steps, b], key) -> update like params (its FedAvg delta, after its defences).
ClientFn = Callable[[Params, Clip, Labels, jax.Array, jax.Array], Grads]


def aggregate(updates: Sequence[Grads], weights: Sequence[float] | None = None) -> Grads:
  """Example-weighted mean of N client updates: sum_i w_i u_i / sum_i w_i (`weights`: each
  client's number of clips; None = equal). What secure aggregation lets the server see."""
  if len(updates) < 1:
    raise ValueError("aggregate needs at least one client update (N >= 1), got none")
  weights = np.ones(len(updates)) if weights is None else np.asarray(weights, np.float64)
  if weights.shape != (len(updates),) or np.any(weights <= 0) or not np.all(np.isfinite(weights)):
    raise ValueError(f"weights must be {len(updates)} positive numbers (clips per client), got "
                     f"{weights.tolist()}")
  share = (weights / weights.sum()).tolist()
  return jax.tree.map(lambda *leaves: sum(w * leaf for w, leaf in zip(share, leaves)), *updates)


def aggregated(update_fns: Sequence[UpdateFn]) -> UpdateFn:
  """The update of N clients that each hold B consecutive clips of N·B (client i: rows
  i·B .. i·B+B−1) and compute `update_fns[i]` on them, averaged (equal B: equal weights).
  What an attacker who sees only the aggregate replays on N·B candidate clips."""
  if len(update_fns) < 1:
    raise ValueError("aggregated needs at least one client (N >= 1), got none")
  if len(update_fns) == 1:
    return update_fns[0]
  n = len(update_fns)

  def update(apply_fn: ApplyFn, params: Params, clips: jax.Array, labels: jax.Array) -> Grads:
    if clips.shape[0] % n:
      raise ValueError(f"{clips.shape[0]} clips cannot be split between {n} clients equally")
    b = clips.shape[0] // n
    return aggregate([fn(apply_fn, params, clips[i * b:(i + 1) * b], labels[i * b:(i + 1) * b])
                      for i, fn in enumerate(update_fns)])

  return update


def client_keys(key: jax.Array, round_index: jax.Array | int, num_clients: int) -> jax.Array:
  """Each client's key [N] in round `round_index`: what shuffles its mini-batches."""
  return jax.random.split(jax.random.fold_in(key, round_index), num_clients)


def fedavg_client(apply_fn: ApplyFn, local: LocalTraining) -> ClientFn:
  """The undefended client: its FedAvg delta in the given order (the key is unused)."""
  return lambda params, clips, labels, order, key: fedavg_update(
      apply_fn, params, clips, labels, local=local, order=order)


def fedavg_round(apply_fn: ApplyFn, params: Params, clips: jax.Array, labels: jax.Array,
                 orders: jax.Array, *, local: LocalTraining, client_fn: ClientFn | None = None,
                 keys: jax.Array | None = None) -> tuple[Params, Grads]:
  """One round over N clients holding n clips each: (new global params, the aggregate update).

  clips [N,n,T,H,W,C], labels [N,n], orders [N,steps,b] (each client's mini-batch order); the
  clients train in parallel (vmap) and the server subtracts their example-weighted mean delta
  (equal n: the plain mean). `client_fn` (default `fedavg_client`) computes a client's shared
  update, drawing from its key in `keys` [N] (a defence's randomness; default: split from
  key(0), which the undefended client ignores).
  """
  client_fn = client_fn or fedavg_client(apply_fn, local)
  keys = jax.random.split(jax.random.key(0), labels.shape[0]) if keys is None else keys
  deltas = jax.vmap(lambda c, l, o, k: client_fn(params, c, l, o, k))(clips, labels, orders, keys)
  mean_delta = jax.tree.map(lambda d: d.mean(axis=0), deltas)
  return jax.tree.map(jnp.subtract, params, mean_delta), mean_delta


def accuracy(apply_fn: ApplyFn, params: Params, clips: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy [] of the model on clips [M,...] with int labels [M]."""
  return jnp.mean(jnp.argmax(apply_fn(params, clips), axis=-1) == labels)


def train_global(key: jax.Array, apply_fn: ApplyFn, params: Params, clips: np.ndarray,
                 labels: np.ndarray, test_clips: np.ndarray, test_labels: np.ndarray, *,
                 rounds: int, local: LocalTraining, directory: str | None = None,
                 identity: dict[str, Any] | None = None,
                 progress: Callable[[int, int, float], None] | None = None,
                 client_fn: ClientFn | None = None, save_every: int = 1
                 ) -> tuple[Params, np.ndarray]:
  """`rounds` FedAvg rounds in which all N clients (clips [N,n,...], labels [N,n]) train
  locally from the global params; returns (global params, test accuracy after each round
  [rounds]). Client i's mini-batches in round r are shuffled by client_keys(key, r, N)[i];
  `client_fn` (default: the undefended `fedavg_client`) computes what a client shares, e.g. its
  delta after defences, drawing from client_keys(split(key)[1], r, N)[i].

  With `directory`, an orbax checkpoint every `save_every` rounds and after the last: a rerun
  resumes (same `identity`) and ends exactly as an uninterrupted run.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if clips.ndim < 3 or labels.shape != clips.shape[:2] or len(clips) < 1:
    raise ValueError(f"clients' clips must be [N,n,...] with labels [N,n], got {clips.shape} "
                     f"and {labels.shape}")
  num_clients, n = labels.shape
  local.minibatch(n)  # ValueError if b does not fit the clients' data, before any work
  clips, labels = jnp.asarray(clips, jnp.float32), jnp.asarray(labels, jnp.int32)
  test_clips, test_labels = jnp.asarray(test_clips, jnp.float32), jnp.asarray(test_labels)
  defense_root = jax.random.split(key)[1]

  def one_round(state, r):
    orders = jax.vmap(lambda k: minibatch_order(k, n, local))(client_keys(key, r, num_clients))
    keys = client_keys(defense_root, r, num_clients)
    new, _ = fedavg_round(apply_fn, state["params"], clips, labels, orders, local=local,
                          client_fn=client_fn, keys=keys)
    return {"params": new}, accuracy(apply_fn, new, test_clips, test_labels)

  state, accuracies = training.run_steps(
      one_round, {"params": params}, steps=rounds, directory=directory,
      identity={**(identity or {}), "fedavg": {**dataclasses.asdict(local),
                                               "clients": num_clients, "clips": n}},
      save_every=save_every, progress=progress, key="test_accuracy")
  return state["params"], accuracies

