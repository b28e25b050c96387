"""`video_folder`: clips of local videos sorted into one sub-folder per class."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from etils import epath

from vidleak_jax.data.tfds import common


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(common.VideoClipConfig):
  """Clip sampling plus `test_fraction`: the share of each class's videos put in a "test" split
  (0: a single "train" split)."""
  test_fraction: float = 0.0

  def __post_init__(self) -> None:
    if not 0.0 <= self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
    super().__post_init__()

  def default_name(self) -> str:
    suffix = f"_t{self.test_fraction:g}" if self.test_fraction else ""
    return super().default_name() + suffix


def _hash(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()


def class_folders(root: epath.Path) -> dict[str, list[epath.Path]]:
  """{class name: its video files} for each non-hidden sub-folder holding videos, sorted."""
  folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  found = {p.name: common.list_videos(p) for p in folders}
  return {name: videos for name, videos in found.items() if videos}


def split_videos(videos: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic (train, test) split of one class's videos: the test share is the
  round(test_fraction * n) videos (at least one, and never all) first by a hash of their path."""
  if not test_fraction or len(videos) < 2:
    return list(videos), []
  num_test = min(len(videos) - 1, max(1, round(test_fraction * len(videos))))
  test = set(sorted(videos, key=_hash)[:num_test])
  return [v for v in videos if v not in test], [v for v in videos if v in test]


class VideoFolder(common.VideoClipBuilder):
  """Clips of `<manual_dir>/<class>/**/<video>`; class names are the sorted sub-folder names.

  The scene of a video is its sub-folder below the class folder when there is one (e.g.
  `Fighting/cam03/clip1.mp4` -> "cam03", meant for one folder per camera), else its relative
  path without extension.
  """

  BUILDER_CONFIGS = [VideoFolderConfig()]
  DESCRIPTION = "Fixed-length clips of local videos stored as <manual_dir>/<class>/<video>."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the videos (.mp4, .avi, .mkv, ...) in one sub-folder per class:
  <manual_dir>/<class name>/<video>, optionally nested one more level per camera/scene:
  <manual_dir>/<class name>/<scene>/<video>.
  """

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    root = epath.Path(dl_manager.manual_dir)
    classes = class_folders(root)
    if not classes:
      raise FileNotFoundError(
          f"no class sub-folders with videos ({', '.join(common.VIDEO_EXTENSIONS)}) in {root}")
    self._set_class_names(list(classes))
    splits: dict[str, list[common.VideoItem]] = {"train": [], "test": []}
    for label, (name, paths) in enumerate(classes.items()):
      rel = [p.relative_to(root).as_posix() for p in paths]
      train, test = split_videos(rel, self.builder_config.test_fraction)
      for split, videos in (("train", train), ("test", test)):
        splits[split] += [common.VideoItem(v, label, _scene(v)) for v in videos]
    if not self.builder_config.test_fraction:
      del splits["test"]
    return {split: self._generate_examples(root, items, split) for split, items in splits.items()}


def _scene(rel: str) -> str:
  """Camera folder below the class folder if the video is nested, else the video's path
  without extension (`walk/v1.mkv` -> "walk/v1")."""
  parts = rel.split("/")
  return "/".join(parts[1:-1]) if len(parts) > 2 else rel.rsplit(".", 1)[0]
