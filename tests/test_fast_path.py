"""The fast candidate path (convolutions rewritten as patches + matmuls, map/vmap batching) equals
the plain vmapped objective with XLA's convolutions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_fast_path_equals_plain_vmapped_objective(victim_name, metric):
  apply_fn, params = tiny_victim(victim_name)
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  candidates = jax.random.uniform(jax.random.key(5), (3, *clips.shape))

  def value_and_grad(conv):
    return jax.value_and_grad(lambda c: vl.attack.gradient_matching_loss(
        apply_fn, params, target, c, labels, metric, conv=conv))

  plain = jax.jit(jax.vmap(value_and_grad("xla")))(candidates)  # XLA's convs, vmapped
  # The automatic choice on CPU: rewritten convs + lax.map ...
  fast = [jax.jit(lambda c: jax.lax.map(value_and_grad("auto"), c))(candidates)]
  if metric == "cosine":  # ... and on accelerators: rewritten convs + vmap
    fast.append(jax.jit(jax.vmap(value_and_grad("im2col")))(candidates))
  for fast in fast:
    np.testing.assert_allclose(fast[0], plain[0], rtol=2e-4, atol=1e-6)
    scale = float(jnp.abs(plain[1]).max())
    np.testing.assert_allclose(fast[1], plain[1], rtol=2e-3, atol=2e-4 * scale)


def test_auto_choices_and_unknown_strategies():
  config = vl.attack.AttackConfig()
  assert config.batching == "auto" and config.conv == "auto"
  assert vl.attack.config.resolve_batching("auto") == (
      "map" if jax.default_backend() == "cpu" else "vmap")
  assert vl.attack.config.resolve_conv("auto") == "im2col"
  resolve_group = vl.attack.config.resolve_map_batch_size
  assert config.map_batch_size == 0  # auto: pairs of small clips, single large ones
  assert resolve_group(0, (1, 8, 32, 32, 3)) == 2 and resolve_group(0, (1, 16, 112, 112, 3)) == 1
  assert resolve_group(3, (1, 16, 112, 112, 3)) == 3
  with pytest.raises(KeyError, match="im2col"):
    vl.attack.AttackConfig(conv="winograd")
  clips, labels = tiny_batch(1)
  apply_fn, params = tiny_victim("c3d")
  with pytest.raises(KeyError, match="im2col"):
    vl.attack.gradient_matching_loss(apply_fn, params, params, clips, labels, conv="winograd")
  with pytest.raises(KeyError, match="vmap"):
    vl.attack.AttackConfig(batching="pmap")
