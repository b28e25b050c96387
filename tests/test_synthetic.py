"""Tests for the synthetic surveillance-like clip generator."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vidleak_jax.data import class_directions, environment, synthetic_clips

# Compiled once per configuration: eager dispatch compiles each primitive separately (slow on CPU).
_clips = jax.jit(synthetic_clips, static_argnums=1, static_argnames=(
    "frames", "height", "width", "channels", "num_classes", "object_size"))
_env = jax.jit(environment, static_argnums=(1, 2, 3))

T, H, W, C, N = 6, 24, 24, 3, 32


@pytest.fixture(scope="module")
def batch():
  clips, labels = _clips(jax.random.key(0), N, frames=T, height=H, width=W, channels=C)
  return np.asarray(clips), np.asarray(labels)


@pytest.fixture(scope="module")
def explicit():
  bg = _env(jax.random.key(7), H, W, C)
  clips, labels = _clips(jax.random.key(1), N, frames=T, height=H, width=W, channels=C,
                         background=bg)
  return np.asarray(clips), np.asarray(labels), np.asarray(bg)


def _object_mask(clip: np.ndarray, bg: np.ndarray) -> np.ndarray:
  """Pixels where a clip [T, H, W, C] differs from the background: bool[T, H, W]."""
  return np.abs(clip - bg).max(axis=-1) > 1e-6


@pytest.mark.parametrize("frames,height,width,channels", [(3, 5, 9, 3), (2, 8, 6, 2)])
def test_shapes_dtypes_range(frames, height, width, channels):
  clips, labels = _clips(jax.random.key(3), 5, frames=frames, height=height, width=width,
                         channels=channels, num_classes=3)
  assert clips.shape == (5, frames, height, width, channels) and clips.dtype == np.float32
  assert labels.shape == (5,) and labels.dtype == np.int32
  clips = np.asarray(clips)
  assert np.all(np.isfinite(clips)) and clips.min() >= 0.0 and clips.max() <= 1.0
  assert np.all((np.asarray(labels) >= 0) & (np.asarray(labels) < 3))


def test_batch_shapes_and_range(batch):
  clips, labels = batch
  assert clips.shape == (N, T, H, W, C) and clips.dtype == np.float32
  assert labels.dtype == np.int32 and clips.min() >= 0.0 and clips.max() <= 1.0


def test_environment_textured_and_in_range():
  for shape in [(H, W, C), (5, 7, 1)]:
    env = np.asarray(_env(jax.random.key(2), *shape))
    assert env.shape == shape and env.dtype == np.float32
    assert env.min() >= 0.05 and env.max() <= 0.95
  env = np.asarray(_env(jax.random.key(2), H, W, C))
  assert env.std() > 0.03  # not flat
  assert np.abs(np.diff(env, axis=1)).mean() > 0.005  # local texture, not just a gradient
  assert len(np.unique(env)) > 0.5 * env.size
  np.testing.assert_array_equal(env, np.asarray(_env(jax.random.key(2), H, W, C)))
  assert not np.allclose(env, np.asarray(_env(jax.random.key(3), H, W, C)))


def test_deterministic_given_key(batch):
  clips, labels = batch
  again, again_labels = _clips(jax.random.key(0), N, frames=T, height=H, width=W, channels=C)
  np.testing.assert_array_equal(clips, np.asarray(again))
  np.testing.assert_array_equal(labels, np.asarray(again_labels))
  other, other_labels = _clips(jax.random.key(5), N, frames=T, height=H, width=W, channels=C)
  assert not np.allclose(clips, np.asarray(other))
  assert not np.array_equal(labels, np.asarray(other_labels))


def test_labels_uniform_range(batch):
  _, labels = batch
  assert labels.min() >= 0 and labels.max() < 4
  assert len(np.unique(labels)) > 1
  # Single-frame, single-channel, smallest supported frame size.
  clips, many = _clips(jax.random.key(9), 400, frames=1, height=4, width=4, channels=1)
  assert clips.shape == (400, 1, 4, 4, 1) and clips.dtype == np.float32
  clips, many = np.asarray(clips), np.asarray(many)
  assert clips.min() >= 0.0 and clips.max() <= 1.0 and many.dtype == np.int32
  counts = np.bincount(many, minlength=4)
  assert len(counts) == 4 and counts.min() > 60, counts  # roughly uniform: expected 100 each


def test_explicit_background_is_the_median(explicit):
  clips, _, bg = explicit
  median = np.median(clips.reshape(N * T, H, W, C), axis=0)
  equal = np.all(median == bg, axis=-1)
  assert equal.mean() > 0.95
  # Away from the object each frame shows the background exactly.
  masks = np.stack([_object_mask(c, bg) for c in clips])
  assert masks.mean() < 0.15 and masks.reshape(N * T, -1).any(axis=1).all()


def test_default_background_shared_within_call(batch):
  clips, _ = batch
  median_a = np.median(clips[: N // 2].reshape(-1, H, W, C), axis=0)
  median_b = np.median(clips[N // 2:].reshape(-1, H, W, C), axis=0)
  assert np.all(median_a == median_b, axis=-1).mean() > 0.95
  masks = np.stack([_object_mask(c, median_a) for c in clips])
  assert masks.reshape(N * T, -1).mean(axis=1).max() < 0.25  # only the object differs


def test_object_moves_in_label_direction(explicit):
  clips, labels, bg = explicit
  dirs = np.asarray(class_directions(4))
  np.testing.assert_allclose(dirs, [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)
  yy, xx = np.mgrid[:H, :W]
  for clip, label in zip(clips, labels):
    mask = _object_mask(clip, bg)
    areas = mask.reshape(T, -1).sum(axis=1)
    assert areas.min() > 0 and areas.min() > 0.7 * areas.max()  # stays (mostly) in frame
    cx = (mask * xx).reshape(T, -1).sum(axis=1) / areas
    cy = (mask * yy).reshape(T, -1).sum(axis=1) / areas
    disp = np.array([cx[-1] - cx[0], cy[-1] - cy[0]])
    assert np.linalg.norm(disp) > 2.0
    cos = disp @ dirs[label] / np.linalg.norm(disp)
    assert cos > np.cos(np.deg2rad(20)), (label, disp)
    # Constant velocity: the centroid track is linear in time up to pixel quantisation.
    t = np.arange(T)
    for track in (cx, cy):
      fit = np.polyval(np.polyfit(t, track, 1), t)
      assert np.abs(track - fit).max() < 0.75, track


def test_eight_directions_and_fixed_size():
  bg = _env(jax.random.key(4), 32, 32, 1)
  clips, labels = _clips(jax.random.key(6), 16, frames=4, height=32, width=32, channels=1,
                         num_classes=8, background=bg, object_size=6.0)
  clips, labels, bg = np.asarray(clips), np.asarray(labels), np.asarray(bg)
  dirs = np.asarray(class_directions(8))
  yy, xx = np.mgrid[:32, :32]
  for clip, label in zip(clips, labels):
    first, last = _object_mask(clip, bg)[[0, -1]]
    assert 16 <= first.sum() <= 64  # a 6-pixel square or disc with soft edges
    disp = np.array([(last * xx).sum() / last.sum() - (first * xx).sum() / first.sum(),
                     (last * yy).sum() / last.sum() - (first * yy).sum() / first.sum()])
    assert disp @ dirs[label] / np.linalg.norm(disp) > np.cos(np.deg2rad(15)), (label, disp)


def test_object_contrasts_with_background(explicit):
  clips, _, bg = explicit
  for clip in clips[:8]:
    mask = _object_mask(clip, bg)
    assert np.abs(clip - bg).max(axis=-1)[mask].mean() > 0.15


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_classes=1), "num_classes"),
    (dict(frames=0), "frames"),
    (dict(frames=2.5), "frames"),
    (dict(height=0), "height"),
    (dict(width=-3), "width"),
    (dict(channels=0), "channels"),
    (dict(object_size=0.0), "object_size"),
    (dict(object_size=100.0), "object_size"),
    (dict(background=np.zeros((8, 8, 1), np.float32)), "background"),
])
def test_bad_arguments_raise(kwargs, name):
  args = dict(frames=2, height=8, width=8, channels=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    synthetic_clips(jax.random.key(0), 2, **args)


def test_bad_num_clips_and_environment_args_raise():
  with pytest.raises(ValueError, match="num_clips"):
    synthetic_clips(jax.random.key(0), 0, frames=2, height=8, width=8)
  with pytest.raises(ValueError, match="height"):
    environment(jax.random.key(0), 0, 8, 3)
  with pytest.raises(ValueError, match="channels"):
    environment(jax.random.key(0), 8, 8, -1)
  with pytest.raises(ValueError, match="num_classes"):
    class_directions(1)
