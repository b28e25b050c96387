r"""Leakage against utility under client defences: DP-SGD (with its ε), pruning, quantisation,
Soteria and secure aggregation, one family at a time over its strength.

  python -m experiments.defenses --out=runs/defenses --table=experiments/results/defenses.md

Per cell and seed, two runs through `pipeline.run_or_reuse` (finished runs are reused, a run
another process holds is skipped, an interrupted one resumes):
  leakage  the quickstart victim (sigmoid C3D, the attack-friendly worst case) attacked on one
           client's FedSGD update of B = 1 clip under the defence, labels recovered, by the attack
           that adapts to it (`pipeline.clients.attacker_update_fn`);
  utility  a ReLU C3D (the sigmoid victims do not train) trained for --rounds FedAvg rounds by 8
           clients of 8 clips (`studies.RELU_LOCAL`), each defending its update the same way
           (DP-SGD in every local step); its test accuracy.
The markdown table (mean ± std over seeds) and a leakage-against-utility plot are rewritten after
every run. Secure aggregation leaves the trained model unchanged (its utility is the undefended
one's); Soteria's utility is trained on a smaller model only (SMALL_UTILITY).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags, logging

from experiments import cli, config_flags, studies
from vidleak_jax import attack, models, pipeline, report
from vidleak_jax import io as vio
from vidleak_jax.pipeline import rundir, train
from vidleak_jax.pipeline.config import TrainConfig
from vidleak_jax.report import plots

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/defenses", "Directory of the runs.")
flags.DEFINE_string("table", "experiments/results/defenses.md", "Markdown table to write.")
flags.DEFINE_list("sources", ["synthetic", "shipped:carphone_pristine"],
                  "Data sources of the attacked clip.")
flags.DEFINE_list("cells", [], "Cells to run (default: all of CELLS).")
flags.DEFINE_integer("seeds", 3, "Seeds 0..n-1 per cell.", lower_bound=1)
flags.DEFINE_integer("attack_steps", 400, "L-BFGS steps per attack.", lower_bound=1)
flags.DEFINE_integer("rounds", 30, "FedAvg rounds that train the utility model.", lower_bound=1)
flags.DEFINE_bool("utility", True, "Also train the utility models.")
flags.DEFINE_bool("features", True, "Also attack the feature pipeline (the features_resnet_small "
                  "preset: a frozen per-frame ResNet pre-trained once per seed, only an MLP head "
                  "in FL; stage-1 "
                  "feature matching adapted to the defence) in the cells of FEATURE_CELLS.")
flags.DEFINE_bool("table_only", False, "Only rebuild the table and plot from the finished runs.")

CLIP = 10.0  # DP-SGD's clipping norm: below every per-example gradient norm at init (13–38)


class Cell(NamedTuple):
  """One setting: its family, the strength shown, the defence specs, and N clients."""

  family: str
  value: str
  defenses: tuple[str, ...]
  clients: int = 1


CELLS = {
    "none": Cell("none", "—", ()),
    **{f"dp_sgd_{s}": Cell(f"DP-SGD (C = {CLIP:g}), noise σ", str(s),
                           (f"dp_sgd:clip_norm={CLIP:g}:noise_multiplier={s}",))
       for s in (0, 1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0)},  # σ = 0: clipping alone
    **{f"prune_{p}": Cell("pruning (DLG), sparsity p", str(p), (f"prune:p={p}",))
       for p in (0.2, 0.5, 0.9, 0.99)},
    **{name: Cell("quantisation", label, (spec,)) for name, label, spec in (
        ("fp16", "fp16", "fp16"), ("int8", "int8", "int8"), ("qsgd_4", "QSGD s=4", "qsgd:s=4"),
        ("sign", "signSGD", "sign"))},
    **{f"soteria_{p}": Cell("Soteria, pruned features (%)", str(p), (f"soteria:percent={p}",))
       for p in (50, 80)},
    "secagg_4": Cell("secure aggregation, clients N", "4", (), clients=4),
}
METRICS = (("psnr_mean", "PSNR (dB)", 2), ("ssim_mean", "SSIM", 3), ("lpips_mean", "LPIPS", 3),
           ("label_accuracy", "label acc.", 2))
FEATURE_CELLS = ("none", "dp_sgd_0.0001", "dp_sgd_0.001", "dp_sgd_0.01", "prune_0.5", "prune_0.9",
                 "prune_0.99", "fp16", "int8", "sign", "soteria_80")
FEATURE_METRICS = (("feature_rel_error_mean", "feature rel. error", 3),
                   ("feature_cosine_mean", "feature cosine", 3), ("psnr_mean", "PSNR (dB)", 2),
                   ("label_accuracy", "label acc.", 2))
NO_UTILITY = {"secagg_4": "= none"}
# Cells whose utility is trained only on SMALL, a ReLU C3D whose classifier reads 512 features
# instead of 4,608 (the table reads the figure from the model): Soteria's exact Jacobian takes
# one reverse pass per feature, ~330 s per client and round for the standard model on 2 busy CPU
# cores (22 h a run), 1.8 s here. SMALL_UTILITY adds the small model's undefended reference.
SMALL_ONLY = ("soteria_50", "soteria_80")
SMALL_UTILITY = ("none", *SMALL_ONLY)
SMALL = {"clip_shape": (8, 16, 16, 3), "features": 8}


def _classifier_inputs(model: dict) -> int:
  """Inputs of the classifier (the head's kernel rows) of the ReLU C3D with `model`'s features on
  its clip shape."""
  t, h, w, c = model["clip_shape"]
  victim = models.create("c3d", jax.random.key(0), frames=t, height=h, width=w, channels=c,
                         num_classes=4, features=model["features"], activation="relu")
  return int(models.pure(victim)[1]["head"]["kernel"].shape[0])


def _base(workdir: str, seed: int, data: str, **fields: Any) -> pipeline.RunConfig:
  return pipeline.RunConfig(
      workdir=workdir, seed=seed, data=data, clip_shape=(8, 24, 24, 3),
      frame_stride=2 if data.startswith("shipped:") else 1, num_classes=4, victim="c3d",
      quiet=True, **fields)


def leakage_config(name: str, data: str, seed: int) -> pipeline.RunConfig:
  cell = CELLS[name]
  config = attack.AttackConfig(optimizer="lbfgs", lbfgs_memory=100, init="gray", metric="l2",
                               schedule="constant", steps=FLAGS.attack_steps, log_every=50,
                               priors={"tv_spatial": 1e-3, "tv_temporal": 1e-3})
  return _base(os.path.join(FLAGS.out, "leakage", data.replace(":", "_"), name, f"seed{seed}"),
               seed, data, victim_kwargs={"features": 32}, attack=config, batch_size=1,
               clients=cell.clients, defenses=cell.defenses)


def utility_config(name: str, seed: int, *, small: bool = False) -> pipeline.RunConfig:
  """The cell's utility run: the ReLU C3D (32 features, 8×24×24 clips; `small`: SMALL's) trained
  under its defence."""
  config = _base(os.path.join(FLAGS.out, "utility_small" if small else "utility", name,
                              f"seed{seed}"), seed, "synthetic",
                 victim_kwargs={"features": 32, "activation": "relu"}, stages=("train",),
                 train=TrainConfig(rounds=FLAGS.rounds, clients=8, client_clips=8,
                                   test_clips=128),
                 local=studies.RELU_LOCAL, defenses=CELLS[name].defenses)
  if not small:
    return config
  return dataclasses.replace(config, clip_shape=SMALL["clip_shape"],
                             victim_kwargs={**config.victim_kwargs, "features": SMALL["features"]})


def feature_config(name: str, seed: int) -> pipeline.RunConfig:
  """The features_resnet_small preset under the cell's defence; one extractor pre-trained per
  seed for all cells, in <out>/features/extractor_seed<seed>."""
  values = flags.FlagValues()
  config_flags.define_flags(values)
  out = os.path.join(FLAGS.out, "features")
  values(["defenses", "--flagfile=experiments/flags/features_resnet_small.flags", "--quiet",
          f"--workdir={os.path.join(out, name, f'seed{seed}')}", f"--seed={seed}",
          f"--extractor_dir={os.path.join(out, f'extractor_seed{seed}')}",
          f"--defenses={','.join(CELLS[name].defenses)}"])
  return config_flags.config_from_flags(values)


def standard_utility(name: str) -> bool:
  """Whether the cell's utility is trained on the standard ReLU C3D."""
  return name not in NO_UTILITY and name not in SMALL_ONLY


def _finished(cfg: pipeline.RunConfig) -> bool:
  return pipeline.reuse.changed_settings(cfg) == []


def _json(cfg: pipeline.RunConfig, name: str) -> dict:
  with open(rundir.path(cfg, name), encoding="utf-8") as f:
    return json.load(f)


def collect() -> tuple[dict, dict]:
  """((data, cell) -> [metrics per finished seed], cell -> [train.json per finished seed]); the
  feature pipeline's runs under data "features", the SMALL model's utility under ("small",
  cell)."""
  leaks: dict = {}
  utility: dict = {}
  for name in CELLS:
    for seed in range(FLAGS.seeds):
      for data in FLAGS.sources:
        cfg = leakage_config(name, data, seed)
        if _finished(cfg):
          leaks.setdefault((data, name), []).append(_json(cfg, "metrics.json"))
      cfg = feature_config(name, seed)
      if name in FEATURE_CELLS and _finished(cfg):
        leaks.setdefault(("features", name), []).append(_json(cfg, "metrics.json"))
      cfg = utility_config(name, seed)
      if standard_utility(name) and _finished(cfg):
        utility.setdefault(name, []).append(_json(cfg, train.TRAIN_FILE))
      cfg = utility_config(name, seed, small=True)
      if name in SMALL_UTILITY and _finished(cfg):
        utility.setdefault(("small", name), []).append(_json(cfg, train.TRAIN_FILE))
  return leaks, utility


def _epsilon(cfg: pipeline.RunConfig) -> str:
  """ε at train.DP_DELTA of the DP-SGD that `cfg` trains with (`train.training_epsilon`), or ""
  without DP."""
  eps = train.training_epsilon(cfg)
  return "" if eps is None else f"{eps:.3g}"


def _epsilons(name: str) -> tuple[str, str]:
  """(ε of the attacked FedSGD round: one step at sampling rate 1, ε of the utility model's
  training), "" without DP."""
  attacked = dataclasses.replace(leakage_config(name, FLAGS.sources[0], 0),
                                 train=TrainConfig(rounds=1, client_clips=1))
  return _epsilon(attacked), _epsilon(utility_config(name, 0))


def _accuracies(utility: dict, name: str, family: str = "") -> list[float]:
  """Final test accuracies of the cell's utility runs: the SMALL model's for Soteria's cells, and
  for "none" on Soteria's curve (`family`); secure aggregation's are the undefended model's."""
  small = name in SMALL_ONLY or (name == "none" and family.startswith("Soteria"))
  key = ("small", name) if small else ("none" if name == "secagg_4" else name)
  return [t["final_test_accuracy"] for t in utility.get(key, [])]


def _accuracy_cell(name: str, utility: dict) -> str:
  if name in NO_UTILITY:
    return NO_UTILITY[name]
  acc = studies.summary(_accuracies(utility, name), 2)
  return f"small model: {acc}" if name in SMALL_ONLY else acc


def write_table(leaks: dict, utility: dict) -> None:
  lines = [
      "# Leakage against utility under client defences (generated by "
      "`python -m experiments.defenses`)", "",
      f"Leakage: the quickstart victim (C3D, 32 features, sigmoid), one client's FedSGD update "
      f"of B = 1 clip 8×24×24×3 (secure aggregation: the mean of N clients' updates, the attack "
      f"on N clips), defended as stated; attack: L-BFGS (memory 100), l2 matching, grey start, "
      f"TV 1e-3, {FLAGS.attack_steps} steps, labels recovered from the update, adapted to the "
      f"defence (support-only matching for pruning and Soteria; the clipped noise-free "
      f"per-example mean for DP-SGD; quantised updates matched as received). Utility: a ReLU "
      f"C3D trained for {FLAGS.rounds} FedAvg rounds by 8 clients × 8 synthetic clips (2 local "
      f"epochs of mini-batches of 2, lr 0.05: {studies.RELU_LOCAL.steps(8)} local steps per "
      f"round), each defending its update the same way (DP-SGD: every local step clipped and "
      f"noised); test accuracy on 128 held-out clips (chance 0.25). ε: dp-accounting's RDP "
      f"accountant at δ = {train.DP_DELTA:g} for the attacked round (one step, sampling rate 1) "
      f"and for the utility model's training ({FLAGS.rounds} × {studies.RELU_LOCAL.steps(8)} "
      f"steps at rate 2/8, shuffled mini-batches accounted as Poisson sampling). Mean ± std "
      f"over seeds (n).", ""]
  header = (["family", "setting"] + [f"{title}, {_short(d)}" for d in FLAGS.sources
                                     for _, title, _ in METRICS[:2]]
            + [f"{t}, {_short(FLAGS.sources[0])}" for _, t, _ in METRICS[2:]]
            + ["test acc.", "ε (attacked round)", "ε (training)"])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  epsilons = {name: _epsilons(name) for name in CELLS}
  for name, cell in CELLS.items():
    row = [cell.family, cell.value]
    for data in FLAGS.sources:
      row += [studies.summary([m[k] for m in leaks.get((data, name), [])], d)
              for k, _, d in METRICS[:2]]
    row += [studies.summary([m[k] for m in leaks.get((FLAGS.sources[0], name), [])], d)
            for k, _, d in METRICS[2:]]
    row.append(_accuracy_cell(name, utility))
    row += list(epsilons[name])
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", f"Small model (Soteria's utility): the ReLU C3D with {SMALL['features']} features "
            f"on {'×'.join(map(str, SMALL['clip_shape']))} clips ({_classifier_inputs(SMALL)} "
            "classifier inputs), "
            f"trained the same way; undefended it reaches "
            f"{studies.summary(_accuracies(utility, 'none', 'Soteria'), 2)} test accuracy."]
  if any(data == "features" for data, _ in leaks):
    lines += ["", "## Feature pipeline", "",
              "The features_resnet_small preset (4×32×32 clips, a per-frame ResNet pre-trained "
              "here and frozen, an MLP head on the time-mean of its features trained in FL; "
              "stage-1 feature matching, 300 L-BFGS steps, adapted to the defence as above; "
              "stage 2 inverts the extractor), one client's FedSGD update of one clip. Features "
              "leak, frames do not (PSNR at its grey start's level even undefended).", "",
              "| family | setting | " + " | ".join(t for _, t, _ in FEATURE_METRICS) + " |",
              "|" + "---|" * (2 + len(FEATURE_METRICS))]
    for name in FEATURE_CELLS:
      runs = leaks.get(("features", name), [])
      lines.append("| " + " | ".join([CELLS[name].family, CELLS[name].value] + [
          studies.summary([m[k] for m in runs], d) for k, _, d in FEATURE_METRICS]) + " |")
  plot = os.path.splitext(FLAGS.table)[0] + ".png"
  lines += ["", *findings(leaks, utility), f"![leakage against utility]({os.path.basename(plot)})",
            ""]
  report.write_text(FLAGS.table, "\n".join(lines))
  curves: dict = {}
  data = FLAGS.sources[0]
  for name, cell in CELLS.items():
    runs = leaks.get((data, name), [])
    leak = {key: [m[key] for m in runs] for key in ("psnr_mean", "lpips_mean")}
    eps = epsilons[name][1]
    label = "none" if name == "none" else cell.value + (f", ε={eps}" if eps else "")
    families = ({cell.family} if name != "none" else
                {c.family for c in CELLS.values() if c.family != "none"})
    for family in sorted(families):
      curve = family + (" (utility: small model)" if family.startswith("Soteria") else "")
      curves.setdefault(curve, []).append((label, _accuracies(utility, name, family), leak))
  vio.write_bytes(plot, plots.tradeoff_png(curves, [
      ("psnr_mean", f"leakage: PSNR (dB), {_short(data)}"),
      ("lpips_mean", f"leakage: LPIPS (lower: closer), {_short(data)}")]))


STOPPED_DB = 3.0  # an attack "stopped": mean PSNR less than this above its grey start's


def _mean(runs: list[dict], key: str) -> float | None:
  return float(np.mean([r[key] for r in runs])) if runs else None


def findings(leaks: dict, utility: dict) -> list[str]:
  """Which of DLG's defence findings (Zhu et al. 2019, §5) hold here, from the synthetic cells
  (criterion: STOPPED_DB above the grey start's PSNR, fixed before any run)."""
  data = FLAGS.sources[0]

  def gain(name):  # mean PSNR gained over the grey start, None when not run
    runs = leaks.get((data, name), [])
    return None if not runs else _mean(runs, "psnr_mean") - _mean(runs, "psnr_init_mean")

  def describe(names):
    return ", ".join(f"{CELLS[n].value}: {gain(n):+.1f} dB" for n in names if gain(n) is not None)

  prunes = [n for n in CELLS if n.startswith("prune_") and gain(n) is not None]
  stops = [n for n in prunes if gain(n) < STOPPED_DB]
  lines = ["## DLG's findings on video", "",
           f"Criterion (fixed before the runs): an attack is stopped when its mean PSNR is less "
           f"than {STOPPED_DB:g} dB above that of its grey starting point (it recovers nothing "
           f"beyond the mean colour). PSNR gained over the start, {data}: none "
           f"{gain('none') if gain('none') is None else round(gain('none'), 1)} dB.", ""]
  if prunes:
    holds = stops and float(CELLS[stops[0]].value) <= 0.2
    lines.append(f"- *Pruning above ~20 % sparsity stops the attack*: "
                 f"{'holds' if holds else 'does not hold'} (sparsity {describe(prunes)}; "
                 f"stopped from p = {CELLS[stops[0]].value if stops else 'none tried'}).")
  if gain("fp16") is not None:
    verdict = "holds" if gain("fp16") >= STOPPED_DB else "does not hold"
    lines.append(f"- *fp16 does not stop it*: {verdict} (fp16 {gain('fp16'):+.1f} dB).")
  noises = [n for n in CELLS if n.startswith("dp_sgd_") and n != "dp_sgd_0"
            and gain(n) is not None]
  stopping = [n for n in noises if gain(n) < STOPPED_DB]
  accuracy = lambda name: _accuracies(utility, name)
  base, clip_only = accuracy("none"), accuracy("dp_sgd_0")
  if stopping and base and accuracy(stopping[0]):
    acc = accuracy(stopping[0])
    lower = lambda ref: np.mean(ref) - np.mean(acc) > np.std(ref) + np.std(acc)
    against_clip = (f"; clipping alone (σ = 0) trains to {np.mean(clip_only):.2f} ± "
                    f"{np.std(clip_only):.2f}, so the noise itself "
                    f"{'costs' if lower(clip_only) else 'does not cost'} accuracy"
                    if clip_only else "")
    lines.append(f"- *Noise large enough to stop it costs accuracy*: "
                 f"{'holds' if lower(base) else 'does not hold'} (DP-SGD σ {describe(noises)}; "
                 f"the first σ that stops it, {CELLS[stopping[0]].value}, trains to "
                 f"{np.mean(acc):.2f} ± {np.std(acc):.2f} test accuracy against "
                 f"{np.mean(base):.2f} ± {np.std(base):.2f} undefended{against_clip}; 'costs' = "
                 f"lower by more than both stds together).")
  elif noises:
    why = "its utility is not trained yet" if stopping else "no σ tried stops it"
    lines.append(f"- *Noise large enough to stop it costs accuracy*: not decided yet (DP-SGD σ "
                 f"{describe(noises)}; {why}).")
  return lines + [""]


def _short(data: str) -> str:
  return data.split(":")[-1]


def main(argv):
  cells = studies.selected_cells(argv, FLAGS.cells, CELLS)
  try:
    for name in cells:
      for data in FLAGS.sources:
        leakage_config(name, data, 0)  # RunConfig validates every setting
      utility_config(name, 0)
      utility_config(name, 0, small=True)
  except (KeyError, ValueError, app.UsageError) as e:
    raise app.UsageError(str(e).strip("'\"")) from None
  if FLAGS.table_only:
    write_table(*collect())
    return
  cli.enable_compilation_cache(os.path.join(FLAGS.out, "xla"), flag="out",
                               min_compile_time_s=1.0)
  for seed in range(FLAGS.seeds):  # seeds outermost: a partial run already covers every cell
    for name in cells:
      runs = [leakage_config(name, data, seed) for data in FLAGS.sources]
      if FLAGS.features and name in FEATURE_CELLS:
        runs.append(feature_config(name, seed))
      if FLAGS.utility and standard_utility(name):
        runs.append(utility_config(name, seed))
      if FLAGS.utility and name in SMALL_UTILITY:
        runs.append(utility_config(name, seed, small=True))
      for cfg in runs:
        try:
          pipeline.run_or_reuse(cfg)
        except pipeline.RunDirBusy as e:
          logging.warning("skipped: %s", e)
          continue
        write_table(*collect())
        logging.info("defenses %s seed %d: %s done", name, seed, cfg.workdir)


if __name__ == "__main__":
  app.run(main)
