"""TensorFlow-free TFDS builders of fixed-length video clips from local files.

Builders: `video_folder` (one sub-folder per class), `ucf_crime` (UCF-Crime with its official
anomaly split files) and `ucf101` (UCF101 with official splits 1-3). Nothing is downloaded:
the videos are read from a manual dir. Examples are
  {"clip": uint8[T, H, W, 3], "label": int, "video": str (path relative to the manual dir),
   "start": int (index of the clip's first frame in the video), "scene": str}.
Data are written as ArrayRecord files and read by random access without TensorFlow:

  source = load("ucf_crime", manual_dir="/data/UCF_Crimes", data_dir="/data/tfds",
                split="train", frames=16, stride=2, size=(112, 112), clips_per_video=4)
  example = source[0]

`video_folder` and `ucf_crime` are also registered in the TFDS catalog (for `tfds.builder`);
`ucf101` is not, since TFDS ships its own TensorFlow-based builder of that name.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from vidleak_jax.data.tfds.common import (SKIPPED_FILE, VIDEO_EXTENSIONS, ClipSource,
                                          VideoClipBuilder, VideoClipConfig, VideoItem,
                                          read_skipped)
from vidleak_jax.data.tfds.ucf101 import Ucf101, Ucf101Config
from vidleak_jax.data.tfds.ucf_crime import UcfCrime
from vidleak_jax.data.tfds.video_folder import VideoFolder, VideoFolderConfig

BUILDERS: dict[str, type[VideoClipBuilder]] = {
    "video_folder": VideoFolder, "ucf_crime": UcfCrime, "ucf101": Ucf101}


def builder(name: str, *, data_dir: epath.PathLike, **config_kwargs: Any) -> VideoClipBuilder:
  """Builder `name` whose config is made from `config_kwargs` (frames, stride, size,
  clips_per_video; test_fraction for video_folder; split_number for ucf101)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown builder {name!r}; expected one of {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  config = type(cls.BUILDER_CONFIGS[0])(**config_kwargs)
  predefined = {c.name for c in cls.BUILDER_CONFIGS}
  return cls(config=config.name if config.name in predefined else config,
             data_dir=os.fspath(data_dir), file_format="array_record")


def load(
    name: str,
    *,
    manual_dir: epath.PathLike,
    data_dir: epath.PathLike,
    split: str = "train",
    frames: int = 16,
    stride: int = 1,
    size: tuple[int, int] | None = (112, 112),
    clips_per_video: int | None = 1,
    **config_kwargs: Any,
) -> ClipSource:
  """Random-access examples of `split`, building the dataset from `manual_dir` first if no
  build with this config exists under `data_dir` (an existing build is reused as is: delete
  its folder to rebuild). Videos skipped at build time are in `.skipped` of the result."""
  b = builder(name, data_dir=data_dir, frames=frames, stride=stride, size=size,
              clips_per_video=clips_per_video, **config_kwargs)
  if not b.is_prepared():
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  if split not in b.info.splits:
    raise ValueError(f"{name}/{b.builder_config.name} has no split {split!r}; it has "
                     f"{sorted(b.info.splits)}")
  return ClipSource(b, split)


__all__ = [
    "BUILDERS", "SKIPPED_FILE", "VIDEO_EXTENSIONS", "ClipSource", "Ucf101", "Ucf101Config",
    "UcfCrime", "VideoClipBuilder", "VideoClipConfig", "VideoFolder", "VideoFolderConfig",
    "VideoItem", "builder", "load", "read_skipped",
]
