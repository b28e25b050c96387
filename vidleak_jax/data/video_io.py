"""Video files <-> uint8 frames [T, H, W, 3] through the ffmpeg binary shipped with imageio-ffmpeg.

Reading runs one ffmpeg process per call that decodes the first video stream in presentation
order (no frame-rate conversion: frame n is the n-th decoded frame) and selects frames inside
ffmpeg, so only the requested frames are piped to Python and decoding stops after the last of
them. Frames keep their stored orientation (rotation metadata is ignored) and pixel grid
(non-square sample aspect ratios are not corrected); alpha is dropped; output is always RGB.
Decoding is strict: any error ffmpeg reports (corrupt packet, truncated data) raises
`VideoDecodeError` instead of returning concealed or missing frames.

Also the frame encoders shared with `vidleak_jax.report`: `to_uint8` (float [0, 1] -> uint8),
`to_rgb` (1 -> 3 channels) and `encode_gif` (uint8 frames -> GIF bytes).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import secrets
import subprocess
import tempfile
from typing import Any, Sequence

import imageio.v3 as iio
import numpy as np

from vidleak_jax.data.checks import check_int
from vidleak_jax.io import PathLike, fsync_dir, write_bytes

SUPPORTED_EXTENSIONS = (".mp4", ".gif", ".mkv", ".avi")
_LOSSLESS_MUXERS = {".mkv": "matroska", ".avi": "avi"}
_SIZE_RE = re.compile(r" (\d+)x(\d+)[, \[]")
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\] ?)+")
_FPS_RE = re.compile(r" ([\d.]+)(k?) (?:fps|tbr)\b")


class VideoDecodeError(ValueError):
  """A video file is missing, unreadable, corrupt, truncated or shorter than requested."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Stream properties of a video file; `num_frames` is counted by decoding (exact)."""
  path: str
  num_frames: int
  fps: float  # 0.0 when the container declares no frame rate
  height: int
  width: int


def _ffmpeg() -> list[str]:
  import imageio_ffmpeg  # its ffmpeg binary is needed only to read/write video files

  return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin"]


def _err_text(stderr: bytes, lines: int = 3) -> str:
  """The first few distinct messages of ffmpeg's stderr (log prefixes removed), '; '-joined."""
  out: list[str] = []
  for line in stderr.decode(errors="replace").splitlines():
    line = _LOG_PREFIX.sub("", line.strip())
    if line and line not in out and not line.startswith("Error opening input file"):
      out.append(line)
  return "; ".join(out[:lines]) or "no error message"


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise VideoDecodeError(f"video {path!r} does not exist or is not a file")


def _probe(path: str) -> tuple[int, int, float]:
  """(height, width, fps) of the first video stream, parsed from ffmpeg's input header."""
  _check_exists(path)
  # Without an output ffmpeg prints the input header and exits with status 1.
  proc = subprocess.run(_ffmpeg() + ["-i", f"file:{path}"], capture_output=True)
  header = proc.stderr.decode(errors="replace")
  if "Error opening input" in header:  # Rerun quietly for just the error messages.
    quiet = subprocess.run(_ffmpeg() + ["-v", "error", "-i", f"file:{path}"], capture_output=True)
    raise VideoDecodeError(f"cannot open video {path!r}: {_err_text(quiet.stderr)}")
  line = next((ln for ln in header.splitlines() if "Stream #" in ln and "Video:" in ln), None)
  size = _SIZE_RE.search(line.split("Video:", 1)[1]) if line else None
  if size is None:
    raise VideoDecodeError(f"video {path!r} has no decodable video stream")
  fps = _FPS_RE.search(line)
  fps_value = float(fps.group(1)) * (1000.0 if fps and fps.group(2) else 1.0) if fps else 0.0
  return int(size.group(2)), int(size.group(1)), fps_value


def _count_frames(path: str) -> int:
  """Number of frames ffmpeg decodes from the first video stream (decodes the whole file)."""
  cmd = _ffmpeg() + ["-v", "error", "-i", f"file:{path}", "-map", "0:v:0",
                     "-fps_mode", "passthrough", "-f", "null", "-progress", "pipe:1", "-"]
  proc = subprocess.run(cmd, capture_output=True)
  counts = re.findall(rb"^frame=(\d+)", proc.stdout, flags=re.M)
  if proc.returncode != 0 or proc.stderr.strip() or not counts:
    raise VideoDecodeError(f"cannot decode video {path!r}: {_err_text(proc.stderr)}")
  return int(counts[-1])


def video_info(path: PathLike) -> VideoInfo:
  """Frame count (exact, by decoding every frame), fps and frame size of a video file."""
  path = os.fspath(path)
  height, width, fps = _probe(path)
  return VideoInfo(path, _count_frames(path), fps, height, width)


def _decode(path: str, select: str, count: int | None, hw: tuple[int, int]) -> np.ndarray:
  """Frames whose index n satisfies ffmpeg expression `select`, at most `count`: uint8[T,H,W,3]."""
  height, width = hw
  frame_bytes = height * width * 3
  cmd = _ffmpeg() + ["-v", "error", "-noautorotate", "-i", f"file:{path}", "-map", "0:v:0",
                     "-vf", f"select='{select}'", "-fps_mode", "passthrough"]
  cmd += ["-frames:v", str(count)] if count is not None else []
  cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
  frames: list[np.ndarray] = []
  with tempfile.TemporaryFile() as err:
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err) as proc:
      assert proc.stdout is not None
      while count is None or len(frames) < count:
        buf = proc.stdout.read(frame_bytes)
        if len(buf) < frame_bytes:
          break
        frames.append(np.frombuffer(buf, np.uint8).reshape(height, width, 3))
      rest = proc.stdout.read()  # Lets ffmpeg flush and exit; empty unless the size changed.
      returncode = proc.wait()
    err.seek(0)
    stderr = err.read()
  if returncode != 0 or stderr.strip() or rest or (buf and len(buf) < frame_bytes):
    raise VideoDecodeError(f"cannot decode video {path!r}: {_err_text(stderr)}")
  if not frames:
    return np.zeros((0, height, width, 3), np.uint8)
  return np.stack(frames)


def read_frames(
    path: PathLike, *, start: int = 0, stride: int = 1, count: int | None = None
) -> np.ndarray:
  """Frames start, start+stride, ... (`count` of them, or to the end): uint8[T, H, W, 3].

  Only the selected frames are held in memory and decoding stops after the last one. Raises
  VideoDecodeError naming the file if it is missing, corrupt or truncated, or if it has
  fewer frames than requested (count given) or none at index `start` (count=None).
  """
  path = os.fspath(path)
  start = check_int("start", start, 0)
  stride = check_int("stride", stride, 1)
  count = None if count is None else check_int("count", count, 0)
  height, width, _ = _probe(path)
  if count == 0:
    return np.zeros((0, height, width, 3), np.uint8)
  select = f"gte(n,{start})" + (f"*not(mod(n-{start},{stride}))" if stride > 1 else "")
  frames = _decode(path, select, count, (height, width))
  if (count is not None and len(frames) < count) or len(frames) == 0:
    last = "" if count is None else start + (count - 1) * stride
    raise VideoDecodeError(f"video {path!r} has {_count_frames(path)} frames; "
                           f"frames {start}..{last} step {stride} requested")
  return frames


_MAX_SELECT_TERMS = 48


def read_frames_at(path: PathLike, indices: Sequence[int] | np.ndarray) -> np.ndarray:
  """Frames at `indices` (any order, repeats allowed) in one decoding pass: uint8[K, H, W, 3]."""
  path = os.fspath(path)
  idx = np.asarray(indices).reshape(-1)
  if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0):
    raise ValueError(f"indices must be non-negative integers, got {np.asarray(indices)!r}")
  height, width, _ = _probe(path)
  wanted = np.unique(idx)
  if wanted.size == 0:
    return np.zeros((0, height, width, 3), np.uint8)
  # Contiguous runs become between(n,a,b) terms; ffmpeg's expression parser fails on very long
  # expressions, so at most _MAX_SELECT_TERMS runs are decoded per pass.
  breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
  runs = [(int(r[0]), int(r[-1])) for r in np.split(wanted, breaks)]
  parts = []
  for i in range(0, len(runs), _MAX_SELECT_TERMS):
    group = runs[i:i + _MAX_SELECT_TERMS]
    select = "+".join(f"between(n,{a},{b})" for a, b in group)
    parts.append(_decode(path, select, sum(b - a + 1 for a, b in group), (height, width)))
  frames = np.concatenate(parts) if len(parts) > 1 else parts[0]
  if len(frames) < wanted.size:
    raise VideoDecodeError(f"video {path!r} has {_count_frames(path)} frames; "
                           f"frame {int(wanted[-1])} requested")
  return frames[np.searchsorted(wanted, idx)]


def to_uint8(x: Any) -> np.ndarray:
  """float[...] in [0, 1] -> uint8[...] (clipped, rounded, NaN -> 0); shape and C unchanged."""
  x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_rgb(x: np.ndarray) -> np.ndarray:
  """uint8[..., C] with C in {1, 3} -> uint8[..., 3] (a single channel is repeated)."""
  if x.shape[-1] == 3:
    return x
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  raise ValueError(f"expected 1 or 3 channels, got shape {x.shape}")


def encode_gif(frames: np.ndarray, *, fps: float = 4.0) -> bytes:
  """uint8[T, H, W, 3] -> bytes of a GIF looping forever at `fps` frames per second.

  GIF stores delays in 10 ms units and uses a 256-colour palette per frame, so timing is
  rounded and many-colour frames are quantised; Pillow merges identical consecutive frames
  into one frame with the summed delay.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected uint8[T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  buf = io.BytesIO()
  iio.imwrite(
      buf, frames, extension=".gif", plugin="pillow", is_batch=True,
      duration=int(round(1000.0 / fps)), loop=0,  # Pillow: duration in ms; loop=0 -> forever.
  )
  return buf.getvalue()


def _as_uint8_rgb(frames: Any) -> np.ndarray:
  """uint8 or float [T, H, W, C], C in {1, 3} -> uint8[T, H, W, 3] (floats via `to_uint8`)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or 0 in frames.shape:
    raise ValueError(f"frames must be non-empty [T, H, W, C] with C in {{1, 3}}, got "
                     f"{frames.shape}")
  if frames.dtype != np.uint8:
    if not np.issubdtype(frames.dtype, np.floating):
      raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    frames = to_uint8(frames)
  return np.ascontiguousarray(to_rgb(frames))


def _encode_args(ext: str, fps: float, height: int, width: int) -> list[str]:
  """ffmpeg arguments reading rgb24 frames from stdin and encoding them for `ext`."""
  args = ["-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
          "-r", repr(float(fps)), "-i", "-", "-an"]
  if ext == ".mp4":
    return args + ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-preset", "medium",
                   "-movflags", "+faststart", "-f", "mp4"]
  # FFV1 with bgr0 stores the RGB samples losslessly; yuv formats would round via colour conversion.
  return args + ["-c:v", "ffv1", "-level", "3", "-pix_fmt", "bgr0", "-f", _LOSSLESS_MUXERS[ext]]


def write_video(path: PathLike, frames: Any, *, fps: float = 8.0) -> None:
  """Atomically writes frames uint8 or float-in-[0, 1] [T, H, W, C] (C in {1, 3}) to `path`.

  The format follows the extension: `.mp4` is H.264 (yuv420p, crf 17) and lossy; odd heights
  or widths are padded to even by repeating the last row/column, so reading back gives the
  padded size. `.gif` loops forever with a 256-colour palette per frame (lossy, 10 ms timing).
  `.mkv` / `.avi` are FFV1 in bgr0 and round-trip uint8 RGB bit-exactly. Grayscale is stored
  as RGB. The file is encoded to a temporary sibling and renamed, so `path` is either left
  untouched or fully written; ValueError for an unsupported extension.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise ValueError(f"cannot write video {path!r}: unsupported extension {ext!r}; "
                     f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
  if not fps > 0:
    raise ValueError(f"fps must be positive, got {fps!r}")
  rgb = _as_uint8_rgb(frames)
  if ext == ".gif":
    write_bytes(path, encode_gif(rgb, fps=fps))
    return
  if ext == ".mp4":
    _, h, w, _ = rgb.shape
    rgb = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  _, height, width, _ = rgb.shape
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
  try:
    cmd = _ffmpeg() + _encode_args(ext, fps, height, width) + ["-n", f"file:{tmp}"]
    proc = subprocess.run(cmd, input=rgb.tobytes(), capture_output=True)
    if proc.returncode != 0:
      raise RuntimeError(f"ffmpeg failed to write video {path!r}: {_err_text(proc.stderr)}")
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  fsync_dir(parent)
