"""What a head's gradient cannot reveal: `invisible_input_shifts` against hand-built null spaces
and against the gradients themselves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
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


def test_null_spaces_match_hand_built_ones():
  errors = np.array([[1.0, -1.0], [2.0, -2.0], [0.0, 0.0]])  # rank 1: B = 3, H = 2
  kernel = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # D = 3, H = 2: Wᵀv = 0 at (1,1,-1)
  n, v = fa.invisible_input_shifts(errors, kernel)
  assert n.shape == (3, 2) and v.shape == (3, 1)
  np.testing.assert_allclose(errors.T @ n, 0.0, atol=1e-12)
  np.testing.assert_allclose(np.abs(v[:, 0]), np.ones(3) / np.sqrt(3), rtol=1e-12)
  # n spans exactly the complement of (1, 2, 0)/√5 in R³.
  np.testing.assert_allclose(n @ n.T, np.eye(3) - np.outer([1, 2, 0], [1, 2, 0]) / 5, atol=1e-12)
  with pytest.raises(ValueError, match=r"errors must be \[B,H\] and kernel \[D,H\]"):
    fa.invisible_input_shifts(errors, kernel.T)


def test_a_linear_head_at_as_many_clips_as_classes_shares_one_gradient_for_different_features():
  k = B
  head_apply, params, features, labels = _pooled_head("linear", k)
  errors = _output_errors(head_apply, params, features, labels, k)
  n, v = fa.invisible_input_shifts(errors, params["head"]["kernel"])
  assert n.shape == (B, 1) and v.shape == (D, D - k)
  shift = 2.0 * n[:, 0][:, None, None] * v[:, 0][None, None, :]  # the same in every frame
  other = features + jnp.asarray(shift, features.dtype)
  pooled = features.mean(axis=1)
  assert float(jnp.linalg.norm(other.mean(axis=1) - pooled) / jnp.linalg.norm(pooled)) > 0.3
  update = jax.jit(vl.fl.client_update, static_argnums=0)
  want, got = update(head_apply, params, features, labels), update(head_apply, params, other,
                                                                      labels)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_with_more_classes_than_clips_a_linear_heads_gradient_sees_every_shift():
  k = 2 * B
  head_apply, params, features, labels = _pooled_head("linear", k)
  errors = _output_errors(head_apply, params, features, labels, k)
  n, _ = fa.invisible_input_shifts(errors, params["head"]["kernel"])
  assert n.shape == (B, 0)
  assert np.linalg.matrix_rank(np.asarray(errors)) == B


def test_a_hidden_layer_as_wide_as_the_features_hides_no_direction():
  _, params, _, _ = _pooled_head("mlp1", B, hidden=2 * D)
  _, v = fa.invisible_input_shifts(np.ones((B, 2 * D)), params["fc1"]["kernel"])
  assert v.shape == (D, 0)
