"""Flat `{"a/b/c": array}` views of params/grads pytrees, for npz files (never pickle)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from vidleak_jax.attack.objectives import leaf_paths


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
