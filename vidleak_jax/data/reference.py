"""Reference frames for the attacker: same camera or scene, never the attacked clip itself.

A surveillance attacker plausibly holds other footage of the same camera (e.g. frames recorded
before or after the victim's clip) or other videos of the same scene; these functions draw
such frames at random, deterministically given `key`.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidleak_jax.data.checks import check_int
from vidleak_jax.data.clips import Size, prepare
from vidleak_jax.data.video_io import read_frames_at, video_info
from vidleak_jax.io import PathLike
from vidleak_jax.types import Array, PRNGKey


def _draw(key: PRNGKey, n: int, k: int) -> np.ndarray:
  """k distinct sorted integers from [0, n), drawn uniformly: int64[k]."""
  if k == 0:
    return np.zeros(0, np.int64)
  picks = np.asarray(jax.random.choice(key, n, (k,), replace=False))
  return np.sort(picks).astype(np.int64)


def reference_indices(
    key: PRNGKey, num_frames: int, *, clip_start: int, clip_frames: int, stride: int, k: int,
    margin: int = 0,
) -> np.ndarray:
  """k sorted distinct frame indices outside the attacked clip's span: int64[k].

  The excluded span is [clip_start - margin, clip_start + (clip_frames - 1) * stride + margin]
  (inclusive, clamped to the video); the k indices are drawn uniformly without replacement
  from the remaining frames of the video. ValueError if fewer than k frames remain.
  """
  num_frames = check_int("num_frames", num_frames, 1)
  clip_start = check_int("clip_start", clip_start, 0)
  clip_frames = check_int("clip_frames", clip_frames, 1)
  stride = check_int("stride", stride, 1)
  k = check_int("k", k, 0)
  margin = check_int("margin", margin, 0)
  clip_end = clip_start + (clip_frames - 1) * stride
  if clip_end >= num_frames:
    raise ValueError(f"attacked clip frames {clip_start}..{clip_end} (clip_frames={clip_frames},"
                     f" stride={stride}) do not fit in a video of {num_frames} frames")
  lo, hi = clip_start - margin, clip_end + margin
  frames = np.arange(num_frames, dtype=np.int64)
  available = frames[(frames < lo) | (frames > hi)]
  if k > available.size:
    raise ValueError(f"k={k} reference frames requested but only {available.size} of "
                     f"{num_frames} frames lie outside the excluded span "
                     f"[{max(lo, 0)}, {min(hi, num_frames - 1)}]")
  return available[_draw(key, int(available.size), k)]


def reference_frames(
    key: PRNGKey, path: PathLike, *, clip_start: int, clip_frames: int, stride: int, k: int,
    margin: int = 0, size: Size | None = None,
) -> Array:
  """k frames of the attacked clip's own video, outside its span: float32[k, H, W, 3] in [0, 1].

  Indices come from `reference_indices` (the frame count is exact, see `video_info`); frames
  are decoded in one pass and go through `clips.prepare(size=size)` (native size if None).
  """
  info = video_info(path)
  idx = reference_indices(key, info.num_frames, clip_start=clip_start, clip_frames=clip_frames,
                          stride=stride, k=k, margin=margin)
  return prepare(read_frames_at(path, idx), size=size)


def same_scene_reference_frames(
    key: PRNGKey, paths: Sequence[PathLike], k: int, *, size: Size | None = None
) -> Array:
  """k frames drawn from other videos of the scene: float32[k, H, W, 3] in [0, 1].

  Frames are drawn uniformly without replacement from the union of all frames of `paths`
  (so longer videos contribute more) and returned grouped by video in the order of `paths`,
  in frame order within a video. Videos of different sizes need `size` (resized by
  `clips.prepare`). ValueError if the videos hold fewer than k frames in total.
  """
  k = check_int("k", k, 0)
  paths = [os.fspath(p) for p in paths]
  infos = [video_info(p) for p in paths]
  counts = np.array([info.num_frames for info in infos], np.int64)
  total = int(counts.sum())
  if k > total:
    raise ValueError(f"k={k} reference frames requested but the {len(paths)} same-scene "
                     f"videos hold only {total} frames")
  shapes = sorted({(info.height, info.width) for info in infos})
  if size is None and len(shapes) > 1:
    raise ValueError(f"same-scene videos differ in frame size {shapes}; pass size=(h, w)")
  if k == 0:
    hw = (size, size) if isinstance(size, int) else size or (shapes[0] if shapes else (0, 0))
    return jnp.zeros((0, *hw, 3), jnp.float32)
  picks = _draw(key, total, k)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  video = np.searchsorted(starts, picks, side="right") - 1
  parts = [prepare(read_frames_at(p, picks[video == i] - starts[i]), size=size)
           for i, p in enumerate(paths) if np.any(video == i)]
  return jnp.concatenate(parts, axis=0)
