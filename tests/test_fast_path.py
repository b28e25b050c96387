"""The fast candidate path (im2col convolutions, map/vmap batching) equals the plain vmapped objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax.models.layers import conv_im2col, conv_implementation


@pytest.mark.parametrize("kernel, strides", [((3, 3, 3), (1, 2, 2)), ((5, 5), (2, 2)),
                                             ((3, 3), (1, 1)), ((2, 4), (3, 1))])
def test_im2col_conv_equals_xla_conv(kernel, strides):
  keys = jax.random.split(jax.random.key(0), 3)
  spatial = (5, 9, 7)[-len(kernel):]
  x = jax.random.normal(keys[0], (2, *spatial, 3))
  w = jax.random.normal(keys[1], (*kernel, 3, 4))
  b = jax.random.normal(keys[2], (4,))
  expected = jax.lax.conv_general_dilated(
      x, w, strides, "SAME",
      dimension_numbers=("N" + "DHW"[-len(kernel):] + "C", "DHW"[-len(kernel):] + "IO",
                         "N" + "DHW"[-len(kernel):] + "C")) + b
  np.testing.assert_allclose(conv_im2col(x, w, b, strides), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_fast_path_equals_plain_vmapped_objective(victim_name, metric):
  apply_fn, params = tiny_victim(victim_name)
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  candidates = jax.random.uniform(jax.random.key(5), (3, *clips.shape))

  def value_and_grad(x):
    return jax.value_and_grad(
        lambda c: vl.attack.gradient_matching_loss(apply_fn, params, target, c, labels, metric))(x)

  plain = jax.jit(jax.vmap(value_and_grad))(candidates)  # "xla" convs, vmapped
  with conv_implementation("im2col"):  # the automatic choice on CPU: im2col + lax.map ...
    fast = [jax.jit(lambda c: jax.lax.map(value_and_grad, c))(candidates)]
    if metric == "cosine":  # ... and on accelerators: im2col + vmap
      fast.append(jax.jit(jax.vmap(value_and_grad))(candidates))
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
  with pytest.raises(KeyError, match="vmap"):
    vl.attack.AttackConfig(batching="pmap")
