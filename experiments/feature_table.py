"""The feature sweep's table: one csv line per (seed, row), one markdown row per head with
mean ± std over seeds, and the test of whether recovery error grows with MLP depth. Free of
command-line flags (importable anywhere)."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from scipy import stats

from vidleak_jax import report

COLUMNS = ("pipeline", "head", "head_params", "feature_rel_error", "pooled_feature_rel_error",
           "feature_cosine", "psnr", "ssim", "psnr_end_to_end", "label_accuracy",
           "first_layer_sv_ratio", "seed")
DEPTH_ORDER = ("linear", "mlp1", "mlp2", "mlp3")  # MLP heads with 0, 1, 2, 3 hidden layers
_AVERAGED = ("feature_rel_error", "pooled_feature_rel_error", "feature_cosine", "psnr", "ssim",
             "psnr_end_to_end", "label_accuracy", "first_layer_sv_ratio")


def _format(column: str, value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.2f}" if column.startswith("psnr") else f"{value:.4g}"
  return str(value)


def average_over_seeds(rows: list[dict]) -> list[dict]:
  """One row per (pipeline, head), in first-seen order: `_AVERAGED` columns become (mean, std)
  over the rows that have them (std 0 for one seed); "seed" lists the seeds."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["pipeline"], row["head"]), []).append(row)
  out = []
  for group in groups.values():
    merged = {k: v for k, v in group[0].items() if k not in _AVERAGED}
    for column in _AVERAGED:
      values = [float(r[column]) for r in group if r.get(column) is not None]
      if values:
        merged[column] = (float(np.mean(values)), float(np.std(values)))
    merged["seed"] = "/".join(str(r["seed"]) for r in group if "seed" in r) or None
    out.append(merged)
  return out


def _cell(column: str, value) -> str:
  if isinstance(value, tuple):
    mean, std = value
    return _format(column, mean) + (f" ± {_format(column, std)}" if std else "")
  return _format(column, value)


def depth_trend(rows: list[dict], column: str = "feature_rel_error",
                pipeline: str | None = None) -> dict | None:
  """Does `column` grow with MLP depth? Page's L test for an increasing trend over DEPTH_ORDER,
  blocked by (pipeline, seed) (those that have all four heads; csv strings are accepted as numbers);
  with `pipeline`, over that pipeline's rows only.

  Returns seeds, the per-head mean and standard error [4], Page's L and its one-sided p-value,
  and in how many seeds the deepest head exceeds the linear one; None for fewer than two seeds.
  """
  by_seed: dict = {}
  for row in rows:
    if pipeline is not None and row.get("pipeline") != pipeline:
      continue
    if row.get("head") in DEPTH_ORDER and row.get(column) not in (None, ""):
      block = (row.get("pipeline"), str(row.get("seed")))  # one block per extractor and seed
      by_seed.setdefault(block, {})[row["head"]] = float(row[column])
  blocks = [[heads[h] for h in DEPTH_ORDER] for heads in by_seed.values()
            if len(heads) == len(DEPTH_ORDER)]
  if len(blocks) < 2:
    return None
  data = np.asarray(blocks)  # [seeds, 4]
  test = stats.page_trend_test(data)
  return {"seeds": len(blocks), "mean": data.mean(0).tolist(),
          "sem": (data.std(0, ddof=1) / np.sqrt(len(blocks))).tolist(),
          "page_l": float(test.statistic), "p_value": float(test.pvalue),
          "deepest_above_linear": int(np.sum(data[:, -1] > data[:, 0]))}


def _trend_line(trend: dict, column: str) -> str:
  means = " / ".join(f"{m:.3f}" for m in trend["mean"])
  sems = " / ".join(f"{s:.3f}" for s in trend["sem"])
  return (f"{column} vs MLP depth ({' → '.join(DEPTH_ORDER)}, {trend['seeds']} seeds): means "
          f"{means} (standard errors {sems}); Page's trend test for growth with depth L = "
          f"{trend['page_l']:.0f}, p = {trend['p_value']:.3g}; {DEPTH_ORDER[-1]} above "
          f"{DEPTH_ORDER[0]} in {trend['deepest_above_linear']} of {trend['seeds']} seeds.")


def write_tables(rows: list[dict], directory: str, name: str, caption: str) -> None:
  """<name>.csv (one line per row: per seed) and <name>.md (mean ± std over seeds, then the depth
  trend of the feature error, per pipeline, where two or more seeds have every MLP head),
  atomically."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows([{c: row.get(c, "") for c in COLUMNS} for row in rows])
  report.write_text(os.path.join(directory, f"{name}.csv"), buffer.getvalue())
  lines = [caption, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in COLUMNS) + " |"
            for row in average_over_seeds(rows)]
  pipelines = list(dict.fromkeys(r.get("pipeline") for r in rows if r.get("head") in DEPTH_ORDER))
  for pipeline in pipelines if len(pipelines) > 1 else [None]:
    trend = depth_trend(rows, pipeline=pipeline)
    if trend is not None:
      lines += ["", (f"{pipeline}: " if pipeline else "") + _trend_line(trend, "feature_rel_error")]
  report.write_text(os.path.join(directory, f"{name}.md"), "\n".join(lines) + "\n")
