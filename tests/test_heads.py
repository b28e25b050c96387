"""Feature classifiers: shapes, reference formulas, what each one sees of the feature matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidleak_jax.models import heads
from vidleak_jax.models.pure import pure

T, D, K = 4, 6, 3


def _features(seed: int = 0, batch: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, T, D))


@pytest.mark.parametrize("name", heads.SWEEP_ORDER)
def test_every_head_maps_features_to_logits(name):
  apply_fn, params = pure(heads.create_head(name, jax.random.key(1), frames=T, dim=D,
                                            num_classes=K))
  logits = jax.jit(apply_fn)(params, _features())
  assert logits.shape == (2, K) and bool(jnp.all(jnp.isfinite(logits)))
  assert "head/bias" in {"/".join(map(str, p)) for p in _paths(params)}
  with pytest.raises(ValueError, match=r"features must be \[N, T=4, D=6\]"):
    apply_fn(params, jnp.zeros((2, T, D + 1)))


def _paths(params):
  return [tuple(getattr(k, "key", k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_heads_grow_in_parameters_along_the_sweep_order():
  sizes = []
  for name in heads.SWEEP_ORDER:
    _, params = pure(heads.create_head(name, jax.random.key(1), frames=T, dim=D, num_classes=K))
    sizes.append(sum(int(np.size(p)) for p in jax.tree.leaves(params)))
  assert sizes == sorted(sizes), dict(zip(heads.SWEEP_ORDER, sizes))


def test_linear_and_mlp_heads_follow_the_numpy_formulas():
  features = np.asarray(_features())
  apply_fn, params = pure(heads.create_head("linear", jax.random.key(1), frames=T, dim=D,
                                            num_classes=K))
  want = features.mean(axis=1) @ np.asarray(params["head"]["kernel"]) + np.asarray(
      params["head"]["bias"])
  np.testing.assert_allclose(np.asarray(apply_fn(params, features)), want, rtol=1e-5, atol=1e-6)

  apply_fn, params = pure(heads.create_head("mlp1", jax.random.key(1), frames=T, dim=D,
                                            num_classes=K, pooling="flatten", hidden=5))
  x = features.reshape(2, T * D)
  hidden = np.maximum(x @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"]),
                      0)
  want = hidden @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(np.asarray(apply_fn(params, features)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, order_matters", [("linear", False), ("mlp2", False),
                                                 ("conv1d", True), ("gru", True),
                                                 ("transformer", True)])
def test_only_temporal_heads_see_the_frame_order(name, order_matters):
  apply_fn, params = pure(heads.create_head(name, jax.random.key(1), frames=T, dim=D,
                                            num_classes=K))
  features = _features()
  shuffled = features[:, ::-1]
  change = float(jnp.abs(apply_fn(params, features) - apply_fn(params, shuffled)).max())
  assert (change > 1e-4) == order_matters, change


def test_unknown_head_and_pooling_are_named():
  with pytest.raises(KeyError, match="valid: conv1d, gru, linear, mlp1, mlp2, mlp3, transformer"):
    heads.create_head("mlp9", jax.random.key(0), frames=T, dim=D, num_classes=K)
  with pytest.raises(KeyError, match="valid: mean, flatten"):
    heads.create_head("mlp1", jax.random.key(0), frames=T, dim=D, num_classes=K, pooling="max")
