"""Tests for vidleak_jax.report: frame grids, PNG/GIF writers and atomic file helpers."""

from __future__ import annotations

import json
import os
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from vidleak_jax import report


def _clips(b: int = 2, t: int = 3, h: int = 4, w: int = 5, c: int = 3, seed: int = 0):
  return np.random.default_rng(seed).random((b, t, h, w, c)).astype(np.float32)


def _palette_clips(b: int, t: int, h: int = 4, w: int = 4, seed: int = 0) -> np.ndarray:
  """float[B, T, H, W, 3] using only 8 pure colours, so GIF palettes are exact."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 2, size=(b, t, h, w, 3)).astype(np.float32)


def _tmp_files(directory) -> list[str]:
  return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_to_uint8_clips_rounds_and_keeps_channels():
  x = np.array([-0.5, 0.0, 0.5 / 255, 0.7 / 255, 0.5, 1.0, 2.0, np.nan], np.float32)
  np.testing.assert_array_equal(report.to_uint8(x), [0, 0, 0, 1, 128, 255, 255, 0])
  assert report.to_uint8(np.zeros((2, 3, 4, 4, 1))).shape == (2, 3, 4, 4, 1)


@pytest.mark.parametrize(
    "b,t,h,w,pad,scale", [(2, 3, 4, 5, 1, 1), (3, 2, 16, 16, 2, 4), (1, 1, 3, 3, 0, 3)])
def test_frame_grid_shape(b, t, h, w, pad, scale):
  grid = report.frame_grid(_clips(b, t, h, w), pad=pad, scale=scale)
  assert grid.dtype == np.uint8
  assert grid.shape == (b * h * scale + (b - 1) * pad, t * w * scale + (t - 1) * pad, 3)


def test_frame_grid_tiles_and_padding():
  clips, pad, scale = _clips(2, 3, 4, 5), 2, 3
  grid = report.frame_grid(clips, pad=pad, scale=scale, pad_value=7)
  th, tw = 4 * scale, 5 * scale
  for i in range(2):
    for j in range(3):
      tile = grid[i * (th + pad):i * (th + pad) + th, j * (tw + pad):j * (tw + pad) + tw]
      frame = report.to_uint8(clips[i, j])
      np.testing.assert_array_equal(tile, np.kron(frame, np.ones((scale, scale, 1), np.uint8)))
  np.testing.assert_array_equal(grid[th:th + pad], 7)  # Horizontal separator.
  np.testing.assert_array_equal(grid[:, tw:tw + pad], 7)  # Vertical separator.


def test_frame_grid_grayscale_expands_to_rgb_and_accepts_jax():
  import jax.numpy as jnp

  clips = _clips(1, 2, 3, 3, c=1)
  grid = report.frame_grid(jnp.asarray(clips), pad=0)
  assert grid.shape == (3, 6, 3)
  np.testing.assert_array_equal(grid[..., 0], grid[..., 2])
  np.testing.assert_array_equal(grid[:, :3, 1], report.to_uint8(clips[0, 0, ..., 0]))


def test_frame_grid_rejects_bad_input():
  with pytest.raises(ValueError):
    report.frame_grid(np.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError):
    report.frame_grid(np.zeros((1, 1, 4, 4, 2)))
  with pytest.raises(ValueError):
    report.frame_grid(_clips(), scale=0)


def test_png_round_trip(tmp_path):
  grid = report.frame_grid(_clips(2, 4, 16, 16), pad=1, scale=4)
  path = tmp_path / "sub" / "grid.png"
  report.save_png(path, grid)
  np.testing.assert_array_equal(iio.imread(path), grid)
  assert _tmp_files(path.parent) == []


def test_comparison_frames_layout():
  truth, recon = _clips(2, 3, 4, 4, seed=1), _clips(2, 3, 4, 4, seed=2)
  frames = report.comparison_frames(truth, recon, scale=2, pad=1)
  assert frames.shape == (3, 2 * 8 + 1, 2 * 8 + 1, 3)
  up = lambda x: report.upscale(report.to_uint8(x), 2)
  np.testing.assert_array_equal(frames[1, 9:17, :8], up(truth[1, 1]))
  np.testing.assert_array_equal(frames[2, :8, 9:], up(recon[0, 2]))
  with pytest.raises(ValueError, match="shape mismatch"):
    report.comparison_frames(truth, recon[:, :2])


def test_comparison_gif_animates_and_matches(tmp_path):
  b, t, h, w, scale = 2, 5, 4, 4, 3
  truth, recon = _palette_clips(b, t, h, w, seed=3), _palette_clips(b, t, h, w, seed=4)
  truth[1] = truth[1, :1]  # Clip 1 is static: exercises partial (delta) GIF frames.
  path = tmp_path / "cmp.gif"
  report.comparison_gif(path, truth, recon, scale=scale, fps=4)
  with Image.open(path) as im:
    assert im.n_frames == t
    assert im.info["loop"] == 0
    assert im.info["duration"] == 250
  frames = iio.imread(path, index=None)[..., :3]
  assert frames.shape == (t, b * h * scale + (b - 1) * 2, 2 * w * scale + 2, 3)
  expected = report.comparison_frames(truth, recon, scale=scale)
  np.testing.assert_array_equal(frames, expected)
  tile = report.upscale(report.to_uint8(truth[0, 0]), scale)
  np.testing.assert_array_equal(frames[0, :h * scale, :w * scale], tile)
  assert not np.array_equal(frames[0], frames[1])
  assert _tmp_files(tmp_path) == []


def test_comparison_gif_many_colours_within_tolerance(tmp_path):
  truth, recon = _clips(1, 3, 8, 8, c=1, seed=5), _clips(1, 3, 8, 8, c=1, seed=6)
  path = tmp_path / "gray.gif"
  report.comparison_gif(path, truth, recon, scale=2)
  frames = iio.imread(path, index=None)[..., :3].astype(np.int32)
  expected = report.comparison_frames(truth, recon, scale=2).astype(np.int32)
  assert frames.shape == expected.shape
  assert np.abs(frames - expected).max() <= 8


def test_write_json_content_and_nonfinite(tmp_path):
  path = tmp_path / "m.json"
  report.write_json(path, {
      "b": np.float32(0.5), "a": np.arange(3), "nan": float("nan"),
      "arr": np.array([1.0, np.inf, -np.inf]), "t": (np.int64(2), True, None),
  })
  text = path.read_text()
  assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
  assert json.loads(text) == {
      "a": [0, 1, 2], "arr": [1.0, None, None], "b": 0.5, "nan": None, "t": [2, True, None],
  }


def test_write_json_failure_keeps_previous_file(tmp_path):
  path = tmp_path / "m.json"
  report.write_json(path, {"ok": 1})
  before = path.read_bytes()
  with pytest.raises(TypeError):
    report.write_json(path, {"bad": object()})
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_write_failure_mid_write_cleans_temp(tmp_path, monkeypatch):
  path = tmp_path / "f.txt"
  report.write_text(path, "old")

  def boom(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", boom)
  with pytest.raises(OSError, match="disk full"):
    report.write_text(path, "new content")
  monkeypatch.undo()
  assert path.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_npz_round_trip_keeps_exact_path(tmp_path):
  path = tmp_path / "arrays.bin"
  a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int32)
  report.save_npz(path, a=a, b=b)
  assert sorted(os.listdir(tmp_path)) == ["arrays.bin"]
  out = report.load_npz(path)
  assert set(out) == {"a", "b"}
  np.testing.assert_array_equal(out["a"], a)
  assert out["b"].dtype == np.int32


def test_save_npz_rejects_object_arrays(tmp_path):
  with pytest.raises(ValueError, match="object"):
    report.save_npz(tmp_path / "x.npz", a=np.array([{"k": 1}], dtype=object))
  assert os.listdir(tmp_path) == []


def test_load_npz_rejects_pickled_object_array(tmp_path):
  path = tmp_path / "pickled.npz"
  np.savez(path, a=np.array([{"k": 1}, None], dtype=object))
  with pytest.raises(ValueError, match="pickled.npz"):
    report.load_npz(path)


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "npy", "pickle"])
def test_load_npz_rejects_bad_files(tmp_path, kind):
  path = tmp_path / f"{kind}.npz"
  if kind == "garbage":
    path.write_bytes(b"this is not an archive")
  elif kind == "truncated":
    report.save_npz(path, a=np.arange(1000))
    path.write_bytes(path.read_bytes()[:200])
  elif kind == "npy":
    with open(path, "wb") as f:
      np.save(f, np.arange(3))
  elif kind == "pickle":
    import pickle

    path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match=f"{kind}.npz"):
    report.load_npz(path)


def test_load_npz_rejects_corrupt_member(tmp_path):
  path = tmp_path / "crc.npz"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("a.npy", b"\x93NUMPY not really a header")
  with pytest.raises(ValueError, match="crc.npz"):
    report.load_npz(path)
