r"""Merges the csv tables of several feature sweeps (e.g. run on different seeds) into one.

  python -m experiments.combine_feature_tables \
      --csv=runs/a/feature_sweep.csv,runs/b/feature_sweep.csv --out=experiments/results/depth \
      --caption="Feature-space recovery error vs MLP depth ..."

Writes <out>.csv (every line of the inputs) and <out>.md (mean ± std over all seeds and, when two
or more seeds have every MLP head, Page's trend test of the error over depth), atomically. A
(pipeline, head, seed) found in two inputs is an error: the same seed measured twice.
"""

from __future__ import annotations

import csv
import os
import sys

from absl import app, flags

from experiments.feature_table import COLUMNS, write_tables

_CSV = flags.DEFINE_list("csv", [], "Comma list of feature-sweep csv tables to merge.")
_OUT = flags.DEFINE_string("out", None, "Output path without suffix (.csv and .md are written).")
_CAPTION = flags.DEFINE_string("caption", "", "First line of the markdown table.")


_KEY = ("pipeline", "head", "seed")


def read_rows(paths: list[str]) -> list[dict]:
  """The rows of every csv in `paths`, in order; empty cells become None (so do columns a table
  written before them lacks). Raises ValueError for a file that is not a feature-sweep table or
  a (pipeline, head, seed) seen twice."""
  rows, seen = [], {}
  for path in paths:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      names = tuple(reader.fieldnames or ())
      if not set(_KEY) <= set(names) or not set(names) <= set(COLUMNS):
        raise ValueError(f"{path}: not a feature-sweep table (expected {','.join(_KEY)} among "
                         f"the columns {','.join(COLUMNS)}, got {','.join(names)})")
      for row in reader:
        key = tuple(row[k] for k in _KEY)
        if key in seen:
          raise ValueError(f"{path}: {key} is already in {seen[key]}: the same seed twice")
        seen[key] = path
        rows.append({k: (v if v != "" else None) for k, v in row.items()})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  if not _CSV.value or not _OUT.value:
    raise app.UsageError("--csv (one or more tables) and --out are required")
  try:
    rows = read_rows(_CSV.value)
    write_tables(rows, os.path.dirname(os.path.abspath(_OUT.value)),
                 os.path.basename(_OUT.value), _CAPTION.value)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(open(_OUT.value + ".md", encoding="utf-8").read())


if __name__ == "__main__":
  app.run(main)
