"""Tests for the raw-frame transforms (to_float, resize, crop, normalize, clip_starts, prepare)."""

from __future__ import annotations

import numpy as np
import pytest

from vidleak_jax.data import center_crop, clip_starts, normalize, prepare, resize, to_float


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (3, 12, 18, 3), dtype=np.uint8)


def test_to_float(frames):
  x = np.asarray(to_float(frames))
  assert x.dtype == np.float32 and x.shape == frames.shape
  np.testing.assert_allclose(x, frames / 255.0, rtol=1e-6)
  assert np.asarray(to_float(x)).dtype == np.float32
  with pytest.raises(ValueError, match="dtype"):
    to_float(frames.astype(np.int32))


def test_area_resize_is_block_mean(frames):
  x = frames.astype(np.float32) / 255.0
  got = np.asarray(resize(x, (4, 6)))
  want = x.reshape(3, 4, 3, 6, 3, 3).mean(axis=(2, 4))
  assert got.dtype == np.float32 and got.shape == (3, 4, 6, 3)
  np.testing.assert_allclose(got, want, atol=1e-6)
  batched = np.asarray(resize(x[None], (6, 9)))
  np.testing.assert_allclose(batched[0], x.reshape(3, 6, 2, 9, 2, 3).mean(axis=(2, 4)), atol=1e-6)


@pytest.mark.parametrize("method", ["area", "linear", "cubic", "lanczos3"])
def test_resize_methods_shapes(frames, method):
  x = frames.astype(np.float32) / 255.0
  for size in [(5, 7), (24, 36), 8]:
    out = np.asarray(resize(x, size, method=method))
    hw = (size, size) if isinstance(size, int) else size
    assert out.shape == (3, *hw, 3) and out.dtype == np.float32 and np.isfinite(out).all()
  constant = np.full((2, 10, 10, 3), 0.25, np.float32)  # every method preserves constants
  np.testing.assert_allclose(np.asarray(resize(constant, (7, 3), method=method)), 0.25, atol=1e-5)


def test_resize_rejects_unknown_method(frames):
  with pytest.raises(ValueError, match="nearest"):
    resize(frames, (4, 6), method="nearest")


def test_center_crop_indices():
  x = np.arange(2 * 7 * 10 * 1).reshape(2, 7, 10, 1)
  np.testing.assert_array_equal(np.asarray(center_crop(x, (3, 4))), x[:, 2:5, 3:7])
  np.testing.assert_array_equal(np.asarray(center_crop(x, (4, 5))), x[:, 1:5, 2:7])
  np.testing.assert_array_equal(np.asarray(center_crop(x, 7)), x[:, :, 1:8])
  with pytest.raises(ValueError, match="exceeds"):
    center_crop(x, (8, 4))


def test_normalize():
  x = np.ones((2, 3, 3, 3), np.float32) * np.array([0.5, 0.25, 1.0], np.float32)
  out = np.asarray(normalize(x, [0.5, 0.25, 0.5], [1.0, 0.5, 0.25]))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 2.0])


def test_clip_starts():
  np.testing.assert_array_equal(clip_starts(100, frames=8, stride=2), [0, 17, 34, 51, 68, 85])
  np.testing.assert_array_equal(clip_starts(100, frames=8, stride=2, num_clips=3), [0, 42, 85])
  np.testing.assert_array_equal(clip_starts(15, frames=8, stride=2), [0])
  np.testing.assert_array_equal(clip_starts(21, frames=8, stride=2, num_clips=1), [3])
  starts = clip_starts(64, frames=4, stride=1)
  assert starts.dtype == np.int64 and len(starts) == 16
  assert np.all(np.diff(starts) >= 4) and starts[-1] + 3 == 63  # disjoint, covers the video
  with pytest.raises(ValueError, match=r"num_frames=10.*frames=8.*stride=2"):
    clip_starts(10, frames=8, stride=2)
  with pytest.raises(ValueError, match="num_clips"):
    clip_starts(16, frames=8, stride=2, num_clips=3)


def test_prepare(frames):
  out = np.asarray(prepare(frames, crop=(12, 12), size=(6, 6)))
  assert out.shape == (3, 6, 6, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  want = (frames[:, :, 3:15].astype(np.float32) / 255.0).reshape(3, 6, 2, 6, 2, 3).mean((2, 4))
  np.testing.assert_allclose(out, want, atol=1e-6)
  plain = np.asarray(prepare(frames))
  assert plain.shape == frames.shape and plain.dtype == np.float32
  sharp = np.asarray(prepare(frames, size=(17, 23), method="lanczos3"))
  assert sharp.shape == (3, 17, 23, 3) and sharp.min() >= 0.0 and sharp.max() <= 1.0
