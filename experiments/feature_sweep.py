r"""How much the feature pipeline leaks as the classifier grows: one table over heads.

  python -m experiments.feature_sweep --workdir=runs/feature_sweep

On the same synthetic clips (per seed of --seeds): the raw-frame attack (C3D victim, L-BFGS l2
gradient matching on pixels) and, for every head linear → mlp1 → mlp2 → mlp3 → conv1d → gru → transformer
on one frozen, locally pre-trained extractor, the feature attack (stage 1: feature matching;
stage 2: feature inversion through the extractor); `--end_to_end` adds the pixel attack through
extractor + head. A last row inverts the true features (stage 2 alone: what a perfect stage 1
would give). Writes <workdir>/<table_name>.md (mean ± std over seeds) and .csv (one line per
seed), atomically, and every run's directory <workdir>/seed_<s>/<name>/; a rerun in the same
workdir reuses every finished run of the same settings (so a killed sweep resumes, and adding
heads or --feature_attacks computes only the new runs). About 12 min per seed on a 2-core CPU at
the defaults (4×32×32 clips).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging

from experiments.feature_table import write_tables
from vidleak_jax import attack, metrics, pipeline, report
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.models import heads

flags.DEFINE_string("workdir", "runs/feature_sweep", "Output directory.")
flags.DEFINE_list("heads", list(heads.SWEEP_ORDER), "Heads, in order of complexity.")
flags.DEFINE_string("extractor", "resnet_small", "Frozen extractor.")
flags.DEFINE_list("clip_shape", ["4", "32", "32", "3"], "Clip shape T,H,W,C.")
flags.DEFINE_list("seeds", ["0"], "Seeds of clips, models and attacks; one table row per head "
                  "with mean ± std over seeds (each seed in <workdir>/seed_<s>).")
flags.DEFINE_bool("known_labels", False, "Give every attack the true labels (separates label "
                  "recovery from feature recovery).")
flags.DEFINE_integer("batch_size", 1, "Clips per client batch.", lower_bound=1)
flags.DEFINE_integer("num_classes", 4, "Classes of the synthetic clips and the heads (a linear "
                     "head on pooled features is identifiable only when batch_size < num_classes).",
                     lower_bound=2)
flags.DEFINE_integer("pretrain_steps", 300, "Extractor pre-training steps.", lower_bound=1)
flags.DEFINE_integer("match_steps", 300, "Stage 1 (feature matching) steps.", lower_bound=1)
flags.DEFINE_integer("match_restarts", 1, "Stage 1 starts optimised at once.", lower_bound=1)
flags.DEFINE_integer("invert_steps", 200, "Stage 2 (feature inversion) steps.", lower_bound=1)
flags.DEFINE_integer("raw_steps", 400, "Raw-frame attack steps.", lower_bound=1)
flags.DEFINE_list("feature_attacks", ["matching"], "Stage-1 attacks run per head: matching, and "
                  "for linear/MLP heads subspace and analytic (one table row each).")
flags.DEFINE_bool("end_to_end", False, "Also run the end-to-end pixel attack per head.")
flags.DEFINE_string("results_dir", None, "Also write the table there (e.g. experiments/results).")
flags.DEFINE_string("table_name", "feature_sweep", "File name (no suffix) of the .md/.csv table.")
FLAGS = flags.FLAGS
_DENSE_FIRST = ("linear", "mlp1", "mlp2", "mlp3")  # heads whose first layer is dense

def _pixel_attack(steps: int) -> attack.AttackConfig:
  """DLG-style pixel attack of the quickstart preset (L-BFGS, l2, light TV)."""
  return attack.AttackConfig(optimizer="lbfgs", metric="l2", schedule="constant", steps=steps,
                             priors={"tv_spatial": 1e-4, "tv_temporal": 1e-4}, log_every=50)


def _run(cfg: pipeline.RunConfig) -> dict:
  """The run's metrics: a killed sweep, or one rerun with more heads or attacks, computes only
  what is missing (`pipeline.run_or_reuse`)."""
  logging.info("sweep: %s", cfg.workdir)
  return pipeline.run_or_reuse(cfg)


def _rows(base: pipeline.RunConfig, workdir: str) -> list[dict]:
  raw = _run(dataclasses.replace(base, workdir=os.path.join(workdir, "raw_frames"),
                                 pipeline="frames", victim="c3d",
                                 victim_kwargs={"features": 32}))
  clips = report.load_npz(os.path.join(workdir, "raw_frames", "data.npz"))["clips"]
  rows = [{"pipeline": "frames (C3D)", "head": "-", "psnr": raw["psnr_mean"],
           "ssim": raw["ssim_mean"], "label_accuracy": raw["label_accuracy"]}]
  for head, feature_attack_name in _head_attacks():
    fc = dataclasses.replace(base.features, head=head, attack=feature_attack_name)
    name = head if feature_attack_name == "matching" else f"{head}_{feature_attack_name}"
    out = _run(dataclasses.replace(base, workdir=os.path.join(workdir, name), features=fc))
    batch = report.load_npz(os.path.join(workdir, name, "data.npz"))
    if not np.array_equal(batch["clips"], clips):
      raise RuntimeError(f"run {name!r} attacked different clips than the raw-frame run")
    victim = pipeline.feature_victim.build_feature_victim(dataclasses.replace(base, features=fc))
    label = (f"features ({fc.extractor})" if feature_attack_name == "matching" else
             f"features ({fc.extractor}, {feature_attack_name})")
    row = {"pipeline": label, "head": head,
           "head_params": sum(int(np.size(p)) for p in jax.tree.leaves(victim.params)),
           "feature_rel_error": out["feature_rel_error_mean"],
           "pooled_feature_rel_error": out["pooled_feature_rel_error_mean"],
           "feature_cosine": out["feature_cosine_mean"], "psnr": out["psnr_mean"],
           "ssim": out["ssim_mean"], "label_accuracy": out["label_accuracy"],
           "first_layer_sv_ratio": out.get("first_layer_sv_ratio")}
    if row["first_layer_sv_ratio"] is None and head in _DENSE_FIRST:  # run older than the metric
      row["first_layer_sv_ratio"] = pipeline.features.first_layer_separation(
          victim, jax.jit(victim.extract)(clips), batch["labels"])
    if FLAGS.end_to_end and feature_attack_name == "matching":
      e2e = _run(dataclasses.replace(
          base, workdir=os.path.join(workdir, f"{head}_end_to_end"),
          stages=("data", "attack", "eval"),
          features=dataclasses.replace(fc, attack="end_to_end")))
      row["psnr_end_to_end"] = e2e["psnr_mean"]
    rows.append(row)
  rows.append(_oracle_row(dataclasses.replace(base, workdir=os.path.join(workdir, FLAGS.heads[0])),
                          clips))
  return rows


def _head_attacks() -> list[tuple[str, str]]:
  """(head, stage-1 attack) pairs in table order: per attack, every head it applies to."""
  return [(head, name) for name in FLAGS.feature_attacks for head in FLAGS.heads
          if name == "matching" or head in _DENSE_FIRST]


def _oracle_row(cfg: pipeline.RunConfig, clips: np.ndarray) -> dict:
  """Stage 2 from the true features: the frame PSNR a perfect stage 1 would give (eval only)."""
  victim = pipeline.feature_victim.build_feature_victim(cfg)
  truth = jax.jit(victim.extract)(clips)
  found = feature_attack.invert_features(victim.extract, truth, np.full(clips.shape, 0.5,
                                                                         np.float32),
                                         cfg.features.inversion)
  return {"pipeline": f"features ({cfg.features.extractor})", "head": "true features",
          "feature_rel_error": 0.0, "pooled_feature_rel_error": 0.0, "feature_cosine": 1.0,
          "psnr": float(metrics.psnr(found.value, clips).mean()),
          "ssim": float(metrics.ssim(found.value, clips).mean())}


def _base_config(workdir: str, seed: int, shape: tuple[int, ...]) -> pipeline.RunConfig:
  """The sweep's settings for one seed (its own extractor, pre-trained with that seed)."""
  defaults = pipeline.FeatureConfig()
  return pipeline.RunConfig(
      workdir=workdir, seed=seed, clip_shape=shape, batch_size=FLAGS.batch_size,
      num_classes=FLAGS.num_classes,
      pipeline="features", attack=_pixel_attack(FLAGS.raw_steps), quiet=True,
      known_labels=FLAGS.known_labels,
      features=pipeline.FeatureConfig(
          extractor=FLAGS.extractor,
          extractor_dir=os.path.join(workdir, f"extractor_{FLAGS.extractor}"),
          matching=dataclasses.replace(defaults.matching, steps=FLAGS.match_steps,
                                       restarts=FLAGS.match_restarts),
          inversion=dataclasses.replace(defaults.inversion, steps=FLAGS.invert_steps),
          pretrain=dataclasses.replace(defaults.pretrain, steps=FLAGS.pretrain_steps)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  if not FLAGS.heads:
    raise app.UsageError(f"--heads needs at least one of {', '.join(heads.SWEEP_ORDER)}")
  try:
    shape = tuple(int(v) for v in FLAGS.clip_shape)
  except ValueError:
    raise app.UsageError(f"--clip_shape expects T,H,W,C, got {FLAGS.clip_shape}") from None
  try:
    seeds = [int(v) for v in FLAGS.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds expects a comma list of integers, got {FLAGS.seeds}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds needs distinct integers, got {FLAGS.seeds}")
  unknown = set(FLAGS.feature_attacks) - {"matching", "subspace", "analytic"}
  if unknown or not FLAGS.feature_attacks:
    raise app.UsageError(f"--feature_attacks: unknown {sorted(unknown)} or none; valid: "
                         "matching, subspace, analytic")
  workdir = os.path.abspath(FLAGS.workdir)
  rows = []
  try:
    for head in FLAGS.heads:
      heads.HEADS.get(head)
    for seed in seeds:
      seed_dir = os.path.join(workdir, f"seed_{seed}")
      base = _base_config(seed_dir, seed, shape)
      rows += [dict(row, seed=seed) for row in _rows(base, seed_dir)]
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
  labels = "true labels given" if FLAGS.known_labels else "labels recovered"
  caption = (f"Feature-pipeline leakage vs classifier complexity: {FLAGS.extractor} extractor, "
             f"synthetic clips {'×'.join(map(str, shape))}, B={FLAGS.batch_size}, "
             f"{FLAGS.num_classes} classes, {labels}, "
             f"seeds {'/'.join(map(str, seeds))} (mean ± std); stage 1 "
             f"({'/'.join(FLAGS.feature_attacks)}; {FLAGS.match_steps} L-BFGS steps, "
             f"{FLAGS.match_restarts} restart(s)), stage 2 "
             f"feature inversion ({FLAGS.invert_steps}); raw frames: C3D, {FLAGS.raw_steps} "
             f"L-BFGS steps. "
             f"pooled_feature_rel_error: error of the time-mean features.")
  for directory in {workdir, FLAGS.results_dir or workdir}:
    write_tables(rows, directory, FLAGS.table_name, caption)
  print(open(os.path.join(workdir, f"{FLAGS.table_name}.md"), encoding="utf-8").read())


if __name__ == "__main__":
  app.run(main)
