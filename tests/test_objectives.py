"""Gradient-matching objectives: zero at the truth, numpy reference, finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_objective_is_zero_at_the_true_clip(victim_name, metric):
  apply_fn, params = tiny_victim(victim_name)
  clips, labels = tiny_batch(2)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  loss = vl.attack.gradient_matching_loss(apply_fn, params, target, clips, labels, metric)
  assert abs(float(loss)) < 1e-6
  other, _ = tiny_batch(2, seed=5)
  other_loss = vl.attack.gradient_matching_loss(apply_fn, params, target, other, labels, metric)
  assert float(other_loss) > max(1e-5, 100 * abs(float(loss)))


def _numpy_reference(grads, target, metric, weights):
  g = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)]
  t = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(target)]
  if metric == "cosine":
    dot = sum(w * a @ b for a, b, w in zip(g, t, weights))
    na = np.sqrt(sum(w * a @ a for a, w in zip(g, weights)))
    nb = np.sqrt(sum(w * b @ b for b, w in zip(t, weights)))
    return 1.0 - dot / (na * nb)
  if metric == "l2":
    return sum(w * np.sum((a - b) ** 2) for a, b, w in zip(g, t, weights))
  return sum(w * np.sum(np.abs(a - b)) for a, b, w in zip(g, t, weights))


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
@pytest.mark.parametrize("layer_weights", [None, {"conv1": 4.0, "head/bias": 0.5}])
def test_objective_matches_numpy_formula(metric, layer_weights):
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  guess = jax.random.uniform(jax.random.key(7), clips.shape)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  loss = vl.attack.gradient_matching_loss(apply_fn, params, target, guess, labels, metric,
                                          layer_weights=layer_weights)
  grads = vl.fl.client_update(apply_fn, params, guess, labels)
  paths = vl.attack.objectives.leaf_paths(params)
  weights = [1.0] * len(paths)
  if layer_weights:
    weights = [4.0 if p.startswith("conv1/") else 0.5 if p == "head/bias" else 1.0 for p in paths]
  np.testing.assert_allclose(float(loss), _numpy_reference(grads, target, metric, weights),
                             rtol=1e-3)


def test_unknown_layer_weight_prefix_is_an_error():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  with pytest.raises(ValueError, match="conv9"):
    vl.attack.gradient_matching_loss(apply_fn, params, target, clips, labels,
                                     layer_weights={"conv9": 1.0})


def test_unknown_metric_lists_valid_names():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  with pytest.raises(KeyError, match="cosine"):
    vl.attack.gradient_matching_loss(apply_fn, params, target, clips, labels, "cosin")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_gradient_wrt_clips_matches_central_differences(victim_name, metric):
  apply_fn, params = tiny_victim(victim_name)
  clips, labels = tiny_batch(1)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    clips = clips.astype(jnp.float64)
    target = vl.fl.client_update(apply_fn, params, clips, labels)
    guess = jnp.clip(clips + 0.2 * jax.random.normal(jax.random.key(3), clips.shape), 0, 1)
    loss = jax.jit(lambda x: vl.attack.gradient_matching_loss(apply_fn, params, target, x,
                                                              labels, metric))
    grad = jax.grad(loss)(guess)
    for i in range(3):
      direction = jax.random.normal(jax.random.key(10 + i), clips.shape, jnp.float64)
      h = 1e-4
      numeric = (loss(guess + h * direction) - loss(guess - h * direction)) / (2 * h)
      analytic = jnp.vdot(grad, direction)
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, atol=1e-10)


def test_objective_vmaps_over_candidates():
  apply_fn, params = tiny_victim("frame_cnn")
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  candidates = jax.random.uniform(jax.random.key(4), (3, *clips.shape))
  loss = lambda x: vl.attack.gradient_matching_loss(apply_fn, params, target, x, labels)
  batched = jax.jit(jax.vmap(loss))(candidates)
  single = jnp.stack([loss(c) for c in candidates])
  np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
