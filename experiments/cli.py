"""What the entry points share about absl flags (those that say nothing about an experiment) and
JAX's persistent compilation cache."""

from __future__ import annotations

import os

import jax
from absl import flags

# Flags of these modules describe the experiment; every other module's (absl, chex, orbax, ...)
# are housekeeping, and so are these experiments' flags.
EXPERIMENT_MODULES = ("experiments.", "__main__")
HOUSEKEEPING = frozenset({"compilation_cache_dir"})
# Programs that compile faster than this are not worth a cache entry (JAX's own setting, read from
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS when that is set).
MIN_COMPILE_TIME_S = 0.5


def housekeeping_flags(flag_values: flags.FlagValues = flags.FLAGS) -> frozenset[str]:
  """Names (and short names) of the flags registered by library modules, not by experiments,
  plus `HOUSEKEEPING`."""
  names = set(HOUSEKEEPING)
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if not module.startswith(EXPERIMENT_MODULES):
      names.update(n for f in module_flags for n in (f.name, f.short_name) if n)
  return frozenset(names)


def default_compilation_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/vidleak_jax/xla (~/.cache/...)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "vidleak_jax", "xla")


def enable_compilation_cache(path: str, *, flag: str = "compilation_cache_dir",
                             min_compile_time_s: float | None = None) -> str | None:
  """Keeps compiled programs in JAX's persistent cache at `path` ("" disables the cache); returns
  the absolute path (None when disabled). Call before anything is compiled: JAX opens its cache
  once, at the first compilation. `min_compile_time_s` is the least compile time worth an entry
  (default: $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, else `MIN_COMPILE_TIME_S`).
  ValueError naming --`flag` when `path` cannot hold the cache."""
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  problem = None
  if os.path.exists(path) and not os.path.isdir(path):
    problem = "it is a file, not a directory"
  else:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      problem = e.strerror or str(e)
    else:
      if not os.access(path, os.W_OK | os.X_OK):
        problem = "not writable"
  if problem:
    raise ValueError(f"--{flag}: cannot keep the compilation cache in {path}: {problem} (an "
                     "empty value disables the cache)")
  if min_compile_time_s is None:
    min_compile_time_s = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                                              MIN_COMPILE_TIME_S))
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  return path
