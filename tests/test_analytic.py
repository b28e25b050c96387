"""Closed-form stage 1 (`attack.analytic`): exact recovery from a first dense layer at B = 1 and
of the clips some unit sees alone at B > 1, and what no attack can recover (`invisible_input_shifts`)
against hand-built null spaces and the gradients themselves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from vidleak_jax import pipeline, pretrain
from vidleak_jax.attack import analytic as an
from vidleak_jax.attack import features as fa
from vidleak_jax.models import heads

B, T, D = 4, 3, 8


def _pooled_head(name: str, num_classes: int, **kwargs):
  head = heads.create_head(name, jax.random.key(0), frames=T, dim=D, num_classes=num_classes,
                           **kwargs)
  _, head_apply, params = heads.feature_victim(lambda x: x, head)
  features = jax.nn.relu(jax.random.normal(jax.random.key(1), (B, T, D))) + 0.1
  labels = jnp.arange(B) % num_classes
  return head_apply, params, features, labels


def _output_errors(head_apply, params, features, labels, num_classes):
  """softmax − onehot [B,K]: the linear head's dL/dlogits up to the 1/B of the mean loss."""
  logits = head_apply(params, features)
  return jax.nn.softmax(logits) - jax.nn.one_hot(labels, num_classes)


def _update(head_apply, params, features, labels):
  return jax.jit(vl.fl.client_update, static_argnums=0)(head_apply, params, features, labels)


@pytest.mark.parametrize("name, pooling", [("linear", "mean"), ("mlp2", "flatten")])
def test_analytic_recovery_is_exact_for_a_dense_first_layer(name, pooling):
  head = heads.create_head(name, jax.random.key(1), frames=T, dim=D, num_classes=4,
                           pooling=pooling)
  _, head_apply, params = heads.feature_victim(lambda x: x, head)
  features = jax.nn.relu(jax.random.normal(jax.random.key(0), (1, T, D)))
  grads = _update(head_apply, params, features, jnp.asarray([2]))
  layer = "fc1" if head.depth else "head"
  recovered = np.asarray(an.features_from_input(an.analytic_first_layer(grads, layer), T, D,
                                                pooling))
  # Pooled heads reveal the time-mean of F (in every frame); flattened ones all of F.
  want = np.asarray(features.mean(axis=1, keepdims=True) if pooling == "mean" else features)
  np.testing.assert_allclose(recovered, np.broadcast_to(want, (1, T, D)), rtol=1e-4, atol=1e-5)
  # At B = 1 every unit sees the clip alone: the grouping finds the same input.
  isolated = an.isolated_inputs(grads, layer)
  assert isolated.shape == (1, recovered[0].size // (T if pooling == "mean" else 1))
  np.testing.assert_allclose(an.features_from_input(isolated, T, D, pooling), recovered,
                             rtol=1e-4, atol=1e-5)
  if pooling == "mean":
    errors = fa.feature_errors(recovered, features)
    temporal = np.linalg.norm(features - features.mean(axis=1, keepdims=True))
    assert errors["feature_rel_error"][0] == pytest.approx(
        float(temporal / np.linalg.norm(features)), rel=1e-4)


def test_analytic_recovery_refuses_a_zero_bias_gradient():
  grads = {"head": {"kernel": jnp.ones((D, 4)), "bias": jnp.zeros((4,))}}
  with pytest.raises(ValueError, match="bias gradient of 'head' is zero"):
    an.analytic_first_layer(grads, "head")
  with pytest.raises(ValueError, match="bias gradient of 'head' is zero"):
    an.isolated_inputs(grads, "head")
  with pytest.raises(KeyError, match="no gradient leaf 'fc1/kernel'"):
    an.analytic_first_layer(grads, "fc1")
  with pytest.raises(ValueError, match="min_units must be >= 1"):
    an.isolated_inputs(grads, "head", min_units=0)


def _units_seeing_one_clip(params, features) -> np.ndarray:
  """[B]: how many ReLU units of fc1 only clip b activates (from the forward pass alone)."""
  pooled = np.asarray(features.mean(axis=1), np.float64)
  active = pooled @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"]) > 0
  alone = active.sum(axis=0) == 1
  return np.array([int(np.sum(alone & active[b])) for b in range(len(pooled))])


def test_units_that_see_one_clip_alone_give_that_clip_exactly_at_b_4():
  head_apply, params, features, labels = _pooled_head("mlp1", 4, hidden=48)
  grads = _update(head_apply, params, features, labels)
  found = an.isolated_inputs(grads, "fc1")
  counts = _units_seeing_one_clip(params, features)
  assert len(found) == int(np.sum(counts >= 2)) >= 2, counts
  pooled = np.asarray(features.mean(axis=1))
  errors = np.linalg.norm(found[:, None] - pooled[None], axis=-1) / np.linalg.norm(pooled, axis=-1)
  nearest = errors.argmin(axis=1)
  assert len(set(nearest.tolist())) == len(found)  # one distinct clip each
  assert errors.min(axis=1).max() < 1e-4
  assert all(counts[b] >= 2 for b in nearest)
  # A softmax output layer at B > 1 sees every clip in every unit: nothing is isolated.
  head_apply, params, features, labels = _pooled_head("linear", 4)
  assert an.isolated_inputs(_update(head_apply, params, features, labels), "head").shape == (0, D)


@pytest.mark.parametrize("name, num_classes, rank", [("linear", 2 * B, B), ("mlp1", B, B),
                                                      ("linear", B, B - 1)])
def test_the_inputs_lie_in_the_span_of_the_first_layers_kernel_gradient(name, num_classes, rank):
  head_apply, params, features, labels = _pooled_head(name, num_classes)
  grads = _update(head_apply, params, features, labels)
  span = np.asarray(an.input_span(grads, "fc1" if name != "linear" else "head", B))
  assert span.shape == (D, rank)
  np.testing.assert_allclose(span.T @ span, np.eye(rank), atol=1e-5)
  pooled = np.asarray(features.mean(axis=1))
  outside = np.linalg.norm(pooled - pooled @ span @ span.T) / np.linalg.norm(pooled)
  if rank == B:
    assert outside < 1e-5
  else:  # a linear head at B = K: one direction of the batch is missing from the gradient
    assert outside > 1e-2


def test_first_layer_errors_are_the_per_clip_bias_gradients():
  head_apply, params, features, labels = _pooled_head("linear", 2 * B)
  errors = an.first_layer_errors(head_apply, params, features, labels, "head")
  want = _output_errors(head_apply, params, features, labels, 2 * B)  # one clip: no 1/B
  np.testing.assert_allclose(errors, want, rtol=1e-5, atol=1e-7)
  assert an.singular_value_ratio(errors) == pytest.approx(
      np.linalg.svd(np.asarray(want), compute_uv=False)[-1]
      / np.linalg.svd(np.asarray(want), compute_uv=False)[0], rel=1e-4)
  assert an.singular_value_ratio(np.diag([1.0, 2.0, 4.0])) == pytest.approx(0.25)
  assert an.singular_value_ratio(np.ones((3, 5))) < 1e-12  # rank 1: two directions invisible
  assert an.singular_value_ratio(np.ones((3, 2))) == 0.0  # fewer units than clips
  assert an.singular_value_ratio(np.zeros((2, 4))) == 0.0


def test_null_spaces_match_hand_built_ones():
  errors = np.array([[1.0, -1.0], [2.0, -2.0], [0.0, 0.0]])  # rank 1: B = 3, H = 2
  kernel = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # D = 3, H = 2: Wᵀv = 0 at (1,1,-1)
  n, v = an.invisible_input_shifts(errors, kernel)
  assert n.shape == (3, 2) and v.shape == (3, 1)
  np.testing.assert_allclose(errors.T @ n, 0.0, atol=1e-12)
  np.testing.assert_allclose(np.abs(v[:, 0]), np.ones(3) / np.sqrt(3), rtol=1e-12)
  # n spans exactly the complement of (1, 2, 0)/√5 in R³.
  np.testing.assert_allclose(n @ n.T, np.eye(3) - np.outer([1, 2, 0], [1, 2, 0]) / 5, atol=1e-12)
  with pytest.raises(ValueError, match=r"errors must be \[B,H\] and kernel \[D,H\]"):
    an.invisible_input_shifts(errors, kernel.T)


def test_a_linear_head_at_as_many_clips_as_classes_shares_one_gradient_for_different_features():
  k = B
  head_apply, params, features, labels = _pooled_head("linear", k)
  errors = _output_errors(head_apply, params, features, labels, k)
  n, v = an.invisible_input_shifts(errors, params["head"]["kernel"])
  assert n.shape == (B, 1) and v.shape == (D, D - k)
  shift = 2.0 * n[:, 0][:, None, None] * v[:, 0][None, None, :]  # the same in every frame
  other = features + jnp.asarray(shift, features.dtype)
  pooled = features.mean(axis=1)
  assert float(jnp.linalg.norm(other.mean(axis=1) - pooled) / jnp.linalg.norm(pooled)) > 0.3
  want, got = _update(head_apply, params, features, labels), _update(head_apply, params, other,
                                                                       labels)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_with_more_classes_than_clips_a_linear_heads_gradient_sees_every_shift():
  k = 2 * B
  head_apply, params, features, labels = _pooled_head("linear", k)
  errors = _output_errors(head_apply, params, features, labels, k)
  n, _ = an.invisible_input_shifts(errors, params["head"]["kernel"])
  assert n.shape == (B, 0)
  assert np.linalg.matrix_rank(np.asarray(errors)) == B


def test_a_hidden_layer_as_wide_as_the_features_hides_no_direction():
  _, params, _, _ = _pooled_head("mlp1", B, hidden=2 * D)
  _, v = an.invisible_input_shifts(np.ones((B, 2 * D)), params["fc1"]["kernel"])
  assert v.shape == (D, 0)


def test_closed_form_features_keep_the_start_of_clips_no_unit_isolates():
  head = heads.create_head("mlp1", jax.random.key(0), frames=T, dim=D, num_classes=4, hidden=48)
  head_apply, params, features, labels = _pooled_head("mlp1", 4, hidden=48)
  grads = _update(head_apply, params, features, labels)
  start = jnp.full((B, T, D), 7.0)
  found, count = an.closed_form_features(grads, head, start)
  assert found.shape == (B, T, D) and count == int(np.sum(_units_seeing_one_clip(params,
                                                                                  features) >= 2))
  np.testing.assert_array_equal(found[count:], start[count:])
  pooled = np.asarray(features.mean(axis=1))
  for row in np.asarray(found[:count]):
    assert np.min(np.linalg.norm(pooled - row[0], axis=1) / np.linalg.norm(pooled, axis=1)) < 1e-4
    np.testing.assert_array_equal(row, np.broadcast_to(row[0], (T, D)))  # the mean in every frame


@pytest.mark.slow
def test_the_subspace_attack_recovers_a_batch_through_the_pipeline(tmp_path):
  cfg = pipeline.RunConfig(
      workdir=str(tmp_path / "run"), pipeline="features", clip_shape=(2, 16, 16, 3),
      batch_size=2, num_classes=4, known_labels=True, quiet=True,
      features=pipeline.FeatureConfig(
          head="mlp1", head_kwargs={"hidden": 1024}, attack="subspace", pretrain_clips=4,
          pretrain=pretrain.PretrainConfig(steps=4, batch_size=2),
          inversion=fa.StageConfig(steps=2)))
  result = pipeline.run(cfg)
  assert 0 < result["first_layer_sv_ratio"] <= 1
  assert max(result["pooled_feature_rel_error"]) < 1e-3, result["pooled_feature_rel_error"]
