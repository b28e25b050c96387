"""Shared updates captured elsewhere: `.npz` or `.safetensors` files, never pickle.

Format: one array per parameter, keyed by its '/'-joined path in the params dict (e.g.
"conv1/kernel", "head/bias"), with the parameter's shape and dtype — exactly what the attack stage
writes to `shared_update.npz` (`vidleak_jax.tree_io.flatten_tree`).
"""

from __future__ import annotations

import os

from vidleak_jax.io import load_npz
from vidleak_jax.tree_io import unflatten_like, validate_target_grads
from vidleak_jax.types import Grads, Params

FORMATS = (".npz", ".safetensors")


def load_update(path: str, params: Params) -> Grads:
  """Reads a captured update and validates names, shapes, dtypes and finiteness against params."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    flat = load_npz(path)  # allow_pickle=False: pickled payloads are refused
  elif ext == ".safetensors":
    from safetensors.numpy import load_file

    try:
      flat = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise ValueError(f"cannot load {path!r}: {e}") from None
  else:
    raise ValueError(f"{path!r}: unsupported format {ext!r}; expected one of "
                     f"{', '.join(FORMATS)}")
  grads = unflatten_like(params, flat, name=repr(path))
  try:
    validate_target_grads(params, grads)
  except ValueError as e:
    raise ValueError(f"{path!r}: {e}") from None
  return grads
