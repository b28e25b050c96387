"""Tests for video file reading and writing through ffmpeg."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest

from vidleak_jax.data import VideoDecodeError, read_frames, read_frames_at, video_info, write_video

T, H, W = 20, 24, 32


def _smooth(frames: int = T, height: int = H, width: int = W) -> np.ndarray:
  """A smooth moving colour pattern, float32[T, H, W, 3] in [0.1, 0.9]."""
  y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
  t = np.arange(frames)[:, None, None] / np.float32(frames)
  chans = [np.sin(2 * np.pi * (x + t)), np.cos(2 * np.pi * (y - t)),
           np.sin(2 * np.pi * (x + y)) * np.ones_like(t)]
  return (0.5 + 0.4 * np.stack(chans, axis=-1)).astype(np.float32)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (T, H - 1, W + 1, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mkv(tmp_path_factory, noise) -> str:
  path = str(tmp_path_factory.mktemp("video") / "noise.mkv")
  write_video(path, noise, fps=10.0)
  return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("video") / "smooth.mp4")
  write_video(path, _smooth(), fps=12.0)
  return path


@pytest.mark.parametrize("ext", [".mkv", ".avi"])
def test_lossless_round_trip_is_bit_exact(tmp_path, noise, ext):
  path = tmp_path / f"v{ext}"
  write_video(path, noise)
  back = read_frames(path)
  assert back.dtype == np.uint8 and back.shape == noise.shape
  np.testing.assert_array_equal(back, noise)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_grayscale_and_float_input(tmp_path):
  gray = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 1), dtype=np.uint8)
  write_video(tmp_path / "g.mkv", gray)
  np.testing.assert_array_equal(read_frames(tmp_path / "g.mkv"), np.repeat(gray, 3, axis=-1))
  write_video(tmp_path / "f.mkv", gray.astype(np.float32) / 255.0)
  np.testing.assert_array_equal(read_frames(tmp_path / "f.mkv"), np.repeat(gray, 3, axis=-1))


@pytest.mark.parametrize("start,stride,count", [(0, 1, 5), (3, 2, 6), (1, 4, None), (19, 1, 1),
                                                (5, 3, None), (0, 7, 3)])
def test_selection_equals_slicing(mkv, noise, start, stride, count):
  got = read_frames(mkv, start=start, stride=stride, count=count)
  want = noise[start::stride] if count is None else noise[start::stride][:count]
  np.testing.assert_array_equal(got, want)


def test_read_frames_at_any_order(mkv, noise):
  idx = [17, 2, 2, 9, 0]
  np.testing.assert_array_equal(read_frames_at(mkv, idx), noise[idx])
  assert read_frames_at(mkv, []).shape == (0, H - 1, W + 1, 3)


def test_read_frames_at_many_scattered_indices(tmp_path):
  frames = np.random.default_rng(1).integers(0, 256, (240, 6, 8, 3), dtype=np.uint8)
  path = str(tmp_path / "long.mkv")
  write_video(path, frames)
  idx = np.r_[np.arange(0, 240, 2), [7, 9, 11, 13]]  # 124 distinct frames in scattered runs
  np.testing.assert_array_equal(read_frames_at(path, idx), frames[idx])


def test_count_zero_is_empty(mkv):
  assert read_frames(mkv, count=0).shape == (0, H - 1, W + 1, 3)


def test_mp4_is_approximately_equal(mp4):
  back = read_frames(mp4).astype(np.float64) / 255.0
  assert back.shape == (T, H, W, 3)
  mse = np.mean((back - _smooth()) ** 2)
  assert 10 * np.log10(1.0 / mse) > 30.0


def test_mp4_odd_size_is_padded_to_even(tmp_path):
  frames = _smooth(4, 11, 13)
  write_video(tmp_path / "odd.mp4", frames)
  back = read_frames(tmp_path / "odd.mp4")
  assert back.shape == (4, 12, 14, 3)


def test_gif_writes(tmp_path):
  frames = _smooth(6)
  write_video(tmp_path / "v.gif", frames, fps=5.0)
  back = iio.imread(tmp_path / "v.gif", index=None, plugin="pillow")
  assert back.shape[:3] == (6, H, W)
  assert np.abs(back[..., :3] / 255.0 - frames).mean() < 0.05


def test_video_info_counts(mkv, mp4):
  info = video_info(mkv)
  assert (info.num_frames, info.height, info.width) == (T, H - 1, W + 1)
  assert info.fps == pytest.approx(10.0) and info.path == mkv
  info = video_info(mp4)
  assert (info.num_frames, info.height, info.width) == (T, H, W)
  assert info.fps == pytest.approx(12.0)


def _assert_names_file(excinfo, path) -> None:
  assert os.fspath(path) in str(excinfo.value)


def test_missing_file(tmp_path):
  path = tmp_path / "missing.mp4"
  for fn in (read_frames, video_info):
    with pytest.raises(VideoDecodeError) as excinfo:
      fn(path)
    _assert_names_file(excinfo, path)


def test_corrupt_file(tmp_path):
  path = tmp_path / "random.mp4"
  path.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  for fn in (read_frames, video_info):
    with pytest.raises(VideoDecodeError) as excinfo:
      fn(path)
    _assert_names_file(excinfo, path)


def test_truncated_file(tmp_path, mp4):
  data = open(mp4, "rb").read()
  path = tmp_path / "half.mp4"
  path.write_bytes(data[:len(data) // 2])
  for fn in (read_frames, video_info):
    with pytest.raises(VideoDecodeError) as excinfo:
      fn(path)
    _assert_names_file(excinfo, path)


def test_too_few_frames(mkv):
  with pytest.raises(VideoDecodeError, match=r"has 20 frames; frames 10\.\.30 step 2") as e:
    read_frames(mkv, start=10, stride=2, count=11)
  _assert_names_file(e, mkv)
  with pytest.raises(VideoDecodeError, match="has 20 frames"):
    read_frames(mkv, start=20)
  with pytest.raises(VideoDecodeError, match="has 20 frames"):
    read_frames_at(mkv, [3, 20])


def test_bad_arguments(mkv):
  with pytest.raises(ValueError, match="stride"):
    read_frames(mkv, stride=0)
  with pytest.raises(ValueError, match="start"):
    read_frames(mkv, start=-1)


def test_unknown_extension_leaves_no_file(tmp_path, noise):
  with pytest.raises(ValueError, match=r"\.mp4.*\.gif.*\.mkv.*\.avi"):
    write_video(tmp_path / "v.webm", noise)
  with pytest.raises(ValueError, match="channels|C in"):
    write_video(tmp_path / "v.mkv", noise[..., :2])
  assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, noise, monkeypatch):
  path = tmp_path / "v.mkv"
  write_video(path, noise[:2])
  monkeypatch.setattr("vidleak_jax.data.video_io._encode_args",
                      lambda *a: ["-f", "rawvideo", "-i", "-", "-c:v", "no_such_codec"])
  with pytest.raises(RuntimeError, match="v.mkv"):
    write_video(path, noise)
  assert [p.name for p in tmp_path.iterdir()] == ["v.mkv"]
  np.testing.assert_array_equal(read_frames(path), noise[:2])
