"""Analytic label recovery from the shared gradient of the classifier's last layer.

The output layer's bias is found by what it does, not by its name: among the float parameters of
shape (K,) (K: the model's number of logits), the one whose perturbation along any direction v moves
every clip's logits by v (up to a constant per clip, which softmax cross-entropy ignores). One
forward-mode pass on two probe clips tests all candidates together (`output_bias_index`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.fl.updates import cross_entropy
from vidleak_jax.tree_io import leaf_paths
from vidleak_jax.types import ApplyFn, Grads, Params


def _key_name(key: Any) -> str:
  """One step of a `jax.tree_util` key path: dict key, sequence index or attribute name."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_names(tree: Any) -> list[str]:
  """'/'-joined key paths in `jax.tree.leaves` order; equinox attributes by their bare name."""
  return ["/".join(_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_float_vector(leaf: Any, size: int) -> bool:
  return (tuple(np.shape(leaf)) == (size,)
          and jnp.issubdtype(jnp.result_type(leaf), jnp.floating))


def _select_by_name(names: list[str], layer: str) -> list[int]:
  """Leaves that `layer` names: the path itself, `<layer>/bias`, or either as a path's tail."""
  wanted = (layer, f"{layer}/bias")
  exact = [i for i, n in enumerate(names) if n in wanted]
  return exact or [i for i, n in enumerate(names) if n.endswith(tuple("/" + w for w in wanted))]


def _bias_like(apply_fn: ApplyFn, params: Params, clip_shape: tuple[int, ...],
               candidates: list[int], num_classes: int) -> list[int]:
  """The candidates (leaf indices) that act as an additive bias on every clip's logits."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  probe_key, direction_key = jax.random.split(jax.random.key(0))
  probes = jax.random.uniform(probe_key, (2, *clip_shape[1:]), jnp.float32)
  directions = jax.random.normal(direction_key, (len(candidates), num_classes), jnp.float32)

  def logits_of(all_leaves, vectors):
    new = list(all_leaves)
    for i, vector in zip(candidates, vectors):
      new[i] = vector
    return apply_fn(jax.tree_util.tree_unflatten(treedef, new), probes)

  primals = tuple(leaves[i] for i in candidates)
  # Tangent set j moves candidate j alone, along directions[j]; vmapped: one forward-mode pass.
  tangents = tuple(
      (jnp.eye(len(candidates), dtype=jnp.float32)[:, j:j + 1] * directions[j]).astype(p.dtype)
      for j, p in enumerate(primals))

  @jax.jit  # the params are arguments, not constants baked into the executable
  def moves(all_leaves, primals, tangents):
    logits = lambda vectors: logits_of(all_leaves, vectors)
    return jax.vmap(lambda t: jax.jvp(logits, (primals,), (t,))[1])(tangents)

  moved = np.asarray(moves(leaves, primals, tangents), np.float64)  # [n, 2, K]
  off = moved - np.asarray(directions, np.float64)[:, None, :]
  if num_classes > 1:  # a per-clip constant shift leaves softmax cross-entropy unchanged
    off -= off.mean(axis=-1, keepdims=True)
  eps = max(float(jnp.finfo(p.dtype).eps) for p in primals)
  tolerance = np.sqrt(eps) * (1.0 + float(np.abs(directions).max()))
  return [i for i, err in zip(candidates, np.abs(off).max(axis=(1, 2))) if err <= tolerance]


def output_bias_index(apply_fn: ApplyFn, params: Params, clip_shape: tuple[int, ...], *,
                      layer: str | None = None) -> int:
  """Position, in `jax.tree.leaves(params)` order, of the output layer's bias.

  Found structurally: the float leaf of shape (K,) whose perturbation along a random direction v
  moves both probe clips' logits by v (up to a per-clip constant): one jitted forward-mode pass
  of `apply_fn` on two clips of `clip_shape[1:]`, all candidates vmapped. Works for any pytree
  (flax.linen variable dicts, nnx pure dicts, equinox modules, plain dicts) and any leaf names.
  `layer` overrides the search: a leaf path, a layer whose `bias` leaf is meant, or the tail of
  either. Raises ValueError naming `layer` when no leaf, or more than one, acts as the bias.
  """
  spec = jax.ShapeDtypeStruct((1, *clip_shape[1:]), jnp.float32)
  num_classes = jax.eval_shape(apply_fn, params, spec).shape[-1]
  names, leaves = _path_names(params), jax.tree.leaves(params)
  vectors = [i for i, leaf in enumerate(leaves) if _is_float_vector(leaf, num_classes)]
  if layer is not None:
    chosen = _select_by_name(names, layer)
    if len(chosen) != 1 or not _is_float_vector(leaves[chosen[0]], num_classes):
      found = [f"{names[i]} {tuple(np.shape(leaves[i]))}" for i in chosen]
      raise ValueError(f"layer={layer!r} must name exactly one float parameter of shape "
                       f"({num_classes},) (the output bias); it matches {found or 'none'}. "
                       f"Parameters of shape ({num_classes},): {[names[i] for i in vectors]}")
    return chosen[0]
  acting = _bias_like(apply_fn, params, clip_shape, vectors, num_classes) if vectors else []
  if not acting:
    raise ValueError(
        f"cannot locate the output layer's bias: no parameter of shape ({num_classes},) moves the "
        f"logits by its own change (checked: {[names[i] for i in vectors]}); analytic label "
        f"recovery needs an output bias: pass the labels, or layer=<path> of an equivalent leaf")
  if len(acting) > 1:
    raise ValueError(f"several parameters act as the output layer's bias: "
                     f"{[names[i] for i in acting]}; pass layer=<one of them>")
  return acting[0]


def output_bias_path(apply_fn: ApplyFn, params: Params, clip_shape: tuple[int, ...], *,
                     layer: str | None = None) -> str:
  """'/'-joined key path of the output layer's bias in `params` (see `output_bias_index`)."""
  return _path_names(params)[output_bias_index(apply_fn, params, clip_shape, layer=layer)]


def last_layer_bias_grad(grads: Grads, num_classes: int, *, layer: str | None = None,
                         apply_fn: ApplyFn | None = None, params: Params | None = None,
                         clip_shape: tuple[int, ...] | None = None) -> jax.Array:
  """Gradient of the output layer's bias, [K].

  With `apply_fn`, `params` and `clip_shape` the bias is located structurally
  (`output_bias_index`, `layer` overriding). Without them, by name: the leaf `<layer>/bias`
  (`layer` default "head"), else the unique leaf of shape (K,) whose path ends in "bias".
  """
  if apply_fn is not None and params is not None and clip_shape is not None:
    index = output_bias_index(apply_fn, params, clip_shape, layer=layer)
    return jax.tree.leaves(grads)[index]
  paths = leaf_paths(grads)
  leaves = jax.tree.leaves(grads)
  exact = [l for p, l in zip(paths, leaves) if p == f"{layer or 'head'}/bias"]
  if exact:
    return exact[0]
  candidates = [(p, l) for p, l in zip(paths, leaves)
                if p.endswith("bias") and l.shape == (num_classes,)]
  if len(candidates) != 1:
    raise ValueError(f"cannot locate the output layer's bias of shape ({num_classes},) in the "
                     f"gradient; pass layer=<name>, or apply_fn, params and clip_shape to find "
                     f"it by what it does. Bias-like leaves: {[p for p, _ in candidates]}")
  return candidates[0][1]


def counts_from_bias_grad(bias_grad: np.ndarray, batch_size: int,
                          mean_probs: np.ndarray) -> np.ndarray:
  """Label counts n_k ≈ B (p̄_k − ∂L/∂b_k), rounded to sum to B (largest remainder). Host side."""
  estimate = np.clip(batch_size * (mean_probs - bias_grad), 0.0, None)
  if estimate.sum() <= 0:
    estimate = np.clip(-bias_grad, 0.0, None) + 1e-12
  estimate = estimate * batch_size / estimate.sum()
  counts = np.floor(estimate).astype(int)
  order = np.argsort(-(estimate - counts), kind="stable")
  counts[order[: batch_size - counts.sum()]] += 1
  return counts


def recover_labels(key: jax.Array, apply_fn: ApplyFn, params: Params, target_grads: Grads,
                   clip_shape: tuple[int, ...], *, layer: str | None = None,
                   references: jax.Array | None = None, num_probe_clips: int = 16,
                   trajectory: tuple[int, float] | None = None,
                   simulations: int = 3,
                   update_fn: Callable[..., Grads] | None = None) -> jax.Array:
  """Recovers the B labels of the client batch from `target_grads`; returns int32 [B], sorted
  (assigned to slots when `update_fn` is given, below).

  B = 1: iDLG — for softmax cross-entropy ∂L/∂b = softmax − onehot, whose only negative entry
  is the true label. B > 1: the bias gradient is mean(softmax) − counts / B; mean(softmax) is
  estimated from the model's predictions on probe clips: the attacker's `references` [k,H,W,C]
  (frames of the same camera) held still for T frames when given, else `num_probe_clips` clips of
  uniform noise drawn with `key`. Through a frozen ImageNet extractor the camera's frames predict
  the batch far better than noise (the whole multiset right in 77–100 % of seeds instead of
  5–63 %: experiments/results/label_probes.md). Order within the batch is not identifiable;
  the evaluation matches reconstructions to ground truth.

  The output bias is located by what it does (`output_bias_index`), whatever its name; `layer`
  (a leaf path or a layer holding a `bias`) overrides the search.

  `trajectory=(steps, lr)`: `target_grads` is a FedAvg delta of `steps` local SGD steps at
  learning rate lr (after Dimitrov et al., TMLR 2022): its bias part is lr × the sum of the
  steps' bias gradients, sum_t (mean softmax_t − counts / B), so mean(softmax) must be averaged
  over the client's intermediate models, which the attacker does not have. It simulates them:
  `steps` SGD steps on the probe clips labelled with the current count estimate (soft labels
  counts / B), the counts re-estimated from the simulated softmax, `simulations` times. The sign
  test at B = 1 holds for any trajectory (the true class's entry alone is negative). With the
  attacker's `update_fn` (its replay of the client's training, `vidleak_jax.fl.replay`) the
  labels are then assigned to clip slots by `assign_labels_by_replay` (not sorted): in a known
  mini-batch order the slot matters. Measured on the quickstart C3D, B = 4, 4 local steps
  (lr 0.1): the multiset right in 1 of 6 seeds from the simulation alone, every slot right in 5
  of 6 after the replay search.
  """
  batch_size = clip_shape[0]
  logits_shape = jax.eval_shape(apply_fn, params, jnp.zeros((1, *clip_shape[1:]), jnp.float32))
  num_classes = logits_shape.shape[-1]
  bias_grad = np.asarray(last_layer_bias_grad(target_grads, num_classes, layer=layer,
                                               apply_fn=apply_fn, params=params,
                                               clip_shape=clip_shape))
  if batch_size == 1:
    return jnp.asarray([int(np.argmin(bias_grad))], jnp.int32)
  if trajectory is not None and (trajectory[0] < 1 or not trajectory[1] > 0):
    raise ValueError(f"trajectory must be (local steps >= 1, learning rate > 0), got "
                     f"{trajectory}")
  if references is not None and len(references):
    if tuple(references.shape[1:]) != tuple(clip_shape[2:]):
      raise ValueError(f"references must be [k, {', '.join(map(str, clip_shape[2:]))}] frames "
                       f"of the clips' size, got shape {tuple(references.shape)}")
    probes = jnp.repeat(jnp.asarray(references, jnp.float32)[:, None], clip_shape[1], axis=1)
  else:
    probes = jax.random.uniform(key, (num_probe_clips, *clip_shape[1:]))
  mean_probs = np.asarray(jax.nn.softmax(apply_fn(params, probes)).mean(axis=0))
  if trajectory is not None:
    bias_grad = bias_grad / (trajectory[1] * trajectory[0])  # lr × steps
  counts = counts_from_bias_grad(bias_grad, batch_size, mean_probs)
  if trajectory is not None:
    steps, lr = trajectory
    simulate = jax.jit(functools.partial(_simulated_mean_probs, apply_fn, steps=steps, lr=lr))
    for _ in range(simulations):
      mean_probs = np.asarray(simulate(params, probes, jnp.asarray(counts / batch_size)))
      counts = counts_from_bias_grad(bias_grad, batch_size, mean_probs)
  labels = jnp.asarray(np.repeat(np.arange(num_classes), counts), jnp.int32)
  if trajectory is not None and update_fn is not None:
    labels = assign_labels_by_replay(key, apply_fn, params, target_grads, clip_shape, update_fn,
                                     labels, references=references, layer=layer)
  return labels


def _simulated_mean_probs(apply_fn: ApplyFn, params: Params, probes: jax.Array,
                          label_share: jax.Array, *, steps: int, lr: float) -> jax.Array:
  """mean softmax [K] over `steps` SGD steps (lr) on probes [P,...] with soft labels
  `label_share` [K], averaged over the steps (the model before each step)."""
  targets = jnp.broadcast_to(label_share, (probes.shape[0], label_share.shape[0]))

  def step(p, _):
    logits = apply_fn(p, probes)
    grads = jax.grad(lambda q: cross_entropy(apply_fn(q, probes), targets))(p)
    return jax.tree.map(lambda w, g: w - lr * g, p, grads), jax.nn.softmax(logits).mean(axis=0)

  _, per_step = jax.lax.scan(step, params, None, length=steps)
  return per_step.mean(axis=0)


def assign_labels_by_replay(key: jax.Array, apply_fn: ApplyFn, params: Params,
                            target_grads: Grads, clip_shape: tuple[int, ...],
                            update_fn: Callable[..., Grads], initial: jax.Array, *,
                            references: jax.Array | None = None, layer: str | None = None,
                            max_enumerated: int = 4096, sweeps: int = 8) -> jax.Array:
  """The labels [B] per clip slot whose replayed update best explains the target's output-bias
  part: ||bias(update_fn(apply_fn, params, probes, y)) − bias(target)||² over y in [K]^B.

  For a FedAvg delta in a known mini-batch order the slot of each label matters (which labels
  train together, and in which step, shapes the client's trajectory), which a label multiset
  cannot express. The replay runs on probe clips (the `references` held still, else uniform
  noise from `key`), since the clips are unknown. All K^B assignments are scored (vmapped) when
  there are at most `max_enumerated`; else a local search from `initial` (every slot tries
  every class and every two slots trade labels; the best move is kept, up to `sweeps` rounds).
  """
  batch_size = clip_shape[0]
  index = output_bias_index(apply_fn, params, clip_shape, layer=layer)
  target = jax.tree.leaves(target_grads)[index]
  num_classes = target.shape[0]
  if references is not None and len(references):
    frames = jnp.asarray(references, jnp.float32)
    probes = jnp.repeat(frames[jnp.arange(batch_size) % len(frames)][:, None], clip_shape[1],
                        axis=1)
  else:
    probes = jax.random.uniform(key, clip_shape, jnp.float32)

  @jax.jit
  def score(assignments, probes, params, target):  # [N, B] -> [N]
    def one(y):
      return jnp.sum(jnp.square(jax.tree.leaves(update_fn(apply_fn, params, probes, y))[index]
                                - target))
    return jax.lax.map(one, assignments, batch_size=64)

  scores = lambda assignments: score(assignments, probes, params, target)

  if num_classes ** batch_size <= max_enumerated:
    grid = np.stack(np.meshgrid(*[np.arange(num_classes)] * batch_size, indexing="ij"), -1)
    grid = grid.reshape(-1, batch_size).astype(np.int32)
    return jnp.asarray(grid[int(np.argmin(np.asarray(scores(jnp.asarray(grid)))))])
  best = np.asarray(initial, np.int32)
  best_score = float(scores(jnp.asarray(best[None]))[0])
  swaps = [(i, j) for i in range(batch_size) for j in range(i + 1, batch_size)]
  for _ in range(sweeps):
    moves = np.repeat(best[None], batch_size * num_classes + len(swaps), axis=0)
    singles = np.arange(batch_size * num_classes)  # slot i takes class k
    moves[singles, singles // num_classes] = singles % num_classes
    for row, (i, j) in enumerate(swaps, start=len(singles)):  # slots i and j trade labels
      moves[row, [i, j]] = best[[j, i]]
    found = np.asarray(scores(jnp.asarray(moves)))
    if found.min() >= best_score:
      break
    best, best_score = moves[int(np.argmin(found))], float(found.min())
  return jnp.asarray(best)
