"""Reconstruction-quality metrics for floating video clips [B, T, H, W, C] in [0, 1] (uint8 video
is refused: scale it to float32 in [0, 1] first)."""

from __future__ import annotations

from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from vidleak_jax.inputs import check_clips

Array = jax.Array

# Normalised MSE floor: identical frames score 10 * log10(1 / 1e-10) = 100 dB instead of inf.
MSE_FLOOR = 1e-10
SSIM_MAX_FILTER = 11
SSIM_FILTER_SIGMA = 1.5


def check_clip_pair(x: Any, y: Any, x_name: str = "x", y_name: str = "y") -> tuple[Array, Array]:
  """Returns (x, y) as jax arrays after checking both are floating 5-D [B, T, H, W, C] clips of
  equal shapes; ValueError else. Integer (e.g. uint8) clips are refused, not rescaled: scale them
  to float32 in [0, 1] first (`clips.astype(np.float32) / 255`). Values are not range-checked
  (see `data_range`)."""
  x = jnp.asarray(check_clips(x, x_name, value_range=None))
  y = jnp.asarray(check_clips(y, y_name, value_range=None))
  if x.shape != y.shape:
    raise ValueError(
        f"{y_name} must have the same shape as {x_name}, expected [B, T, H, W, C] = {tuple(x.shape)}, "
        f"got {tuple(y.shape)}")
  return x, y


def fold_frames(a: Array) -> Array:
  """[B, T, H, W, C] -> [B*T, H, W, C]."""
  return a.reshape((-1,) + a.shape[2:])


def ssim_filter_size(h: int, w: int) -> int:
  """Largest odd gaussian window <= min(11, h, w) that fits an h x w frame."""
  size = min(SSIM_MAX_FILTER, h, w)
  return size if size % 2 == 1 else size - 1


def mse_per_frame(x: Array, y: Array) -> Array:
  """Mean squared error per frame: [B, T, H, W, C] x2 -> [B, T]."""
  x, y = check_clip_pair(x, y)
  b, t = x.shape[:2]
  return dm_pix.mse(fold_frames(x), fold_frames(y)).reshape(b, t)


def psnr_per_frame(x: Array, y: Array, *, data_range: float = 1.0) -> Array:
  """PSNR in dB per frame: [B, T, H, W, C] x2 -> [B, T].

  Frames are folded into the batch and scored with dm_pix's PSNR formula
  -10 * log10(mse / data_range**2). The normalised MSE is clipped below at
  MSE_FLOOR = 1e-10, so identical frames give a finite 100 dB rather than inf;
  for any normalised MSE >= 1e-10 the value equals dm_pix.psnr on x / data_range.
  """
  x, y = check_clip_pair(x, y)
  b, t = x.shape[:2]
  scale = 1.0 / data_range
  err = dm_pix.mse(fold_frames(x) * scale, fold_frames(y) * scale)
  err = jnp.maximum(err, MSE_FLOOR)
  return (-10.0 * jnp.log10(err)).reshape(b, t)


def psnr(x: Array, y: Array, *, data_range: float = 1.0) -> Array:
  """Per-clip PSNR = mean over frames of per-frame PSNR: [B, T, H, W, C] x2 -> [B]."""
  return jnp.mean(psnr_per_frame(x, y, data_range=data_range), axis=1)


def ssim_per_frame(x: Array, y: Array, *, data_range: float = 1.0) -> Array:
  """SSIM per frame via dm_pix.ssim: [B, T, H, W, C] x2 -> [B, T].

  Uses dm_pix's gaussian window (sigma 1.5) of size min(11, H, W), reduced by
  one when that is even, so small frames (e.g. 8x8 or 6x6) can be scored; for
  frames of at least 11x11 this is exactly dm_pix.ssim's default. Colour
  channels are averaged, as in dm_pix.
  """
  x, y = check_clip_pair(x, y)
  b, t, h, w = x.shape[:4]
  with jax.numpy_dtype_promotion("standard"):  # dm_pix mixes int32 and float scalars
    vals = dm_pix.ssim(
        fold_frames(x), fold_frames(y), max_val=data_range,
        filter_size=ssim_filter_size(h, w), filter_sigma=SSIM_FILTER_SIGMA)
  return vals.reshape(b, t)


def ssim(x: Array, y: Array, *, data_range: float = 1.0) -> Array:
  """Per-clip SSIM = mean over frames of per-frame SSIM: [B, T, H, W, C] x2 -> [B]."""
  return jnp.mean(ssim_per_frame(x, y, data_range=data_range), axis=1)


def mse(x: Array, y: Array) -> Array:
  """Per-clip mean squared error over T, H, W, C: [B, T, H, W, C] x2 -> [B]."""
  x, y = check_clip_pair(x, y)
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3, 4))


def label_accuracy(pred: Array, true: Array) -> Array:
  """Fraction of equal entries: pred [B], true [B] -> float32 scalar."""
  pred, true = jnp.asarray(pred), jnp.asarray(true)
  if pred.shape != true.shape:
    raise ValueError(
        f"pred must have the same shape as true, expected {tuple(true.shape)}, got {tuple(pred.shape)}")
  if pred.size == 0:
    raise ValueError("pred and true must be non-empty, got shape " + str(tuple(pred.shape)))
  return jnp.mean((pred == true).astype(jnp.float32))


def psnr_matrix(rec: Array, true: Array) -> np.ndarray:
  """Host-side pairwise per-clip PSNR: rec, true [B, T, H, W, C] -> float64 [B_true, B_rec].

  Entry [i, j] is psnr(rec[j], true[i]). Built one ground-truth clip at a time,
  so peak memory is O(B) clips rather than O(B^2).
  """
  rec, true = check_clip_pair(rec, true, "rec", "true")
  rows = [np.asarray(psnr(rec, jnp.broadcast_to(true[i], rec.shape))) for i in range(true.shape[0])]
  return np.stack(rows).astype(np.float64)


def match_to_ground_truth(rec: Array, true: Array) -> np.ndarray:
  """Host-side optimal matching: rec, true [B, T, H, W, C] -> int perm [B] with rec[perm[i]] ~ true[i].

  Solves the linear assignment that maximises the total per-clip PSNR (scipy's
  Hungarian solver on the B x B PSNR matrix). Not jittable: it pulls values to
  the host. Non-finite PSNRs (e.g. NaN reconstructions) are treated as the worst
  possible match. For B == 1 returns [0].
  """
  scores = psnr_matrix(rec, true)
  if scores.shape[0] == 1:
    return np.zeros((1,), dtype=np.int64)
  scores = np.where(np.isfinite(scores), scores, -1e9)
  rows, cols = linear_sum_assignment(scores, maximize=True)
  perm = np.empty_like(cols)
  perm[rows] = cols
  return perm.astype(np.int64)


def _floats(a: Array) -> list[Any]:
  """Array -> nested list of Python floats."""
  return np.asarray(a, dtype=np.float64).tolist()


def evaluate(
    rec_clips: Array,
    true_clips: Array,
    *,
    rec_labels: Array | None = None,
    true_labels: Array | None = None,
    match: bool = True,
    assignment: Array | None = None,
) -> dict[str, Any]:
  """Scores reconstructions [B, T, H, W, C] against ground truth; returns a JSON-serialisable dict.

  With match=True the reconstructed clips (and rec_labels) are first reordered
  by match_to_ground_truth, so clip i of every per-clip list compares
  rec_clips[assignment[i]] with true_clips[i]; with match=False the assignment
  is the identity; an explicit `assignment` [B] (e.g. matched in another space) is used as given.
  label_accuracy is None unless both label arrays ([B]) are
  given. Host function, not jittable.
  """
  rec_clips, true_clips = check_clip_pair(rec_clips, true_clips, "rec_clips", "true_clips")
  b = rec_clips.shape[0]
  if (rec_labels is None) != (true_labels is None):
    raise ValueError("rec_labels and true_labels must be given together or both be None")
  if rec_labels is not None:
    rec_labels, true_labels = np.asarray(rec_labels), np.asarray(true_labels)
    for name, lab in (("rec_labels", rec_labels), ("true_labels", true_labels)):
      if lab.ndim < 1 or lab.shape[0] != b:
        raise ValueError(f"{name} must have shape [B] = [{b}], got {tuple(lab.shape)}")

  if assignment is not None:
    perm = np.asarray(assignment, np.int64)
    if sorted(perm.tolist()) != list(range(b)):
      raise ValueError(f"assignment must be a permutation of 0..{b - 1}, got {perm.tolist()}")
  elif match:
    perm = match_to_ground_truth(rec_clips, true_clips)
  else:
    perm = np.arange(b, dtype=np.int64)
  rec_clips = rec_clips[jnp.asarray(perm)]
  acc = None
  if rec_labels is not None:
    acc = float(label_accuracy(rec_labels[perm], true_labels))

  psnr_f = psnr_per_frame(rec_clips, true_clips)
  ssim_f = ssim_per_frame(rec_clips, true_clips)
  psnr_c = jnp.mean(psnr_f, axis=1)
  ssim_c = jnp.mean(ssim_f, axis=1)
  return {
      "psnr": _floats(psnr_c),
      "ssim": _floats(ssim_c),
      "psnr_per_frame": _floats(psnr_f),
      "ssim_per_frame": _floats(ssim_f),
      "mse": _floats(mse(rec_clips, true_clips)),
      "psnr_mean": float(jnp.mean(psnr_c)),
      "ssim_mean": float(jnp.mean(ssim_c)),
      "assignment": [int(i) for i in perm],
      "label_accuracy": acc,
  }


def temporal_error(x: Array, y: Array) -> Array:
  """Temporal-consistency error: mean |(x_t+1 - x_t) - (y_t+1 - y_t)|, [B,T,H,W,C] x2 -> [B].

  0 for single-frame clips; measures flicker that per-frame metrics cannot see.
  """
  x, y = check_clip_pair(x, y)
  if x.shape[1] < 2:
    return jnp.zeros(x.shape[:1], x.dtype)
  return jnp.mean(jnp.abs(jnp.diff(x, axis=1) - jnp.diff(y, axis=1)), axis=(1, 2, 3, 4))
