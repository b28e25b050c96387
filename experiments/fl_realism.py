r"""How much video leaks in a realistic FL round: batch size, FedAvg local steps, a trained global
model and secure aggregation over N clients, one axis at a time.

  python -m experiments.fl_realism --out=runs/fl_realism \
      --table=experiments/results/fl_realism.md

Every cell is a full run (train, data, attack, eval) of the quickstart attack (L-BFGS, l2
matching, recovered labels) through `pipeline.run_or_reuse`: a finished cell is reused, a cell
another process holds is skipped (start the command twice to split the work), an interrupted
attack resumes from its checkpoints. Cells are listed in `CELLS`; `--cells` picks some. The
markdown table (mean ± std over seeds of PSNR / SSIM / LPIPS / label accuracy, and the trained
model's test accuracy) is rewritten after every run, and a plot of PSNR per cell goes next to it.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from absl import app, flags, logging

from experiments import cli, studies
from vidleak_jax import attack, fl, pipeline, report
from vidleak_jax import io as vio
from vidleak_jax.report import plots
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import TrainConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/fl_realism", "Directory of the runs.")
flags.DEFINE_string("table", "experiments/results/fl_realism.md", "Markdown table to write.")
flags.DEFINE_list("victims", ["c3d", "frame_cnn"], "Victims.")
flags.DEFINE_list("sources", ["synthetic", "shipped:carphone_pristine"], "Data sources.")
flags.DEFINE_list("cells", [], "Cells to run (default: all of CELLS).")
flags.DEFINE_integer("seeds", 3, "Seeds 0..n-1 per cell.", lower_bound=1)
flags.DEFINE_integer("attack_steps", 400, "L-BFGS steps per attack.", lower_bound=1)
flags.DEFINE_integer("restarts", 1, "Attack restarts.", lower_bound=1)
flags.DEFINE_integer("rounds", 30, "FedAvg rounds of the trained-model cells.", lower_bound=1)
flags.DEFINE_bool("table_only", False, "Only rebuild the table and plot from the finished runs.")

METRICS = (("psnr_mean", "PSNR (dB)", 2), ("ssim_mean", "SSIM", 3), ("lpips_mean", "LPIPS", 3),
           ("label_accuracy", "label acc.", 2))


class Cell(NamedTuple):
  """One setting: its axis, the value shown, and the RunConfig fields it sets."""

  axis: str
  value: str
  fields: dict[str, Any]


def _fedavg(epochs: int, batch: int, **more) -> dict[str, Any]:
  return {"update": "fedavg", "local": fl.LocalTraining(epochs=epochs, batch_size=batch), **more}


CELLS = {
    **{f"B{b}": Cell("batch size B (FedSGD)", str(b), {"batch_size": b}) for b in (1, 2, 4, 8, 16)},
    # B = 4 clips, b = 2: local steps = epochs × 2 (1 step: one full batch, FedSGD-like).
    "steps1": Cell("FedAvg local steps (B = 4)", "1", {"batch_size": 4, **_fedavg(1, 0)}),
    "steps4": Cell("FedAvg local steps (B = 4)", "4", {"batch_size": 4, **_fedavg(2, 2)}),
    "steps16": Cell("FedAvg local steps (B = 4)", "16", {"batch_size": 4, **_fedavg(8, 2)}),
    "steps4_unknown_order": Cell("FedAvg local steps (B = 4)", "4, order unknown",
                                 {"batch_size": 4, **_fedavg(2, 2), "replay": "full_batch"}),
    "steps4_fedsgd_attack": Cell("FedAvg local steps (B = 4)", "4, FedSGD attack",
                                 {"batch_size": 4, **_fedavg(2, 2), "replay": "fedsgd"}),
    # ReLU victims (the sigmoid ones do not train: README, realistic FL), untrained and after
    # FLAGS.rounds FedAvg rounds; the attacked round is FedSGD on B = 1 and FedAvg on B = 4.
    "relu_B1": Cell("ReLU victim, trained rounds (B = 1, FedSGD)", "0",
                    {"batch_size": 1, "relu": True}),
    "relu_trained_B1": Cell("ReLU victim, trained rounds (B = 1, FedSGD)", "r",
                            {"batch_size": 1, "relu": True, "rounds": True}),
    "relu_steps4": Cell("ReLU victim, trained rounds (B = 4, 4 local steps)", "0",
                        {"batch_size": 4, **_fedavg(2, 2), "relu": True}),
    "relu_trained_steps4": Cell("ReLU victim, trained rounds (B = 4, 4 local steps)", "r",
                                {"batch_size": 4, **_fedavg(2, 2), "relu": True,
                                 "rounds": True}),
    # N clients of B = 1, 4 local steps each; the server sees only their mean update.
    "clients1": Cell("clients N (B = 1, 4 local steps)", "1", {"batch_size": 1, **_fedavg(4, 0)}),
    "clients4": Cell("clients N (B = 1, 4 local steps)", "4",
                     {"batch_size": 1, "clients": 4, **_fedavg(4, 0)}),
}

VICTIM_KWARGS = {"c3d": {"features": 32}, "frame_cnn": {"features": 32, "pooling": "mean"}}
# The ReLU victims train; a mean over frames cannot see motion direction (the synthetic classes):
# the ReLU frame CNN with mean pooling stayed at 0.29 ± 0.04 test accuracy, with its frames'
# features concatenated it trains (README).
RELU_VICTIM_KWARGS = {"frame_cnn": {"pooling": "concat"}}


def cell_config(name: str, victim: str, data: str, seed: int) -> pipeline.RunConfig:
  """The RunConfig of one (cell, victim, data source, seed)."""
  fields = dict(CELLS[name].fields)
  replay, trained = fields.pop("replay", "order"), fields.pop("rounds", False)
  relu = fields.pop("relu", False)
  victim_kwargs = dict(VICTIM_KWARGS[victim], activation="relu" if relu else "sigmoid",
                       **(RELU_VICTIM_KWARGS.get(victim, {}) if relu else {}))
  config = attack.AttackConfig(optimizer="lbfgs", lbfgs_memory=100, init="gray", metric="l2",
                               schedule="constant", steps=FLAGS.attack_steps, log_every=50,
                               restarts=FLAGS.restarts, replay=replay,
                               priors={"tv_spatial": 1e-3, "tv_temporal": 1e-3})
  train = TrainConfig(rounds=FLAGS.rounds if trained else 0, clients=8, client_clips=8,
                      test_clips=128)
  if victim_kwargs["activation"] == "relu":  # the population's (and the client's) training
    fields["local"] = studies.RELU_LOCAL
  workdir = os.path.join(FLAGS.out, victim, data.replace(":", "_"), name, f"seed{seed}")
  return pipeline.RunConfig(
      workdir=workdir, seed=seed, data=data, clip_shape=(8, 24, 24, 3),
      frame_stride=2 if data.startswith("shipped:") else 1, num_classes=4, victim=victim,
      victim_kwargs=victim_kwargs, attack=config, train=train, quiet=True, **fields)


def _train_accuracy(cfg: pipeline.RunConfig) -> float | None:
  path = rundir.path(cfg, "train.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)["final_test_accuracy"]


def _sources() -> list[str]:
  return list(dict.fromkeys([*flags.FLAGS["sources"].default, *FLAGS.sources]))


def collect() -> dict:
  """(victim, data, cell) -> [(metrics, test accuracy or None)] of every finished run on disk
  (whichever process ran it, for any victim and the default or given sources), seeds in
  order."""
  results: dict = {}
  for victim in VICTIM_KWARGS:
    for data in _sources():
      for name in CELLS:
        for seed in range(FLAGS.seeds):
          cfg = cell_config(name, victim, data, seed)
          if pipeline.reuse.changed_settings(cfg) == []:  # finished, with these settings
            with open(rundir.path(cfg, "metrics.json"), encoding="utf-8") as f:
              metrics = json.load(f)
            results.setdefault((victim, data, name), []).append((metrics, _train_accuracy(cfg)))
  return results


def write_table(results: dict) -> None:
  """Markdown: per victim and source, one row per cell, mean ± std (n) of every metric, and the
  PSNR plot next to it."""
  lines = [
      "# Leakage in a realistic FL round (generated by `python -m experiments.fl_realism`)", "",
      f"Clips 8×24×24×3, 4 classes; victims with 32 features (C3D, frame CNN with mean "
      f"pooling; the ReLU frame CNN concatenates its frames' features instead, since a mean "
      f"over frames cannot learn the motion direction that the synthetic classes are), sigmoid "
      f"activations unless ReLU is stated; FedAvg clients: SGD lr 0.1 "
      f"(ReLU: 2 epochs, b = 2, lr 0.05). Attack (the batch4 preset's): L-BFGS with memory "
      f"100, l2 update matching, grey start, TV 1e-3, {FLAGS.attack_steps} steps, "
      f"{FLAGS.restarts} restart(s), labels recovered from the update. FedAvg cells replay "
      f"the clients' local training in its mini-batch order unless stated. Trained (r): "
      f"{FLAGS.rounds} FedAvg rounds of 8 clients × 8 synthetic clips of other cameras "
      f"before the attacked round; test acc. on 128 held-out clips (chance 0.25). Mean ± std "
      f"over seeds (n).", ""]
  header = ["axis", "setting"] + [title for _, title, _ in METRICS] + ["test acc."]
  for victim in VICTIM_KWARGS:
    for data in _sources():
      if not any(key[:2] == (victim, data) for key in results):
        continue
      lines += [f"## {victim}, {data}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
      for name in CELLS:
        runs = results.get((victim, data, name), [])
        row = [CELLS[name].axis, CELLS[name].value]
        row += [studies.summary([m[key] for m, _ in runs], digits)
                for key, _, digits in METRICS]
        row.append(studies.summary([a for _, a in runs if a is not None], 2))
        lines.append("| " + " | ".join(row) + " |")
      lines.append("")
  plot = os.path.splitext(FLAGS.table)[0] + ".png"
  lines += [f"![PSNR per axis]({os.path.basename(plot)})", ""]
  report.write_text(FLAGS.table, "\n".join(lines))
  panels: dict = {}  # results are keyed in CELLS order: so are the settings on every axis
  for (victim, data, name), runs in results.items():
    panel = panels.setdefault(CELLS[name].axis, {})
    panel.setdefault(f"{victim}, {data}", []).append(
        (CELLS[name].value, [m["psnr_mean"] for m, _ in runs]))
  vio.write_bytes(plot, plots.study_png(panels, "PSNR (dB)"))


def main(argv):
  cells = studies.selected_cells(argv, FLAGS.cells, CELLS)
  try:
    for victim in FLAGS.victims:
      for data in FLAGS.sources:
        for name in cells:
          cell_config(name, victim, data, 0)  # RunConfig validates every setting
  except (KeyError, ValueError) as e:
    raise app.UsageError(str(e).strip("'\"")) from None
  if FLAGS.table_only:
    write_table(collect())
    return
  cli.enable_compilation_cache(os.path.join(FLAGS.out, "xla"), flag="out", min_compile_time_s=1.0)
  for seed in range(FLAGS.seeds):  # seeds outermost: a partial run already covers every cell
    for victim in FLAGS.victims:
      for data in FLAGS.sources:
        for name in cells:
          cfg = cell_config(name, victim, data, seed)
          try:
            metrics = pipeline.run_or_reuse(cfg)
          except pipeline.RunDirBusy as e:
            logging.warning("skipped: %s", e)
            continue
          write_table(collect())
          logging.info("fl_realism %s %s %s seed %d: PSNR %.2f dB", victim, data, name, seed,
                       metrics["psnr_mean"])

if __name__ == "__main__":
  app.run(main)
