"""The feature sweep's table: one csv line per (seed, row), one markdown row per head with
mean ± std over seeds. Free of command-line flags (importable anywhere)."""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from vidleak_jax import report

COLUMNS = ("pipeline", "head", "head_params", "feature_rel_error", "pooled_feature_rel_error",
           "feature_cosine", "psnr", "ssim", "psnr_end_to_end", "label_accuracy", "seed")
_AVERAGED = ("feature_rel_error", "pooled_feature_rel_error", "feature_cosine", "psnr", "ssim",
             "psnr_end_to_end", "label_accuracy")


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


def write_tables(rows: list[dict], directory: str, name: str, caption: str) -> None:
  """<name>.csv (one line per row: per seed) and <name>.md (mean ± std over seeds), atomically."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows([{c: row.get(c, "") for c in COLUMNS} for row in rows])
  report.write_text(os.path.join(directory, f"{name}.csv"), buffer.getvalue())
  lines = [caption, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in COLUMNS) + " |"
            for row in average_over_seeds(rows)]
  report.write_text(os.path.join(directory, f"{name}.md"), "\n".join(lines) + "\n")
