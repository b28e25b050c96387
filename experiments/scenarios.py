r"""Scenario table: reference frames {0, 1, k} × super-resolution, on synthetic and real video.

  python -m experiments.scenarios --out=runs/scenarios --table=experiments/results/scenarios.md

For every data source, reference count and seed one attack runs (data + attack stages) at
`--attack_scale` below the victim's resolution; with references the attack uses the reference
prior (median background + penalised residual, initialised at the background). Every SR method
then runs on that same reconstruction (sr + eval stages in a sub-directory): none (the attack's
own bicubic decoding), bicubic, learned (generic network, trained once and shared through its
checkpoint), adapted (fine-tuned on the references; needs k >= 1) and restoration (fine-tuned on
simulated attacks). Cells whose metrics.json exists are skipped, so an interrupted run resumes.
The markdown table (mean ± std over seeds of PSNR / SSIM / LPIPS at the victim's resolution) is
rewritten atomically after every cell.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
from absl import app, flags, logging

from experiments import cli
from vidleak_jax import attack, pipeline, report, sr

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/scenarios", "Directory of the runs.")
flags.DEFINE_string("table", "experiments/results/scenarios.md", "Markdown table to write.")
flags.DEFINE_list("sources", ["synthetic", "shipped:carphone_pristine"], "Data sources.")
flags.DEFINE_list("reference_counts", ["0", "1", "4"], "Reference-frame counts.")
flags.DEFINE_list("sr_methods", ["none", "bicubic", "learned", "adapted", "restoration"],
                  "SR methods (learned = the generic --sr_model network).")
flags.DEFINE_integer("seeds", 3, "Seeds 0..n-1 per cell.", lower_bound=1)
flags.DEFINE_list("shape", ["4", "32", "32", "3"], "Clip shape T,H,W,C.")
flags.DEFINE_integer("scale", 2, "Attack resolution divisor.")
flags.DEFINE_integer("attack_steps", 80, "Attack steps (L-BFGS, l2 matching).", lower_bound=1)
flags.DEFINE_string("network", "espcn", "Network of learned / adapted / restoration.")
flags.DEFINE_integer("train_steps", 300, "Generic SR training steps (once).", lower_bound=1)
flags.DEFINE_integer("finetune_steps", 100, "Fine-tuning steps.", lower_bound=1)
flags.DEFINE_integer("simulations", 1, "Simulated attacks per restoration.", lower_bound=1)
flags.DEFINE_integer("simulation_steps", 40, "Steps per simulated attack.", lower_bound=1)

METRICS = (("psnr_mean", "PSNR (dB)"), ("ssim_mean", "SSIM"), ("lpips_mean", "LPIPS"))


def base_config(data: str, references: int, seed: int, workdir: str) -> pipeline.RunConfig:
  """The attack of one (data, references, seed) cell."""
  t, h, w, c = (int(v) for v in FLAGS.shape)
  prior = dict(param="background_residual", init="reference", residual_l1=1e-2,
               residual_tv=1e-2) if references else {}
  config = attack.AttackConfig(optimizer="lbfgs", metric="l2", schedule="constant",
                               steps=FLAGS.attack_steps, log_every=FLAGS.attack_steps,
                               priors={"tv_spatial": 1e-4, "tv_temporal": 1e-4},
                               attack_scale=FLAGS.scale, **prior)
  return pipeline.RunConfig(workdir=workdir, seed=seed, data=data, clip_shape=(t, h, w, c),
                          frame_stride=2 if data.startswith("shipped:") else 1,
                          references=references, victim="c3d", attack=config, quiet=True)


def sr_config(method: str) -> sr.SRConfig:
  name = FLAGS.network if method == "learned" else method
  checkpoint = os.path.abspath(os.path.join(FLAGS.out, f"sr_{FLAGS.network}_x"
                                            f"{FLAGS.scale}"))
  return sr.SRConfig(method=name, model=FLAGS.network, steps=FLAGS.train_steps,
                     finetune_steps=FLAGS.finetune_steps, checkpoint=checkpoint,
                     simulations=FLAGS.simulations,
                     simulation_steps=FLAGS.simulation_steps)


def run_cell(base: pipeline.RunConfig, method: str) -> dict | None:
  """metrics.json of one SR method on the cell's reconstruction (None if not applicable)."""
  if method == "adapted" and base.references == 0:
    return None
  cfg = dataclasses.replace(base, workdir=os.path.join(base.workdir, f"sr-{method}"),
                            stages=("sr", "eval"), png_scale=2,
                            sr=sr.SRConfig() if method == "none" else sr_config(method))
  if pipeline.reuse.changed_settings(cfg) is None:  # not finished: the cell's inputs
    os.makedirs(cfg.workdir, exist_ok=True)
    for name in ("data.npz", "references.npz", "reconstruction.npz"):
      shutil.copyfile(os.path.join(base.workdir, name), os.path.join(cfg.workdir, name))
  metrics = pipeline.run_or_reuse(cfg)
  return metrics if method == "none" else metrics["sr_metrics"]["after"]


def _cell_text(values: list[float], digits: int) -> str:
  if not values:
    return "—"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def write_table(results: dict) -> None:
  """Markdown: one table per metric, rows (data, references), columns SR methods."""
  lines = ["# Reference frames × super-resolution (generated by `python -m experiments.scenarios`)",
           "", f"Clips {'×'.join(FLAGS.shape)}, C3D victim, FedSGD, L-BFGS l2 attack "
           f"({FLAGS.attack_steps} steps) at 1/{FLAGS.scale} resolution; references k > 0 use "
           f"the background + residual prior. SR: {FLAGS.network} trained {FLAGS.train_steps} "
           f"steps on generic frames; fine-tuning {FLAGS.finetune_steps} steps. Mean ± std "
           f"over seeds (n per cell in brackets), at the victim's resolution. 'none' is the "
           f"attack's own output (its differentiable bicubic upsampling).", ""]
  for key, title in METRICS:
    digits = 2 if key == "psnr_mean" else 3
    lines += [f"## {title}", "", "| data | refs | " + " | ".join(FLAGS.sr_methods) + " |",
              "|---|---|" + "---|" * len(FLAGS.sr_methods)]
    for data in FLAGS.sources:
      for k in FLAGS.reference_counts:
        cells = []
        for method in FLAGS.sr_methods:
          values = [m[key] for m in results.get((data, k, method), [])]
          n = f" ({len(values)})" if values else ""
          cells.append(_cell_text(values, digits) + n)
        lines.append(f"| {data} | {k} | " + " | ".join(cells) + " |")
    lines.append("")
  report.write_text(FLAGS.table, "\n".join(lines))


def validate_flags() -> None:
  """Every flag checked before anything runs: app.UsageError naming the first bad one."""
  methods = ("none", "learned", *sr.SR_METHODS.names())
  unknown = [m for m in FLAGS.sr_methods if m not in methods]
  if unknown or not FLAGS.sr_methods:
    raise app.UsageError(f"--sr_methods: unknown {unknown}; valid: {', '.join(methods)}")
  try:
    counts = [int(k) for k in FLAGS.reference_counts]
    shape = [int(v) for v in FLAGS.shape]
  except ValueError as e:
    raise app.UsageError(f"--reference_counts and --shape take integers: {e}") from None
  if not counts or min(counts) < 0:
    raise app.UsageError(f"--reference_counts must be integers >= 0, got {counts}")
  if len(shape) != 4:
    raise app.UsageError(f"--shape expects T,H,W,C, got {FLAGS.shape}")
  try:
    for data in FLAGS.sources:
      for k in counts:
        base = base_config(data, k, 0, FLAGS.out)
        for method in FLAGS.sr_methods:
          if method != "none":
            dataclasses.replace(base, sr=sr_config(method))  # RunConfig validates
  except (KeyError, ValueError) as e:
    raise app.UsageError(str(e).strip("'\"")) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  validate_flags()
  # Resumed runs reuse compiled attack steps.
  cli.enable_compilation_cache(os.path.join(FLAGS.out, "xla"), flag="out", min_compile_time_s=1.0)
  results: dict = {}
  for seed in range(FLAGS.seeds):  # seeds outermost: a partial run already covers every cell
    for data in FLAGS.sources:
      for k in FLAGS.reference_counts:
        workdir = os.path.join(FLAGS.out, data.replace(":", "_"), f"refs{k}", f"seed{seed}")
        base = base_config(data, int(k), seed, workdir)
        pipeline.run_or_reuse(dataclasses.replace(base, stages=("data", "attack")))
        for method in FLAGS.sr_methods:
          metrics = run_cell(base, method)
          if metrics is not None:
            results.setdefault((data, k, method), []).append(metrics)
          write_table(results)
        logging.info("scenario %s refs=%s seed=%d done", data, k, seed)


if __name__ == "__main__":
  app.run(main)
