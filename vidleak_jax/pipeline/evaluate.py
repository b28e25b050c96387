"""The `eval` stage: the reconstruction scored against the client's private batch (ground truth
enters only here) into metrics.json, truth.png, reconstruction.png and comparison.gif."""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from vidleak_jax import metrics, report
from vidleak_jax.metrics_lpips import lpips
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.features import feature_metrics
from vidleak_jax.pipeline.sr import sr_scale


def stage_eval(cfg: RunConfig) -> dict[str, Any]:
  """Scores the reconstruction against the private batch; writes metrics.json and pictures."""
  truth = rundir.require(cfg, "data.npz", "data")
  rec = rundir.require(cfg, "reconstruction.npz", "attack")
  feature_result = {}
  if cfg.pipeline == "features":  # the attack recovers features: clips follow their matching
    feature_result = feature_metrics(cfg, rec, truth)
  result = metrics.evaluate(rec["clips"], truth["clips"], rec_labels=rec["labels"],
                            true_labels=truth["labels"],
                            assignment=feature_result.get("feature_assignment"))
  result.update(feature_result)
  perm = np.asarray(result["assignment"])
  init_psnr = metrics.psnr(rec["init_clips"][perm], truth["clips"])
  result.update(psnr_init=[float(v) for v in init_psnr], psnr_init_mean=float(init_psnr.mean()),
                attack_loss=float(rec["loss"]), steps=int(rec["history_loss"].shape[0]),
                compile_s=float(rec["compile_s"]))
  snapshots = rec["snapshots"][:, perm]  # [S,B,T,H,W,C], matched like the final clips
  curve_psnr = metrics.psnr(snapshots.reshape(-1, *snapshots.shape[2:]),
                            np.concatenate([truth["clips"]] * len(snapshots)))
  result["curve"] = {"step": rec["snapshot_steps"], "objective": rec["snapshot_objectives"],
                     "psnr": np.asarray(curve_psnr).reshape(len(snapshots), -1).mean(axis=1)}
  result.update(perceptual_scores(rec["clips"][perm], truth["clips"]))
  if cfg.sr.method != "none":
    result["sr_metrics"] = sr_metrics(cfg, perm, truth["clips"], rec["clips"])
  report.write_json(rundir.path(cfg, "metrics.json"), result)
  matched = rec["clips"][perm]
  report.save_png(rundir.path(cfg, "truth.png"),
                  report.frame_grid(truth["clips"], scale=cfg.png_scale))
  report.save_png(rundir.path(cfg, "reconstruction.png"),
                  report.frame_grid(matched, scale=cfg.png_scale))
  report.comparison_gif(rundir.path(cfg, "comparison.gif"), truth["clips"], matched,
                        scale=cfg.png_scale, fps=cfg.gif_fps)
  logging.info("eval: PSNR %.2f dB (init %.2f dB), SSIM %.3f, label accuracy %s",
               result["psnr_mean"], result["psnr_init_mean"], result["ssim_mean"],
               result["label_accuracy"])
  return result


def clip_scores(clips: Any, truth: Any) -> dict[str, Any]:
  """PSNR, SSIM, LPIPS and temporal error per clip and their means: [B,T,H,W,C] x2 -> dict.

  LPIPS needs RGB: grayscale (C=1) is repeated to three channels; other C have no LPIPS.
  """
  scores = {"psnr": metrics.psnr(clips, truth), "ssim": metrics.ssim(clips, truth),
            "temporal_error": metrics.temporal_error(clips, truth)}
  channels = np.shape(clips)[-1]
  if channels in (1, 3):
    rgb = lambda x: np.repeat(np.asarray(x), 3 // channels, axis=-1)
    scores["lpips"] = lpips(rgb(clips), rgb(truth))
  out: dict[str, Any] = {}
  for name, values in scores.items():
    values = np.asarray(values, np.float64)
    out[name], out[f"{name}_mean"] = values.tolist(), float(values.mean())
  return out


def perceptual_scores(clips: Any, truth: Any) -> dict[str, Any]:
  """LPIPS and temporal error of matched clips [B,T,H,W,C] (per clip and mean)."""
  scores = clip_scores(clips, truth)
  return {k: v for k, v in scores.items() if k.startswith(("lpips", "temporal_error"))}


def sr_metrics(cfg: RunConfig, assignment: np.ndarray, truth: np.ndarray, reconstruction: np.ndarray
               ) -> dict[str, Any]:
  """Scores before (reconstruction.npz) and after SR (sr.npz) at the victim's resolution, with
  the clips matched to ground truth by `assignment` [B]."""
  after = rundir.require(cfg, "sr.npz", "sr")["clips"][assignment]
  return {"method": cfg.sr.method, "scale": sr_scale(cfg),
          "before": clip_scores(reconstruction[assignment], truth),
          "after": clip_scores(after, truth)}
