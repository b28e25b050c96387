"""Background + residual parametrisation from reference frames, and the low-resolution attack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_victim
from vidleak_jax.attack.parametrize import make_parametrization
from vidleak_jax.data import sources

LBFGS = dict(optimizer="lbfgs", metric="l2", schedule="constant",
             priors={"tv_spatial": 1e-4, "tv_temporal": 1e-4})


def _camera_batch(num_references: int):
  """One synthetic clip of a static camera (4×16×16×3) and k reference frames of that camera."""
  spec = sources.ClipSpec(4, 16, 16, 3, 1)
  return sources.load_client_batch(jax.random.key(0), "synthetic", batch_size=1, spec=spec,
                                   num_classes=4, num_references=num_references)


def _attack(config, batch, references, steps=20):
  apply_fn, params = tiny_victim("frame_cnn")
  clips, labels = jnp.asarray(batch.clips), jnp.asarray(batch.labels)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(steps=steps, log_every=steps, **config)
  return vl.attack.reconstruct(jax.random.key(1), apply_fn, params, target,
                               clip_shape=clips.shape, labels=labels, config=config,
                               references=references)


@pytest.mark.slow
def test_background_residual_beats_no_reference_on_a_static_camera():
  batch = _camera_batch(3)
  truth = batch.clips
  plain = _attack(LBFGS, batch, None)
  prior = _attack(dict(LBFGS, param="background_residual", init="reference", residual_l1=1e-2,
                       residual_tv=1e-2), batch, batch.references)
  psnr_plain = float(vl.metrics.psnr(plain.clips, truth)[0])
  psnr_prior = float(vl.metrics.psnr(prior.clips, truth)[0])
  assert psnr_prior > psnr_plain + 5.0, (psnr_plain, psnr_prior)


def test_zero_references_leave_the_attack_unchanged():
  batch = _camera_batch(0)
  assert batch.references.shape == (0, 16, 16, 3)
  adam = dict(optimizer="signed_adam", lr=0.05)
  plain = _attack(adam, batch, None, steps=4)
  prior = _attack(dict(adam, param="background_residual", residual_l1=0.1, residual_tv=0.1),
                  batch, batch.references, steps=4)
  np.testing.assert_array_equal(np.asarray(plain.clips), np.asarray(prior.clips))
  np.testing.assert_array_equal(plain.history["loss"], prior.history["loss"])
  np.testing.assert_array_equal(plain.init_clips, prior.init_clips)


def test_background_residual_maps_and_penalty_follow_their_formulas():
  references = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
  config = vl.attack.AttackConfig(param="background_residual", residual_l1=0.3, residual_l2=0.2,
                                  residual_tv=0.1, attack_scale=2)
  param = make_parametrization((1, 2, 8, 8, 3), config, references)
  assert param.latent_shape == (1, 2, 4, 4, 3)
  residual = 0.2 * jax.random.normal(jax.random.key(1), (1, 2, 4, 4, 3))
  r = np.asarray(residual, np.float64)
  background = np.median(np.asarray(references), axis=0)
  background_low = background.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
  up = jax.image.resize(residual, (1, 2, 8, 8, 3), method="cubic")
  np.testing.assert_allclose(param.decode(residual), np.clip(background + np.asarray(up), 0, 1),
                             atol=1e-6)
  np.testing.assert_allclose(param.lowres(residual), np.clip(background_low + r, 0, 1), atol=1e-6)
  np.testing.assert_allclose(param.encode(param.lowres(residual)) + background_low,
                             np.clip(background_low + r, 0, 1), atol=1e-6)
  tv = (np.abs(np.diff(r, axis=2)).mean() + np.abs(np.diff(r, axis=3)).mean())
  expected = 0.3 * np.abs(r).mean() + 0.2 * np.square(r).mean() + 0.1 * tv
  np.testing.assert_allclose(float(param.penalty(residual)), expected, rtol=1e-5)
  projected = np.asarray(param.project(residual + 2.0))
  np.testing.assert_allclose(projected + background_low, 1.0, atol=1e-6)


@pytest.mark.slow
def test_low_resolution_attack_upsamples_candidates_bicubically():
  apply_fn, params = tiny_victim("frame_cnn")
  batch = _camera_batch(0)
  clips, labels = jnp.asarray(batch.clips), jnp.asarray(batch.labels)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(attack_scale=4, restarts=2)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  state = attack.init(jax.random.key(0))
  assert state.candidates.shape == (2, 1, 4, 4, 4, 3)
  expected = jnp.clip(jax.image.resize(state.candidates, (2, 1, 4, 16, 16, 3), "cubic"), 0, 1)
  np.testing.assert_array_equal(attack.decode(state.candidates), expected)
  grad = jax.grad(lambda x: attack.objective(x)[0])(state.candidates[0])
  assert grad.shape == (1, 4, 4, 4, 3) and np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_inputs_name_the_setting():
  with pytest.raises(ValueError, match="attack_scale"):
    vl.attack.AttackConfig(attack_scale=3)
  with pytest.raises(KeyError, match="background_residual"):
    vl.attack.AttackConfig(param="background")
  with pytest.raises(ValueError, match="residual_l1"):
    vl.attack.AttackConfig(residual_l1=-1.0)
  with pytest.raises(ValueError, match="attack_scale=4 must divide"):
    make_parametrization((1, 4, 18, 18, 3), vl.attack.AttackConfig(attack_scale=4))
  with pytest.raises(ValueError, match="needs references"):
    make_parametrization((1, 4, 16, 16, 3), vl.attack.AttackConfig(param="background_residual"))
