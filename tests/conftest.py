"""Shared fixtures: tiny victims and a synthetic client batch."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

import jax
import pytest

import vidleak_jax as vl

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Many tests (and the entry points they start as subprocesses, which inherit the environment)
# compile the same tiny attacks: JAX's persistent cache compiles each program once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"vidleak_jax_tests_xla_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
VICTIM_NAMES = ("c3d", "frame_cnn", "cnn_rnn")
TINY = dict(frames=4, height=16, width=16, channels=3)


def run_main(*args: str, cwd: str = ROOT, env: dict | None = None, popen: bool = False,
                **popen_kwargs):
  """`python -m experiments.main *args` in a subprocess: the finished process (text output), or
  the running Popen when `popen`."""
  cmd = [sys.executable, "-m", "experiments.main", *args]
  if popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, **popen_kwargs)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                        check=False)


@functools.lru_cache(maxsize=None)
def tiny_victim(name: str, seed: int = 1, pooling: str | None = None):
  """(apply_fn, params) of victim `name` for 4×16×16×3 clips and 4 classes."""
  kwargs = {} if pooling is None else {"pooling": pooling}
  module = vl.models.create(name, jax.random.key(seed), num_classes=4, **TINY, **kwargs)
  return vl.models.pure(module)


@functools.lru_cache(maxsize=None)
def tiny_batch(batch_size: int = 1, seed: int = 0):
  """(clips [B,4,16,16,3], labels [B]) of synthetic video."""
  return vl.data.synthetic_clips(jax.random.key(seed), batch_size, num_classes=4, **TINY)


@pytest.fixture(params=VICTIM_NAMES)
def victim_name(request) -> str:
  return request.param
