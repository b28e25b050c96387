"""Turn a Flax NNX module into a pure `(apply_fn, params)` pair."""

from __future__ import annotations

import jax
from flax import nnx

from vidleak_jax.inputs import check_floating
from vidleak_jax.types import ApplyFn, Params


def pure(module: nnx.Module) -> tuple[ApplyFn, Params]:
  """Split `module` into `apply_fn(params, clips[B,T,H,W,C]) -> logits[B,K]` and a params dict.

  `params` is a plain nested dict of arrays (the module's `nnx.Param`s); everything else in the
  module (buffers, static config) is closed over. `apply_fn` is pure, so it composes with
  `jax.jit`, `jax.vmap` and `jax.grad` (w.r.t. params or clips, including grad-of-grad). Inputs
  must be floating (uint8 video: scale to float32 in [0, 1] first); a ValueError says so.
  """
  graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(param_state)

  def apply_fn(params: Params, clips: jax.Array) -> jax.Array:
    check_floating(clips, "clips")  # static: free under jit
    state = jax.tree.map(lambda x: x, param_state)  # fresh copy: never mutate the template
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)(clips)

  return apply_fn, params
