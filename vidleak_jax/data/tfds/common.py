"""Shared machinery of the TensorFlow-free video clip builders.

Every builder turns local video files into fixed-length clips stored as zlib-compressed uint8
tensors in ArrayRecord files, read back with `builder.as_data_source()` (no TensorFlow). A
video that cannot be decoded, or is too short for one clip, is skipped with a warning naming
it; the skipped files are listed in `skipped.json` next to the generated data.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any, Iterator, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from vidleak_jax.data import clips as clips_lib
from vidleak_jax.data import video_io

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".gif")
SKIPPED_FILE = "skipped.json"
_BYTES_PER_PASS = 256 << 20  # decoded full-resolution frames held in memory per decoding pass
_MAX_PICKS = 96  # frames picked per `read_frames_at` decoding pass (bounds memory per pass)


class VideoItem(NamedTuple):
  """One source video: path relative to the manual dir (posix), class index, scene id."""
  video: str
  label: int
  scene: str


def _is_pos_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(eq=False)
class VideoClipConfig(tfds.core.BuilderConfig):
  """Clip sampling: `frames` frames `stride` apart, resized to `size` = (h, w) or an int for
  square (None keeps the native size, which may then vary between videos), `clips_per_video`
  evenly spaced clips per video (at most one per start frame; None: all disjoint clips that
  fit). An empty `name` is derived from the fields, e.g. "f16_s1_112x112_c1"."""
  name: str = ""
  frames: int = 16
  stride: int = 1
  size: tuple[int, int] | None = (112, 112)
  clips_per_video: int | None = 1

  def __post_init__(self) -> None:
    optional = ("clips_per_video",) if self.clips_per_video is not None else ()
    for field in ("frames", "stride") + optional:
      if not _is_pos_int(getattr(self, field)):
        raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)!r}")
    if self.size is not None:
      size = (self.size, self.size) if _is_pos_int(self.size) else tuple(self.size)
      if len(size) != 2 or not all(map(_is_pos_int, size)):
        raise ValueError(f"size must be None, an int or an (h, w) pair, got {self.size!r}")
      self.size = (int(size[0]), int(size[1]))
    if not self.name:
      self.name = self.default_name()

  def default_name(self) -> str:
    size = "native" if self.size is None else f"{self.size[0]}x{self.size[1]}"
    clips = "-all" if self.clips_per_video is None else self.clips_per_video
    return f"f{self.frames}_s{self.stride}_{size}_c{clips}"


def to_size(frames: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  """uint8[..., H, W, 3] -> uint8[..., h, w, 3] by `clips.resize(method="area")` (exact block
  means when h | H and w | W, else antialiased linear), rounded; None keeps the size."""
  if size is None or tuple(frames.shape[-3:-1]) == tuple(size):
    return frames
  resized = clips_lib.resize(frames, size, method="area")
  return np.asarray(jnp.clip(jnp.round(resized), 0, 255)).astype(np.uint8)


def _clip_groups(path: str, starts: np.ndarray, config: VideoClipConfig,
                 info: video_io.VideoInfo) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(starts, uint8[n, T, H, W, 3]) of consecutive groups of clips, one decoding pass each:
  a contiguous frame range holding several clips, else up to _MAX_PICKS picked frames."""
  frames, stride = config.frames, config.stride
  span = (frames - 1) * stride + 1
  offsets = np.arange(frames) * stride
  window = max(1, _BYTES_PER_PASS // (info.height * info.width * 3))
  i = 0
  while i < len(starts):
    dense = int(np.searchsorted(starts, starts[i] + window - span, side="right"))
    sparse = min(len(starts), i + _MAX_PICKS // frames)
    first = int(starts[i])
    if dense > i and dense >= sparse:  # clips i..dense-1 lie within `window` frames
      run = video_io.read_frames(path, start=first, count=int(starts[dense - 1]) + span - first)
      yield starts[i:dense], run[starts[i:dense, None] - first + offsets]
      i = dense
    elif sparse > i:
      picks = video_io.read_frames_at(path, (starts[i:sparse, None] + offsets).reshape(-1))
      yield starts[i:sparse], picks.reshape(sparse - i, frames, *picks.shape[1:])
      i = sparse
    else:  # a clip longer than both limits
      yield starts[i:i + 1], video_io.read_frames(path, start=first, stride=stride,
                                                  count=frames)[None]
      i += 1


def video_clips(path: epath.PathLike, config: VideoClipConfig) -> Iterator[tuple[int, np.ndarray]]:
  """(start frame, uint8[T, h, w, 3] clip) of each clip of a video, in order of start.

  Raises `video_io.VideoDecodeError` naming the file if it is unreadable or too short.
  """
  path = os.fspath(path)
  info = video_io.video_info(path)  # decodes every frame: fails early on corrupt files
  span = (config.frames - 1) * config.stride + 1
  if info.num_frames < span:
    raise video_io.VideoDecodeError(
        f"video {path!r} has {info.num_frames} frames, fewer than the {span} one clip of "
        f"{config.frames} frames at stride {config.stride} needs")
  num = config.clips_per_video
  num = None if num is None else min(num, info.num_frames - span + 1)
  starts = clips_lib.clip_starts(info.num_frames, frames=config.frames, stride=config.stride,
                                 num_clips=num)
  for group_starts, group in _clip_groups(path, starts, config, info):
    for start, clip in zip(group_starts, to_size(group, config.size)):
      yield int(start), clip


def list_videos(folder: epath.Path) -> list[epath.Path]:
  """Video files (by extension) under `folder`, recursively, sorted; hidden entries ignored."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found += [epath.Path(dirpath) / f for f in filenames
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
  return sorted(found)


def read_skipped(data_dir: epath.PathLike) -> dict[str, Any]:
  """The skipped-video report written by a build into its versioned data dir."""
  return json.loads((epath.Path(data_dir) / SKIPPED_FILE).read_text())


class VideoClipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the clip builders; subclasses define `_split_generators` returning
  `{split: self._generate_examples(manual_dir, items, split)}` for lists of `VideoItem`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [VideoClipConfig()]
  CLASS_NAMES: tuple[str, ...] | None = None  # None: read from the manual dir when building
  DESCRIPTION = "Fixed-length uint8 clips of local videos."
  HOMEPAGE: str | None = None
  CITATION = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # The module file; TFDS's default lookup needs the optional `importlib_resources` package.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    height, width = config.size or (None, None)
    names = list(self.CLASS_NAMES) if self.CLASS_NAMES else None
    features = tfds.features.FeaturesDict({
        "clip": tfds.features.Tensor(shape=(config.frames, height, width, 3), dtype=np.uint8,
                                     encoding=tfds.features.Encoding.ZLIB),
        "label": tfds.features.ClassLabel(names=names) if names else tfds.features.ClassLabel(),
        "video": tfds.features.Text(),
        "start": tfds.features.Scalar(dtype=np.int32),
        "scene": tfds.features.Text(),
    })
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features,
                                 supervised_keys=("clip", "label"), homepage=self.HOMEPAGE,
                                 citation=self.CITATION)

  def _set_class_names(self, names: Sequence[str]) -> None:
    """Fixes the label names found in the manual dir (must match any already defined)."""
    self.info.features["label"].names = list(names)

  def _download_and_prepare(self, dl_manager: Any, download_config: Any = None) -> None:
    self._skipped: list[dict[str, str]] = []
    self._num_videos = 0
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    report = {"builder": self.name, "config": self.builder_config.name,
              "num_videos": self._num_videos, "num_skipped": len(self._skipped),
              "skipped": self._skipped}
    (epath.Path(self.data_dir) / SKIPPED_FILE).write_text(json.dumps(report, indent=1))

  def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
    """As in TFDS, then logs the videos skipped when the data were generated."""
    super().download_and_prepare(*args, **kwargs)
    path = epath.Path(self.data_dir) / SKIPPED_FILE
    if not path.exists():
      return
    report = json.loads(path.read_text())
    if report["skipped"]:
      names = ", ".join(f"{s['video']} ({s['split']})" for s in report["skipped"])
      logging.warning("%s/%s: skipped %d of %d videos (reasons in %s): %s", self.name,
                      self.builder_config.name, report["num_skipped"], report["num_videos"],
                      os.fspath(path), names)
    else:
      logging.info("%s/%s: no videos skipped of %d", self.name, self.builder_config.name,
                   report["num_videos"])

  def skip(self, video: str, split: str, reason: str) -> None:
    """Records (and logs) a video left out of `split`."""
    logging.warning("%s: skipping video %s (split %s): %s", self.name, video, split, reason)
    self._skipped.append({"video": video, "split": split, "reason": reason})

  def _generate_examples(self, root: epath.PathLike, items: Sequence[VideoItem],
                         split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    root = epath.Path(root)
    for item in items:
      self._num_videos += 1
      path = root / item.video
      if not path.is_file():
        self.skip(item.video, split, f"file {os.fspath(path)!r} not found")
        continue
      written = 0
      try:
        for start, clip in video_clips(path, self.builder_config):
          yield f"{item.video}@{start}", {"clip": clip, "label": item.label,
                                          "video": item.video, "start": start,
                                          "scene": item.scene}
          written += 1
      except video_io.VideoDecodeError as err:
        note = f" after {written} clips were written" if written else ""
        self.skip(item.video, split, f"{err}{note}")


class ClipSource(Sequence):
  """Random access to the examples of one split, as numpy / Python values:
  {"clip": uint8[T, H, W, 3], "label": int, "video": str, "start": int, "scene": str}."""

  def __init__(self, builder: VideoClipBuilder, split: str):
    self.builder = builder
    self.split = split
    self.source = builder.as_data_source(split=split)

  @property
  def class_names(self) -> list[str]:
    return list(self.builder.info.features["label"].names)

  @property
  def skipped(self) -> list[dict[str, str]]:
    """Videos left out of this split at build time, with the reason."""
    report = read_skipped(self.builder.data_dir)
    return [s for s in report["skipped"] if s["split"] == self.split]

  def __len__(self) -> int:
    return len(self.source)

  @staticmethod
  def _convert(example: dict[str, Any]) -> dict[str, Any]:
    out = dict(example)
    for key in ("video", "scene"):
      out[key] = out[key].decode() if isinstance(out[key], bytes) else str(out[key])
    out["label"], out["start"] = int(out["label"]), int(out["start"])
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self._convert(self.source[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return (f"ClipSource({self.builder.name}/{self.builder.builder_config.name}, "
            f"split={self.split!r}, len={len(self)})")
