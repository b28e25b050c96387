"""Shared updates captured elsewhere: `.npz` or `.safetensors` files, never pickle.

Format: one array per parameter, keyed by its '/'-joined path in the params dict (e.g.
"conv1/kernel", "head/bias"), with the parameter's shape and dtype — exactly what the attack stage
writes to `shared_update.npz` (`vidleak_jax.tree_io.flatten_tree`).

A file is checked in two passes. First what it declares — the member headers of an .npz, the JSON
header of a .safetensors — against the model's parameters (names, shapes, dtypes) and the total
against the host's available memory, before any array data is read: a small file declaring huge
arrays, unknown names or object dtypes is refused without allocating them. Then the arrays are
read and their values checked (finite).
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import jax
import numpy as np

from vidleak_jax import resources
from vidleak_jax.io import ArrayHeader, load_npz, npz_headers
from vidleak_jax.tree_io import leaf_paths, unflatten_like, validate_target_grads
from vidleak_jax.types import Grads, Params

FORMATS = (".npz", ".safetensors")
# safetensors' dtype names -> numpy's.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                      "BOOL": "bool"}


def _expected(params: Params) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype name)} of the parameters an update must match."""
  return {path: (tuple(np.shape(leaf)), np.dtype(leaf.dtype).name)
          for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params))}


def _describe(shape, dtype: str) -> str:
  return f"{dtype}[{', '.join(map(str, shape))}]"


def check_declared(path: str, declared: Mapping[str, tuple[tuple[int, ...], str]],
                   params: Params) -> None:
  """ValueError naming `path` and the key unless `declared` ({key: (shape, dtype name)}, from a
  file's headers) has exactly params' keys, shapes and dtypes, and `resources.InsufficientMemory`
  (field "gradients") if the arrays would not fit in the host's available memory."""
  expected = _expected(params)
  unknown = [k for k in declared if k not in expected]
  if unknown:
    raise ValueError(f"{path!r}: unknown key {unknown[0]!r}"
                     f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; "
                     f"expected the model's parameter paths: {', '.join(list(expected)[:8])}"
                     f"{', ...' if len(expected) > 8 else ''}")
  for key, (shape, dtype) in declared.items():
    if (tuple(shape), dtype) != expected[key]:
      raise ValueError(f"{path!r}[{key!r}] declares {_describe(shape, dtype)}, expected "
                       f"{_describe(*expected[key])}")
  missing = [k for k in expected if k not in declared]
  if missing:
    raise ValueError(f"{path!r}: missing key {missing[0]!r}"
                     f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                     f"expected {_describe(*expected[missing[0]])}")
  total = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in declared.values())
  available = resources.available_host_bytes()
  if available is not None and total > available:
    raise resources.InsufficientMemory(
        "gradients", f"gradients {path!r} declares ~{total / resources.GiB:.2g} GiB of arrays, "
                     f"more than the {available / resources.GiB:.1f} GiB of host memory available")


def _npz_declared(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  headers: dict[str, ArrayHeader] = npz_headers(path)
  # A byte order other than the machine's is a different dtype ('>f4' is not float32 here).
  return {key: (h.shape, h.dtype.name if h.dtype.isnative else h.dtype.str)
          for key, h in headers.items()}


def _safetensors_declared(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  from safetensors import safe_open

  try:
    with safe_open(path, framework="numpy") as f:  # parses the header only
      declared = {}
      for key in f.keys():
        view = f.get_slice(key)
        dtype = view.get_dtype()
        declared[key] = (tuple(int(n) for n in view.get_shape()),
                         SAFETENSORS_DTYPES.get(dtype, dtype.lower()))
  except Exception as e:  # missing file, corrupt header: safetensors' own error types
    raise ValueError(f"cannot load {path!r}: {e}") from None
  return declared


def load_update(path: str, params: Params) -> Grads:
  """Reads a captured update and validates names, shapes, dtypes and finiteness against params;
  names, shapes, dtypes and the total size are checked from the file's headers before any array
  is read (ValueError naming the file and the key)."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    check_declared(path, _npz_declared(path), params)
    flat = load_npz(path)  # allow_pickle=False: pickled payloads are refused
  elif ext == ".safetensors":
    from safetensors.numpy import load_file

    check_declared(path, _safetensors_declared(path), params)
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
