"""Victim models, the pure bridge, and the federated client updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import TINY, tiny_batch, tiny_victim


def test_victims_map_clips_to_logits(victim_name):
  apply_fn, params = tiny_victim(victim_name)
  clips, _ = tiny_batch(3)
  logits = apply_fn(params, clips)
  assert logits.shape == (3, 4) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert "head" in params and params["head"]["bias"].shape == (4,)


def test_pure_apply_equals_the_module_call():
  module = vl.models.create("frame_cnn", jax.random.key(0), num_classes=4, **TINY)
  apply_fn, params = vl.models.pure(module)
  clips, _ = tiny_batch(2)
  np.testing.assert_allclose(apply_fn(params, clips), module(clips), rtol=1e-6)
  shifted = jax.tree.map(lambda p: p + 0.1, params)
  assert not np.allclose(apply_fn(shifted, clips), module(clips))  # params really are inputs


def test_preprocessing_resizes_and_normalises_inside_the_model():
  module = vl.models.create("c3d", jax.random.key(0), num_classes=4, input_size=(8, 8), **TINY)
  clips, _ = tiny_batch(1)
  assert module.preprocess(clips).shape == (1, 4, 8, 8, 3)
  flat = jnp.full((1, 4, 16, 16, 3), 0.485, jnp.float32)
  np.testing.assert_allclose(module.preprocess(flat)[..., 0], 0.0, atol=1e-6)


def test_wrong_clip_layout_names_the_expected_shape():
  apply_fn, params = tiny_victim("c3d")
  with pytest.raises(ValueError, match=r"T=4"):
    apply_fn(params, jnp.zeros((1, 5, 16, 16, 3)))
  with pytest.raises(KeyError, match="c3d"):
    vl.models.create("resnet", jax.random.key(0), num_classes=4, **TINY)


def test_frame_cnn_pooling_variants():
  for pooling in ("mean", "max", "concat"):
    apply_fn, params = tiny_victim("frame_cnn", pooling=pooling)
    assert apply_fn(params, tiny_batch(2)[0]).shape == (2, 4)
  # Mean pooling is blind to frame order; concatenation (late fusion) is not.
  clips = tiny_batch(1)[0]
  reversed_clips = clips[:, ::-1]
  mean_fn, mean_params = tiny_victim("frame_cnn", pooling="mean")
  np.testing.assert_allclose(mean_fn(mean_params, clips), mean_fn(mean_params, reversed_clips),
                             rtol=1e-5)
  cat_fn, cat_params = tiny_victim("frame_cnn", pooling="concat")
  assert not np.allclose(cat_fn(cat_params, clips), cat_fn(cat_params, reversed_clips))


def test_client_update_matches_finite_differences():
  apply_fn, params = tiny_victim("frame_cnn")
  clips, labels = tiny_batch(2)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    clips64 = clips.astype(jnp.float64)
    grads = vl.fl.client_update(apply_fn, params64, clips64, labels)
    loss = lambda p: vl.fl.cross_entropy(apply_fn(p, clips64), labels)
    for path in (("head", "kernel"), ("encoder", "conv1", "kernel")):
      leaf = params64
      for k in path:
        leaf = leaf[k]
      index = (0,) * leaf.ndim
      h = 1e-6

      def shifted(delta, path=path, index=index):
        def edit(tree, depth=0):
          if depth == len(path):
            return tree.at[index].add(delta)
          return {**tree, path[depth]: edit(tree[path[depth]], depth + 1)}
        return edit(params64)

      numeric = (loss(shifted(h)) - loss(shifted(-h))) / (2 * h)
      analytic = grads
      for k in path:
        analytic = analytic[k]
      np.testing.assert_allclose(float(analytic[index]), float(numeric), rtol=1e-5, atol=1e-9)


def test_fedavg_single_step_is_the_scaled_gradient():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  grads = vl.fl.client_update(apply_fn, params, clips, labels)
  delta = vl.fl.fedavg_update(apply_fn, params, clips, labels,
                              local=vl.fl.LocalTraining(epochs=1, lr=0.5))
  for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(delta)):
    np.testing.assert_allclose(d, 0.5 * g, rtol=1e-4, atol=1e-7)
