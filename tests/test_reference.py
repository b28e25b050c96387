"""Tests for attacker reference frames and the shipped real video clips."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vidleak_jax.data import (
    read_frames,
    reference_frames,
    reference_indices,
    same_scene_reference_frames,
    shipped_videos,
    video_info,
    write_video,
)

SPAN = dict(clip_start=10, clip_frames=4, stride=3)  # frames 10, 13, 16, 19


def test_indices_avoid_clip_span():
  for seed in range(5):
    idx = reference_indices(jax.random.key(seed), 40, **SPAN, k=12, margin=2)
    assert idx.dtype == np.int64 and idx.shape == (12,)
    assert np.all(np.diff(idx) > 0)  # sorted, distinct
    assert np.all((idx < 8) | (idx > 21)) and idx.min() >= 0 and idx.max() < 40


def test_indices_take_every_available_frame():
  idx = reference_indices(jax.random.key(0), 24, **SPAN, k=14)
  np.testing.assert_array_equal(idx, [*range(10), 20, 21, 22, 23])


def test_indices_deterministic_given_key():
  a = reference_indices(jax.random.key(3), 200, **SPAN, k=8)
  b = reference_indices(jax.random.key(3), 200, **SPAN, k=8)
  c = reference_indices(jax.random.key(4), 200, **SPAN, k=8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_indices_k_zero():
  idx = reference_indices(jax.random.key(0), 20, **SPAN, k=0)
  assert idx.shape == (0,) and idx.dtype == np.int64


def test_indices_too_few():
  with pytest.raises(ValueError, match=r"k=15.*only 14"):
    reference_indices(jax.random.key(0), 24, **SPAN, k=15)
  with pytest.raises(ValueError, match=r"k=3.*only 1 of 24.*\[1, 23\]"):
    reference_indices(jax.random.key(0), 24, **SPAN, k=3, margin=9)
  with pytest.raises(ValueError, match="do not fit"):
    reference_indices(jax.random.key(0), 19, **SPAN, k=1)


@pytest.fixture(scope="module")
def carphone() -> str:
  videos = shipped_videos()
  assert {"carphone_pristine", "bikes", "bigbuckbunny"} <= set(videos)
  return videos["carphone_pristine"]


def test_decodes_real_shipped_clip(carphone):
  frames = read_frames(carphone, start=30, stride=2, count=5)
  assert frames.dtype == np.uint8 and frames.shape == (5, 144, 176, 3)
  assert frames.std() > 20  # real image content, not a blank frame
  assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 1  # the camera moves
  info = video_info(carphone)
  assert (info.num_frames, info.height, info.width) == (120, 144, 176)
  assert info.fps == pytest.approx(29.97)


def test_reference_frames_from_shipped_clip(carphone):
  key = jax.random.key(0)
  ref = np.asarray(reference_frames(key, carphone, **SPAN, k=3, margin=4, size=(36, 44)))
  assert ref.shape == (3, 36, 44, 3) and ref.dtype == np.float32
  assert 0.0 <= ref.min() and ref.max() <= 1.0 and ref.std() > 0.05
  native = np.asarray(reference_frames(key, carphone, **SPAN, k=2))
  assert native.shape == (2, 144, 176, 3)
  idx = reference_indices(key, 120, **SPAN, k=2)
  np.testing.assert_allclose(native, read_frames(carphone)[idx] / 255.0, atol=1e-6)
  assert np.asarray(reference_frames(key, carphone, **SPAN, k=0, size=8)).shape == (0, 8, 8, 3)


def test_same_scene_reference_frames(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (5, 8, 12, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
  write_video(tmp_path / "a.mkv", a)
  write_video(tmp_path / "b.mkv", b)
  paths = [tmp_path / "a.mkv", tmp_path / "b.mkv"]
  ref = np.asarray(same_scene_reference_frames(jax.random.key(1), paths, 8))
  assert ref.shape == (8, 8, 12, 3) and ref.dtype == np.float32
  np.testing.assert_allclose(ref, np.concatenate([a, b]) / 255.0, atol=1e-6)  # k = all frames
  small = np.asarray(same_scene_reference_frames(jax.random.key(2), paths, 3, size=(4, 6)))
  assert small.shape == (3, 4, 6, 3)
  again = np.asarray(same_scene_reference_frames(jax.random.key(2), paths, 3, size=(4, 6)))
  np.testing.assert_array_equal(small, again)
  with pytest.raises(ValueError, match=r"k=9.*only 8"):
    same_scene_reference_frames(jax.random.key(0), paths, 9)
