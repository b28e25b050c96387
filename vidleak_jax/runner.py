"""The experiment pipeline behind `experiments.main`: stages data → attack → sr → eval in a workdir.

Files in the workdir (all written atomically):
  config.json           every setting of the run
  data.npz              the client's private batch: clips [B,T,H,W,C] float32, labels [B], origins
  references.npz        attacker-side reference frames [k,H,W,C] of the same camera (may be k=0)
  shared_update.npz     what the client shares (gradient leaves keyed by parameter path)
  reconstruction.npz    the attacker's output (clips, labels, objective history, initial guess,
                        snapshots of the best clips so far for the curve); clips are at the
                        victim's resolution [B,T,H,W,C], clips_lowres [B,T,H/s,W/s,C] at the
                        attack's (`--attack_scale=s`; equal to clips for s=1)
  sr.npz                the sr stage's output (only with --sr): clips [B,T,H,W,C] at the victim's
                        resolution, inputs [B,T,H/s,W/s,C] (see `vidleak_jax.sr.stage`)
  metrics.jsonl, tb/    one log point per dispatch (see `logging_io`)
  checkpoints/          the attack's progress while it runs (see `attack.checkpoint`); a rerun
                        resumes from it; removed once reconstruction.npz is written
  metrics.json          PSNR / SSIM / LPIPS / temporal error per clip, PSNR / SSIM per frame,
                        label accuracy, curve (PSNR and objective per snapshot), sr_metrics
                        (before / after SR, with --sr); ground truth enters here
  truth.png, reconstruction.png, comparison.gif
  report.html           everything above in one self-contained page (after eval)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vidleak_jax import attack, features_pipeline, fl, logging_io, metrics, models, report
from vidleak_jax.attack import checkpoint
from vidleak_jax.data import sources
from vidleak_jax.fl import captured as captured_update
from vidleak_jax.report import html as html_report
from vidleak_jax.sr import stage as sr_stage
from vidleak_jax.tree_io import flatten_tree, unflatten_like

STAGES = ("pretrain", "data", "attack", "sr", "eval")  # pretrain: feature pipeline only
# jax.default_matmul_precision values; "highest" keeps float32 products exact to float32 on GPUs
# (their "default" may use TF32 passes, which blurs the gradients an attack matches).
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """All settings of one run; `experiments.main` fills it from flags."""

  workdir: str
  stages: Sequence[str] = STAGES
  seed: int = 0
  data: str = "synthetic"  # see `vidleak_jax.data.sources`
  clip_shape: tuple[int, int, int, int] = (4, 16, 16, 3)  # T, H, W, C
  frame_stride: int = 1
  references: int = 0
  tfds_dir: str | None = None
  data_split: str = "train"
  batch_size: int = 1
  num_classes: int = 4
  victim: str = "c3d"
  victim_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  update: str = "fedsgd"
  local_steps: int = 1
  local_lr: float = 0.1
  known_labels: bool = False
  gradients: str | None = None  # a captured update to attack instead of the client's
  attack: attack.AttackConfig = attack.AttackConfig()
  png_scale: int = 4
  gif_fps: float = 4.0
  quiet: bool = False
  checkpoint_every: int = 1  # dispatches (of attack.log_every steps) between checkpoints
  matmul_precision: str = "highest"  # float32 dots/convs: "default" allows TF32/bf16 passes on GPU
  pipeline: str = "frames"  # or "features": frozen extractor + trained head
  features: features_pipeline.FeatureConfig = features_pipeline.FeatureConfig()
  sr: sr_stage.SRConfig = sr_stage.SRConfig()  # the sr stage runs only when sr.method != "none"

  def __post_init__(self):
    unknown = [s for s in self.stages if s not in STAGES]
    if unknown or not self.stages:
      raise ValueError(f"--stages: unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if len(self.clip_shape) != 4 or min(self.clip_shape) < 1:
      raise ValueError(f"--clip_shape expects T,H,W,C (4 positive integers), got {self.clip_shape}")
    models.VICTIMS.get(self.victim)
    sources.parse_data_spec(self.data)
    if self.frame_stride < 1 or self.references < 0:
      raise ValueError("--frame_stride must be >= 1 and --references >= 0")
    if self.checkpoint_every < 1:
      raise ValueError(f"--checkpoint_every must be >= 1 (dispatches), got {self.checkpoint_every}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"--matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got "
                       f"{self.matmul_precision!r}")
    if self.update not in ("fedsgd", "fedavg"):
      raise ValueError(f"--update must be fedsgd or fedavg, got {self.update!r}")
    if self.sr.method not in ("none", "bicubic", "lanczos3") and self.clip_shape[3] != 3:
      raise ValueError(f"--sr={self.sr.method} networks are trained on RGB frames; clips have "
                       f"C={self.clip_shape[3]} channels (use --sr=bicubic or lanczos3)")
    features_pipeline.validate(self)


def _keys(seed: int) -> dict[str, jax.Array]:
  """One seed, split once by purpose."""
  data_key, victim_key, attack_key = jax.random.split(jax.random.key(seed), 3)
  return {"data": data_key, "victim": victim_key, "attack": attack_key}


def _path(cfg: RunConfig, name: str) -> str:
  return os.path.join(cfg.workdir, name)


def _require(cfg: RunConfig, name: str, stage: str) -> dict[str, np.ndarray]:
  path = _path(cfg, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the {stage!r} stage first (--stages)")
  return report.load_npz(path)


def build_victim(cfg: RunConfig):
  """(apply_fn, params) of the victim model, initialised from the run's seed."""
  if cfg.pipeline == "features":
    return features_pipeline.build_victim(cfg)[:2]
  t, h, w, c = cfg.clip_shape
  module = models.create(cfg.victim, _keys(cfg.seed)["victim"], frames=t, height=h, width=w,
                         channels=c, num_classes=cfg.num_classes, **cfg.victim_kwargs)
  return models.pure(module)


def stage_data(cfg: RunConfig) -> None:
  """Loads the client's private batch and the attacker's reference frames."""
  t, h, w, c = cfg.clip_shape
  batch = sources.load_client_batch(
      _keys(cfg.seed)["data"], cfg.data, batch_size=cfg.batch_size,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      num_references=cfg.references, tfds_dir=cfg.tfds_dir, split=cfg.data_split)
  _save(cfg, "data.npz", clips=batch.clips, labels=batch.labels,
        origins=np.asarray(batch.origins))
  _save(cfg, "references.npz", frames=batch.references)
  logging.info("data: %d clip(s) of %s from %s, labels %s, %d reference frame(s)",
               cfg.batch_size, cfg.clip_shape, cfg.data, batch.labels.tolist(),
               len(batch.references))


def client_side(cfg: RunConfig, apply_fn, params, clips, labels):
  """The honest client's shared update (FedSGD gradient or FedAvg parameter delta)."""
  if cfg.update == "fedsgd":
    return jax.jit(fl.client_update, static_argnums=0)(apply_fn, params, clips, labels)
  return jax.jit(fl.fedavg_update, static_argnums=0, static_argnames=("local_steps",))(
      apply_fn, params, clips, labels, local_steps=cfg.local_steps, learning_rate=cfg.local_lr)


def stage_attack(cfg: RunConfig, captured=None) -> None:
  """Client computes its update (or `captured` is given); the attacker sees only (model, params,
  update) and inverts it."""
  if cfg.pipeline == "features":
    return features_pipeline.stage_attack(cfg, captured)
  apply_fn, params = build_victim(cfg)
  known = None
  if captured is None:
    batch = _require(cfg, "data.npz", "data")
    clips, labels = jnp.asarray(batch["clips"]), jnp.asarray(batch["labels"])
    if clips.shape[1:] != tuple(cfg.clip_shape) or clips.shape[0] != cfg.batch_size:
      raise ValueError(f"data.npz holds clips of shape {clips.shape}, but --clip_shape/"
                       f"--batch_size ask for {(cfg.batch_size, *cfg.clip_shape)}: rerun the "
                       f"'data' stage")
    shared = flatten_tree(client_side(cfg, apply_fn, params, clips, labels))
    _save(cfg, "shared_update.npz", **shared)
    known = labels if cfg.known_labels else None
  else:
    shared = flatten_tree(captured)

  # --- attacker side: from here on only public information and the shared update ---
  shared = unflatten_like(params, shared, name="shared_update.npz")
  clip_shape = (cfg.batch_size, *cfg.clip_shape)
  references = None
  if cfg.attack.init == "reference" or cfg.attack.param == "background_residual":
    references = _require(cfg, "references.npz", "data")["frames"]
    if len(references) == 0 and cfg.attack.init == "reference":
      raise ValueError("--init=reference needs reference frames: rerun the 'data' stage with "
                       "--references=k (k >= 1)")
  checkpoints = _path(cfg, "checkpoints")
  with checkpoint.stop_on_sigterm() as stop, logging_io.AttackLog(
      cfg.workdir, quiet=cfg.quiet, write=_is_writer()) as log:
    rec = attack.reconstruct(_keys(cfg.seed)["attack"], apply_fn, params, shared,
                             clip_shape=clip_shape, labels=known, config=cfg.attack,
                             progress=log, references=references, checkpoint_dir=checkpoints,
                             checkpoint_every=cfg.checkpoint_every, should_stop=stop.is_set)
  _save(cfg, "reconstruction.npz", clips=np.asarray(rec.clips), clips_lowres=rec.clips_lowres,
        labels=np.asarray(rec.labels), loss=np.asarray(rec.loss),
        restart_losses=rec.restart_losses, init_clips=rec.init_clips,
        compile_s=np.asarray(rec.compile_s), snapshot_steps=rec.snapshot_steps,
        snapshot_objectives=rec.snapshot_objectives, snapshots=rec.snapshots,
        **{f"history_{k}": v for k, v in rec.history.items()})
  if _is_writer():  # the outputs are written: the progress they hold is no longer needed
    shutil.rmtree(checkpoints, ignore_errors=True)
  logging.info("attack: objective %.5g (best of %d restarts), labels %s", rec.loss,
               cfg.attack.restarts, np.asarray(rec.labels).tolist())


def stage_eval(cfg: RunConfig) -> dict[str, Any]:
  """Scores the reconstruction against the private batch; writes metrics.json and pictures."""
  truth = _require(cfg, "data.npz", "data")
  rec = _require(cfg, "reconstruction.npz", "attack")
  feature_result = {}
  if cfg.pipeline == "features":  # the attack recovers features: clips follow their matching
    feature_result = features_pipeline.feature_metrics(cfg, rec, truth)
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
  result.update(sr_stage.perceptual_scores(rec["clips"][perm], truth["clips"]))
  if cfg.sr.method != "none":
    result["sr_metrics"] = sr_stage.sr_metrics(cfg, perm, truth["clips"], rec["clips"])
  report.write_json(_path(cfg, "metrics.json"), result)
  matched = rec["clips"][perm]
  report.save_png(_path(cfg, "truth.png"), report.frame_grid(truth["clips"], scale=cfg.png_scale))
  report.save_png(_path(cfg, "reconstruction.png"),
                  report.frame_grid(matched, scale=cfg.png_scale))
  report.comparison_gif(_path(cfg, "comparison.gif"), truth["clips"], matched,
                        scale=cfg.png_scale, fps=cfg.gif_fps)
  logging.info("eval: PSNR %.2f dB (init %.2f dB), SSIM %.3f, label accuracy %s",
               result["psnr_mean"], result["psnr_init_mean"], result["ssim_mean"],
               result["label_accuracy"])
  return result


def stage_sr(cfg: RunConfig) -> None:
  """Super-resolves the reconstruction into sr.npz (`vidleak_jax.sr.stage`; skipped for none)."""
  sr_stage.stage_sr(cfg, build_victim=build_victim, client_side=client_side)


def init_distributed(coordinator_address: str, num_processes: int | None,
                     process_id: int | None) -> None:
  """Joins a multi-process JAX run (GPU/TPU pods, clusters; CPU processes talk over gloo)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
               jax.device_count())


def _is_writer() -> bool:
  return jax.process_index() == 0


def _save(cfg: RunConfig, name: str, **arrays) -> None:
  """Process 0 writes `name` in the workdir; the others compute the same values."""
  if _is_writer():
    report.save_npz(_path(cfg, name), **arrays)


def run(cfg: RunConfig, flag_values: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """Runs the selected stages in order; returns the metrics when `eval` ran.

  Under `jax.distributed` every process runs every stage (the attack is sharded over all
  devices), process 0 writes the files (the workdir must be on a shared filesystem), and the
  processes wait for each other between stages.
  """
  captured = None
  if cfg.gradients:  # validated before anything is written
    captured = captured_update.load_update(cfg.gradients, build_victim(cfg)[1])
  if _is_writer():
    os.makedirs(cfg.workdir, exist_ok=True)
    report.write_json(_path(cfg, "config.json"), flag_values or dataclasses.asdict(cfg))
  with jax.default_matmul_precision(cfg.matmul_precision):
    result = _run_stages(cfg, captured)
  if "eval" in cfg.stages and _is_writer():
    logging.info("report: %s", html_report.write_run_report(cfg.workdir))
  return result


def _run_stages(cfg: RunConfig, captured) -> dict[str, Any] | None:
  result = None
  for stage in STAGES:
    if stage not in cfg.stages:
      continue
    if stage not in ("sr", "eval") or _is_writer():  # host-side work on the written files
      start = time.perf_counter()
      if stage == "attack":
        result = stage_attack(cfg, captured)
      else:
        result = {"pretrain": features_pipeline.stage_pretrain, "data": stage_data,
                  "sr": stage_sr, "eval": stage_eval}[stage](cfg)
      logging.info("stage %s done in %.1fs", stage, time.perf_counter() - start)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vidleak_jax stage {stage}")
  return result
