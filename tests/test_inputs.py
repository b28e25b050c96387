"""The library's entry points check their inputs: one clear ValueError naming the argument; valid
inputs give the same numbers, under jax.jit and jax.vmap too."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax import inputs
from vidleak_jax.tree_io import validate_target_grads

UINT8 = "scale uint8 video to float32 in [0, 1]"


def _victim(batch_size: int = 1):
  apply_fn, params = tiny_victim("frame_cnn")  # K = 4
  clips, labels = tiny_batch(batch_size)
  return apply_fn, params, clips, labels


def _reconstruct(apply_fn, params, target, clips, **kwargs):
  return vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                               clip_shape=clips.shape, **kwargs)


@pytest.mark.parametrize("labels, expected", [
    ([9], "labels must be class indices in [0, 4) (the model has 4 logits), got 9 at position 0"),
    ([-1], "labels must be class indices in [0, 4) (the model has 4 logits), got -1 at position 0"),
    ([[1]], "labels must be class indices of shape [B] = [1], got shape (1, 1)"),
    ([1, 2], "labels must be class indices of shape [B] = [1], got shape (2,)"),
    (np.asarray([1.0], np.float32), "labels must be integer class indices [B] = [1] or class "
                                    "probabilities [B, K] = [1, 4], got float32 of shape (1,)"),
    (np.asarray([True]), "labels must have an integer dtype (class indices in [0, K)), got bool"),
    (np.full((1, 4), 2.0, np.float32), "labels as class probabilities must lie in [0, 1]"),
])
def test_bad_labels_are_refused_by_every_entry_point(labels, expected):
  apply_fn, params, clips, good = _victim()
  target = vl.fl.client_update(apply_fn, params, clips, good)
  calls = {
      "client_update": lambda: vl.fl.client_update(apply_fn, params, clips, labels),
      "fedavg_update": lambda: vl.fl.fedavg_update(
          apply_fn, params, clips, labels, local=vl.fl.LocalTraining(epochs=2, lr=0.1)),
      "gradient_matching_loss": lambda: vl.attack.gradient_matching_loss(
          apply_fn, params, target, clips, labels),
      "reconstruct": lambda: _reconstruct(apply_fn, params, target, clips, labels=labels),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError, match=re.escape(expected)):
      call()
      pytest.fail(name)


def test_reconstruct_refuses_a_label_the_model_does_not_have():
  apply_fn, params, clips, labels = _victim()
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  with pytest.raises(ValueError, match=re.escape("labels must be class indices in [0, 4)")):
    _reconstruct(apply_fn, params, target, clips, labels=[7])


def test_static_label_checks_run_under_jit():
  apply_fn, params, clips, _ = _victim()
  update = jax.jit(vl.fl.client_update, static_argnums=0)
  with pytest.raises(ValueError, match=re.escape("labels must be class indices of shape [B] = [1]")):
    update(apply_fn, params, clips, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="labels must have an integer dtype"):
    update(apply_fn, params, clips, jnp.zeros((1,), bool))
  with pytest.raises(ValueError, match=re.escape(UINT8)):
    update(apply_fn, params, clips.astype(jnp.uint8), jnp.zeros((1,), jnp.int32))


def test_uint8_clips_are_refused_with_the_scaling_hint():
  apply_fn, params, clips, labels = _victim()
  raw = np.asarray(clips * 255, np.uint8)
  message = re.escape(f"clips must have a floating dtype (float32 video in [0, 1]), got uint8; "
                      f"{UINT8}")
  with pytest.raises(ValueError, match=message):
    vl.fl.client_update(apply_fn, params, raw, labels)
  with pytest.raises(ValueError, match=message):
    vl.fl.fedavg_update(apply_fn, params, raw, labels, local=vl.fl.LocalTraining(epochs=1, lr=0.1))
  with pytest.raises(ValueError, match="clips must have a floating dtype .*got int32$"):
    vl.fl.client_update(apply_fn, params, jnp.asarray(raw, jnp.int32), labels)


def test_clips_out_of_range_or_of_the_wrong_rank_are_refused():
  apply_fn, params, clips, labels = _victim()
  with pytest.raises(ValueError, match=re.escape("clips values must lie in [0, 1], got min")):
    vl.fl.client_update(apply_fn, params, clips * 255.0, labels)
  with pytest.raises(ValueError, match="clips values must lie in"):
    vl.fl.client_update(apply_fn, params, clips.at[0, 0, 0, 0, 0].set(jnp.nan), labels)
  with pytest.raises(ValueError, match=re.escape("clips must be a 5-D clip array [B, T, H, W, C]")):
    inputs.check_clips(clips[0])


@pytest.mark.parametrize("fn", [vl.metrics.psnr, vl.metrics.ssim, vl.metrics.mse,
                                vl.metrics.temporal_error, vl.metrics.evaluate])
def test_metrics_refuse_integer_clips(fn):
  _, _, clips, _ = _victim()
  raw = np.asarray(clips * 255, np.uint8)
  with pytest.raises(ValueError, match=re.escape(UINT8)):
    fn(raw, clips)
  with pytest.raises(ValueError, match="must have a floating dtype .*got int32$"):
    fn(clips, jnp.asarray(raw, jnp.int32))


def test_reconstruct_refuses_target_grads_of_another_dtype():
  apply_fn, params, clips, labels = _victim()
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  as_int = jax.tree.map(lambda g: g.astype(jnp.int32), target)
  with pytest.raises(ValueError, match=re.escape(
      "target_grads['encoder/conv1/bias'] has dtype int32, expected float32")):
    _reconstruct(apply_fn, params, as_int, clips, labels=labels)
  with pytest.raises(ValueError, match=re.escape(
      "target_grads['encoder/conv1/bias'] has dtype float64, expected float32")):
    _reconstruct(apply_fn, params, jax.tree.map(lambda g: np.asarray(g, np.float64), target),
                 clips)
  one = dict(target, head=dict(target["head"], kernel=np.asarray(target["head"]["kernel"],
                                                                 np.float64)))
  with pytest.raises(ValueError, match=re.escape(
      "target_grads['head/kernel'] has dtype float64, expected float32 (the dtype of the "
      "parameter params['head/kernel'])")):
    _reconstruct(apply_fn, params, one, clips)
  # The same static checks in the objective (which the engine calls inside jit).
  with pytest.raises(ValueError, match=re.escape("target_grads['head/kernel'] has dtype float64")):
    vl.attack.gradient_matching_loss(apply_fn, params, one, clips, labels)
  with pytest.raises(ValueError, match=re.escape("target_grads['encoder/conv1/bias'] has dtype")):
    jax.jit(lambda x: vl.attack.gradient_matching_loss(apply_fn, params, as_int, x, labels))(clips)


def test_valid_inputs_give_the_same_numbers_eagerly_under_jit_and_vmap():
  apply_fn, params, clips, labels = _victim(2)
  expected = jax.grad(lambda p: vl.fl.cross_entropy(apply_fn(p, clips), labels))(params)
  eager = vl.fl.client_update(apply_fn, params, clips, labels)
  jitted = jax.jit(vl.fl.client_update, static_argnums=0)(apply_fn, params, clips, labels)
  listed = vl.fl.client_update(apply_fn, params, np.asarray(clips), np.asarray(labels).tolist())
  for got in (eager, jitted, listed):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  soft = jax.nn.one_hot(labels, 4)
  for a, b in zip(jax.tree.leaves(vl.fl.client_update(apply_fn, params, clips, soft)),
                  jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # Per clip under vmap (labels and clips traced), and the objective vmapped over candidates.
  per_clip = jax.jit(jax.vmap(lambda c, y: vl.fl.client_update(apply_fn, params, c[None],
                                                               y[None])))(clips, labels)
  one = vl.fl.client_update(apply_fn, params, clips[1:], labels[1:])
  for a, b in zip(jax.tree.leaves(per_clip), jax.tree.leaves(one)):
    np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-7)
  candidates = jax.random.uniform(jax.random.key(4), (3, *clips.shape))
  loss = lambda x: vl.attack.gradient_matching_loss(apply_fn, params, eager, x, labels)
  batched = jax.jit(jax.vmap(loss))(candidates)
  np.testing.assert_allclose(batched, [loss(c) for c in candidates], rtol=1e-5, atol=1e-6)
  assert float(jax.jit(loss)(clips)) < 1e-5
  delta = jax.jit(vl.fl.fedavg_update, static_argnums=0, static_argnames="local")(
      apply_fn, params, clips, labels, local=vl.fl.LocalTraining(epochs=1, lr=0.5))
  for d, g in zip(jax.tree.leaves(delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(d, 0.5 * g, rtol=1e-4, atol=1e-7)
  validate_target_grads(params, eager)


def test_a_heads_feature_inputs_are_not_range_checked():
  from vidleak_jax.models import heads
  head = heads.create_head("linear", jax.random.key(1), frames=4, dim=8, num_classes=4)
  _, head_apply, params = heads.feature_victim(lambda x: x, head)
  features = 3.0 * jnp.ones((2, 4, 8))  # post-ReLU features are unbounded
  grads = vl.fl.client_update(head_apply, params, features, jnp.asarray([0, 3]))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match=re.escape("labels must be class indices in [0, 4)")):
    vl.fl.client_update(head_apply, params, features, jnp.asarray([0, 4]))


def test_a_model_whose_output_is_not_logits_is_named():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  grads = vl.fl.client_update(apply_fn, params, clips, labels)
  flat = lambda p, x: apply_fn(p, x).reshape(-1)  # [B*K], not [B, K]
  with pytest.raises(ValueError, match=r"apply_fn must map clips .* to float logits \[B, K\]"):
    vl.attack.reconstruct(jax.random.key(0), flat, params, grads, clip_shape=clips.shape,
                          labels=labels)
