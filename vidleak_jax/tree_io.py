"""Params/grads pytrees by leaf path: flat `{"a/b/c": array}` views for npz files (never pickle),
and the check that a set of gradients matches a model's parameters."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.inputs import is_concrete
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


def _dtype(x: Any) -> np.dtype:
  """The dtype `x` holds (numpy's for Python scalars and lists); jax does not narrow it here."""
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def validate_target_grads(params: Params, target_grads: Grads, *, name: str = "target_grads",
                          check_values: bool = True) -> None:
  """Raises ValueError unless `target_grads` has params' structure and, leaf by leaf, its shape and
  floating dtype (a float32 parameter's gradient is float32: int32 or float64 ones are refused)
  and finite values.

  The values are read only when `check_values` and only from concrete leaves (not jax Tracers), so
  with `check_values=False`, or under jit/vmap/grad, this is a static check that costs nothing.
  """
  p_paths, g_paths = leaf_paths(params), leaf_paths(target_grads)
  if p_paths != g_paths:
    missing = sorted(set(p_paths) - set(g_paths))[:5]
    extra = sorted(set(g_paths) - set(p_paths))[:5]
    raise ValueError(f"{name} does not match the model's parameters: missing {missing}, "
                     f"unexpected {extra}")
  for path, p, g in zip(p_paths, jax.tree.leaves(params), jax.tree.leaves(target_grads)):
    if np.shape(p) != np.shape(g):
      raise ValueError(f"{name}[{path!r}] has shape {np.shape(g)}, expected {np.shape(p)}")
    p_dtype, g_dtype = _dtype(p), _dtype(g)
    if g_dtype != p_dtype or not jnp.issubdtype(g_dtype, jnp.floating):
      raise ValueError(f"{name}[{path!r}] has dtype {g_dtype.name}, expected {p_dtype.name} (the "
                       f"dtype of the parameter params[{path!r}])")
    if check_values and is_concrete(g) and not np.all(np.isfinite(np.asarray(g))):
      raise ValueError(f"{name}[{path!r}] contains NaN or Inf values")
