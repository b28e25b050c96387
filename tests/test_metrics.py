"""Tests for vidleak_jax.metrics against independent numpy references."""

from __future__ import annotations

import json

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from vidleak_jax import metrics

# Jitted handles, as callers use them (eager dm_pix.ssim is slow op-by-op); also checks jittability.
ssim_per_frame = jax.jit(metrics.ssim_per_frame)
ssim = jax.jit(metrics.ssim)


def _clips(seed: int, shape=(2, 3, 8, 8, 3)) -> np.ndarray:
  """Random float32 clips in [0, 1]."""
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _noisy(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
  """x plus gaussian noise, clipped to [0, 1]."""
  noise = np.random.default_rng(seed).normal(scale=sigma, size=x.shape)
  return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


def _np_ssim(a: np.ndarray, b: np.ndarray, size: int, sigma: float = 1.5) -> float:
  """Reference SSIM (Wang et al. 2004) of two [H, W, C] frames with a valid separable gaussian window."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  g /= g.sum()

  def blur(z):
    z = sliding_window_view(z, size, axis=0) @ g
    return sliding_window_view(z, size, axis=1) @ g

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a ** 2
  var_b = blur(b * b) - mu_b ** 2
  cov = blur(a * b) - mu_a * mu_b
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
  return float(np.mean(num / den))


def test_psnr_matches_numpy_formula():
  x, y = _clips(0), _clips(1)
  ref_frames = 10 * np.log10(1.0 / np.mean((x.astype(np.float64) - y) ** 2, axis=(2, 3, 4)))
  got_frames = np.asarray(metrics.psnr_per_frame(x, y))
  assert got_frames.shape == (2, 3)
  np.testing.assert_allclose(got_frames, ref_frames, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), ref_frames.mean(axis=1), rtol=1e-5)


def test_psnr_data_range_and_identical_frames():
  x, y = _clips(2), _clips(3)
  np.testing.assert_allclose(
      np.asarray(metrics.psnr_per_frame(255 * x, 255 * y, data_range=255.0)),
      np.asarray(metrics.psnr_per_frame(x, y)), rtol=1e-5)
  same = np.asarray(metrics.psnr_per_frame(x, x))
  assert np.all(np.isfinite(same))
  np.testing.assert_allclose(same, 100.0)


def test_mse_matches_numpy():
  x, y = _clips(4), _clips(5)
  ref = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3, 4))
  np.testing.assert_allclose(np.asarray(metrics.mse(x, y)), ref, rtol=1e-5)


def test_ssim_identical_is_one_and_decreases_with_noise():
  x = _clips(6)
  np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, atol=1e-5)
  scores = [float(ssim(x, _noisy(x, s)).mean()) for s in (0.02, 0.1, 0.3)]
  assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_matches_dm_pix_default_on_16x16():
  x = _clips(7, (2, 2, 16, 16, 3))
  y = _noisy(x, 0.1, seed=1)
  with jax.numpy_dtype_promotion("standard"):  # dm_pix itself mixes int32 and float scalars
    ref = jax.jit(dm_pix.ssim)(x.reshape(4, 16, 16, 3), y.reshape(4, 16, 16, 3))
  ref = np.asarray(ref).reshape(2, 2)
  np.testing.assert_allclose(np.asarray(ssim_per_frame(x, y)), ref, rtol=1e-6)


@pytest.mark.parametrize("hw,size", [((16, 16), 11), ((8, 8), 7), ((6, 10), 5)])
def test_ssim_matches_numpy_reference(hw, size):
  assert metrics.ssim_filter_size(*hw) == size
  x = _clips(8, (1, 2) + hw + (2,))
  y = _noisy(x, 0.15, seed=2)
  ref = np.array([[_np_ssim(x[0, t], y[0, t], size) for t in range(2)]])
  np.testing.assert_allclose(np.asarray(ssim_per_frame(x, y)), ref, atol=1e-4)


def test_match_recovers_known_permutation():
  true = _clips(9, (3, 2, 8, 8, 3))
  perm = np.array([2, 0, 1])
  rec = np.empty_like(true)
  rec[perm] = _noisy(true, 0.05, seed=3)  # rec[perm[i]] ~ true[i]
  got = metrics.match_to_ground_truth(rec, true)
  assert isinstance(got, np.ndarray) and np.issubdtype(got.dtype, np.integer)
  np.testing.assert_array_equal(got, perm)
  np.testing.assert_array_equal(metrics.match_to_ground_truth(true, true), np.arange(3))


def test_label_accuracy():
  acc = metrics.label_accuracy(jnp.array([1, 2, 3, 4]), jnp.array([1, 0, 3, 0]))
  assert acc.shape == () and float(acc) == pytest.approx(0.5)
  assert float(metrics.label_accuracy(np.array([7]), np.array([7]))) == 1.0


def test_evaluate_applies_permutation_and_is_json_serialisable():
  true = _clips(10, (3, 2, 8, 8, 3))
  perm = np.array([1, 2, 0])
  rec = np.empty_like(true)
  rec[perm] = _noisy(true, 0.05, seed=4)
  true_labels = np.array([5, 6, 7])
  rec_labels = np.empty_like(true_labels)
  rec_labels[perm] = true_labels

  out = metrics.evaluate(rec, true, rec_labels=rec_labels, true_labels=true_labels)
  json.loads(json.dumps(out))
  assert out["assignment"] == perm.tolist()
  assert out["label_accuracy"] == 1.0
  matched = rec[perm]
  np.testing.assert_allclose(out["psnr"], np.asarray(metrics.psnr(matched, true)), rtol=1e-5)
  np.testing.assert_allclose(out["ssim"], np.asarray(ssim(matched, true)), rtol=1e-5)
  np.testing.assert_allclose(out["mse"], np.asarray(metrics.mse(matched, true)), rtol=1e-5)
  assert np.array(out["psnr_per_frame"]).shape == (3, 2)
  assert np.array(out["ssim_per_frame"]).shape == (3, 2)
  assert out["psnr_mean"] == pytest.approx(np.mean(out["psnr"]))
  assert out["ssim_mean"] == pytest.approx(np.mean(out["ssim"]))

  raw = metrics.evaluate(rec, true, rec_labels=rec_labels, true_labels=true_labels, match=False)
  assert raw["assignment"] == [0, 1, 2]
  assert raw["label_accuracy"] == 0.0
  assert raw["psnr_mean"] < out["psnr_mean"]
  assert metrics.evaluate(rec, true)["label_accuracy"] is None


def test_bad_shapes_raise_with_argument_name():
  x = _clips(11)
  with pytest.raises(ValueError, match="x must be a 5-D"):
    metrics.psnr(x[0], x[0])
  with pytest.raises(ValueError, match=r"y must have the same shape as x.*\[B, T, H, W, C\]"):
    metrics.ssim(x, x[:, :2])
  with pytest.raises(ValueError, match="true_clips"):
    metrics.evaluate(x, x[:1])
  with pytest.raises(ValueError, match="rec_clips"):
    metrics.evaluate(x[0], x[0])
  with pytest.raises(ValueError, match="rec_labels"):
    metrics.evaluate(x, x, rec_labels=np.zeros(3), true_labels=np.zeros(2))
  with pytest.raises(ValueError, match="pred"):
    metrics.label_accuracy(np.zeros(2), np.zeros(3))
