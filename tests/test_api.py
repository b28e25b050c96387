"""The public API is documented and typed (after dm_pix's api test).

Public names: a module's `__all__` where it defines one, else the functions and classes defined
in it whose names do not start with "_". Every public module, class and function has a docstring
of its own (a dataclass's generated signature does not count); every public function annotates
each parameter and its return. Constants (registries, tuples, numbers) cannot carry docstrings
and are not checked. Nothing here runs JAX.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import types
from typing import Any, Iterator

import pytest

import vidleak_jax

MODULES = ("vidleak_jax", "vidleak_jax.attack", "vidleak_jax.data", "vidleak_jax.fl",
           "vidleak_jax.metrics", "vidleak_jax.models", "vidleak_jax.inputs",
           "vidleak_jax.pipeline", "vidleak_jax.settings")
PACKAGE_DIR = pathlib.Path(vidleak_jax.__file__).resolve().parent


def public_names(module: types.ModuleType) -> list[str]:
  """`__all__`, else the non-underscore functions and classes defined in `module` itself."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return sorted(name for name, obj in vars(module).items()
                if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                and getattr(obj, "__module__", None) == module.__name__)


def _where(obj: Any, fallback: str) -> str:
  """'vidleak_jax/x.py:name' of the definition (a re-export is blamed on where it is defined)."""
  target = inspect.unwrap(obj) if callable(obj) else obj
  try:
    path = pathlib.Path(inspect.getsourcefile(target)).resolve()
    return f"{path.relative_to(PACKAGE_DIR.parent)}:{getattr(target, '__qualname__', fallback)}"
  except (TypeError, ValueError):
    return fallback


def _own_doc(obj: Any) -> str:
  """The docstring written for `obj` itself: none inherited, no dataclass-generated signature."""
  doc = (vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)) or ""
  if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):  # dataclasses' placeholder
    return ""
  return doc.strip()


def _is_function(obj: Any) -> bool:
  """Plain and wrapped functions (functools.wraps, jax.jit): whatever `inspect.unwrap` opens."""
  return inspect.isfunction(inspect.unwrap(obj)) if callable(obj) and not inspect.isclass(obj) \
      else False


def _missing_hints(fn: Any) -> list[str]:
  signature = inspect.signature(inspect.unwrap(fn))
  missing = [name for name, p in signature.parameters.items()
             if p.annotation is inspect.Parameter.empty]
  if signature.return_annotation is inspect.Signature.empty:
    missing.append("return")
  return missing


def api_problems() -> Iterator[tuple[str, str]]:
  """(file:name, problem) for every public name lacking a docstring or type hints."""
  seen: set[int] = set()
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    if not _own_doc(module):
      yield f"{module_name} (module)", "no docstring"
    for name in public_names(module):
      obj = getattr(module, name)
      if id(obj) in seen:
        continue
      seen.add(id(obj))
      where = _where(obj, f"{module_name}.{name}")
      if inspect.ismodule(obj):
        if not _own_doc(obj):
          yield f"{obj.__name__} (module)", "no docstring"
      elif inspect.isclass(obj):
        if not _own_doc(obj):
          yield where, "no docstring"
      elif _is_function(obj):
        if not _own_doc(inspect.unwrap(obj)):
          yield where, "no docstring"
        if missing := _missing_hints(obj):
          yield where, f"no type hints for {', '.join(missing)}"


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_exist(module_name):
  module = importlib.import_module(module_name)
  assert public_names(module), module_name
  for name in public_names(module):
    assert hasattr(module, name), f"{module_name}.__all__ lists {name!r}, which is not defined"


def test_public_api_is_documented_and_typed():
  problems = sorted(set(api_problems()))
  assert not problems, "\n".join(f"{where}: {what}" for where, what in problems)
