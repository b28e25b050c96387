"""Video data sources: synthetic surveillance-like clips and real video files."""

from __future__ import annotations

from vidleak_jax.data.clips import (
    center_crop,
    clip_starts,
    normalize,
    prepare,
    resize,
    to_float,
)
from vidleak_jax.data.reference import (
    reference_frames,
    reference_indices,
    same_scene_reference_frames,
)
from vidleak_jax.data.shipped import shipped_videos
from vidleak_jax.data.synthetic import class_directions, environment, synthetic_clips
from vidleak_jax.data.video_io import (
    VideoDecodeError,
    VideoInfo,
    read_frames,
    read_frames_at,
    video_info,
    write_video,
)

__all__ = [
    "VideoDecodeError",
    "VideoInfo",
    "center_crop",
    "class_directions",
    "clip_starts",
    "environment",
    "normalize",
    "prepare",
    "read_frames",
    "read_frames_at",
    "reference_frames",
    "reference_indices",
    "resize",
    "same_scene_reference_frames",
    "shipped_videos",
    "synthetic_clips",
    "to_float",
    "video_info",
    "write_video",
]
