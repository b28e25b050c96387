"""Params/grads pytrees by leaf path: flat `{"a/b/c": array}` views for npz files (never pickle),
and the check that a set of gradients matches a model's parameters."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from vidleak_jax.types import Grads, Params


def leaf_paths(tree: Any) -> list[str]:
  """'/'-joined key paths of a params/grads pytree, in `jax.tree.leaves` order."""
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten_tree(tree: Any) -> dict[str, np.ndarray]:
  """Nested dict of arrays -> {"/"-joined path: numpy array}."""
  return {path: np.asarray(leaf) for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree))}


def unflatten_like(template: Any, flat: Mapping[str, Any], *, name: str = "tree") -> Any:
  """Rebuilds `flat` into the structure of `template`, checking keys, shapes and dtypes."""
  paths = leaf_paths(template)
  missing = [p for p in paths if p not in flat]
  unknown = [k for k in flat if k not in set(paths)]
  if missing or unknown:
    raise ValueError(f"{name} does not match the model's parameters: missing {missing[:5]}, "
                     f"unknown {unknown[:5]}")
  leaves = []
  for path, ref in zip(paths, jax.tree.leaves(template)):
    value = np.asarray(flat[path])
    if value.shape != np.shape(ref) or value.dtype != np.asarray(ref).dtype:
      raise ValueError(f"{name}[{path!r}] is {value.dtype}{list(value.shape)}, expected "
                       f"{np.asarray(ref).dtype}{list(np.shape(ref))}")
    leaves.append(value)
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def validate_target_grads(params: Params, target_grads: Grads) -> None:
  """Raises ValueError unless `target_grads` has params' structure, shapes, and finite values."""
  p_paths, g_paths = leaf_paths(params), leaf_paths(target_grads)
  if p_paths != g_paths:
    missing = sorted(set(p_paths) - set(g_paths))[:5]
    extra = sorted(set(g_paths) - set(p_paths))[:5]
    raise ValueError(f"target_grads does not match the model's parameters: missing {missing}, "
                     f"unexpected {extra}")
  for path, p, g in zip(p_paths, jax.tree.leaves(params), jax.tree.leaves(target_grads)):
    if np.shape(p) != np.shape(g):
      raise ValueError(f"target_grads[{path!r}] has shape {np.shape(g)}, expected {np.shape(p)}")
    if not np.all(np.isfinite(np.asarray(g))):
      raise ValueError(f"target_grads[{path!r}] contains NaN or Inf values")
