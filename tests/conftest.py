"""Shared fixtures: tiny victims and a synthetic client batch."""

from __future__ import annotations

import functools

import jax
import pytest

import vidleak_jax as vl

jax.config.update("jax_numpy_dtype_promotion", "strict")

VICTIM_NAMES = ("c3d", "frame_cnn", "cnn_rnn")
TINY = dict(frames=4, height=16, width=16, channels=3)


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
