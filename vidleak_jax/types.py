"""Shared type aliases. Videos are float32 [N, T, H, W, C] in [0, 1] everywhere inside the engine."""

from __future__ import annotations

from typing import Any, Callable

import jax

Array = jax.Array
PRNGKey = jax.Array
Clip = jax.Array  # float32[N, T, H, W, C] in [0, 1]
Labels = jax.Array  # int32[N]
Params = Any  # pytree of arrays (nested dict), as returned by `vl.models.pure`
Grads = Any  # pytree with the structure of Params
ClipShape = tuple[int, int, int, int, int]  # (B, T, H, W, C)
ApplyFn = Callable[[Params, Clip], Array]  # (params, clips[B,T,H,W,C]) -> logits[B, K]
