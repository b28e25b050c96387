"""Turn float videos [B, T, H, W, C] in [0, 1] into uint8 grids, PNGs and comparison GIFs."""

from __future__ import annotations

from typing import Any

import imageio.v3 as iio
import numpy as np

from vidleak_jax.data.video_io import encode_gif, to_rgb, to_uint8  # defined with the video writers
from vidleak_jax.io import PathLike, write_bytes


def upscale(x: np.ndarray, scale: int) -> np.ndarray:
  """[..., H, W, C] -> [..., H*scale, W*scale, C] by nearest-neighbour pixel repetition."""
  if not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale!r}")
  if scale == 1:
    return x
  return np.repeat(np.repeat(x, scale, axis=-3), scale, axis=-2)


def _check_clips(clips: Any, name: str = "clips") -> np.ndarray:
  clips = np.asarray(clips)
  if clips.ndim != 5 or clips.shape[-1] not in (1, 3):
    raise ValueError(f"{name} must be [B, T, H, W, C] with C in {{1, 3}}, got {clips.shape}")
  return clips


def frame_grid(clips: Any, *, pad: int = 1, scale: int = 1, pad_value: int = 255) -> np.ndarray:
  """float[B, T, H, W, C] -> uint8[B*H*s + (B-1)*pad, T*W*s + (T-1)*pad, 3].

  Row b holds clip b and column t holds frame t. Each tile is the frame upscaled by the
  integer `scale` s (nearest neighbour); `pad` output pixels of grey level `pad_value`
  separate neighbouring tiles (no outer border). Grayscale clips are expanded to RGB.
  Uint8 input is taken as already quantised; any other dtype goes through `to_uint8`.
  """
  clips = _check_clips(clips)
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  tiles = clips if clips.dtype == np.uint8 else to_uint8(clips)
  tiles = upscale(to_rgb(tiles), scale)  # [B, T, h, w, 3]
  b, t, h, w, _ = tiles.shape
  grid = np.full((b * h + (b - 1) * pad, t * w + (t - 1) * pad, 3), pad_value, np.uint8)
  for i in range(b):
    for j in range(t):
      y, x = i * (h + pad), j * (w + pad)
      grid[y:y + h, x:x + w] = tiles[i, j]
  return grid


def encode_png(image: Any) -> bytes:
  """uint8[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> PNG bytes (float input via `to_uint8`)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = to_uint8(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
  return iio.imwrite("<bytes>", image, extension=".png", plugin="pillow")


def save_png(path: PathLike, image: Any) -> None:
  """Atomically writes image uint8[H, W(, C)] (e.g. a `frame_grid`) as a PNG at `path`."""
  write_bytes(path, encode_png(image))


def comparison_frames(
    truth: Any, reconstruction: Any, *, scale: int = 4, pad: int = 2, pad_value: int = 255
) -> np.ndarray:
  """truth, reconstruction float[B, T, H, W, C] -> uint8[T, B*H*s + (B-1)*pad, 2*W*s + pad, 3].

  Frame t stacks the clips vertically; each row is truth frame t (left, columns
  [0, W*s)) next to reconstruction frame t (right, columns [W*s + pad, 2*W*s + pad)).
  """
  truth = _check_clips(truth, "truth")
  reconstruction = _check_clips(reconstruction, "reconstruction")
  if truth.shape != reconstruction.shape:
    raise ValueError(
        f"shape mismatch: truth {truth.shape} vs reconstruction {reconstruction.shape}")
  pairs = np.stack([truth, reconstruction], axis=2)  # [B, T, 2, H, W, C]
  return np.stack([
      frame_grid(pairs[:, t], pad=pad, scale=scale, pad_value=pad_value)
      for t in range(truth.shape[1])
  ])


def comparison_gif(
    path: PathLike, truth: Any, reconstruction: Any, *, scale: int = 4, fps: float = 4.0,
    pad: int = 2,
) -> None:
  """Atomically writes an animated GIF of `comparison_frames(truth, reconstruction)`.

  truth, reconstruction: float[B, T, H, W, C] in [0, 1]; the GIF has T frames (see
  `encode_gif` for palette and timing caveats) and loops forever.
  """
  frames = comparison_frames(truth, reconstruction, scale=scale, pad=pad)
  write_bytes(path, encode_gif(frames, fps=fps))
