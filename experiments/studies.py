"""What the study scripts (fl_realism, defenses) share: the cells a run picks and the table's
mean ± std cells."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from absl import app


def selected_cells(argv: Sequence[str], requested: Sequence[str], cells: Mapping) -> list[str]:
  """The `--cells` asked for (all of `cells` when none), in order; app.UsageError for positional
  arguments or an unknown cell, naming it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  chosen = list(requested) or list(cells)
  unknown = [c for c in chosen if c not in cells]
  if unknown:
    raise app.UsageError(f"--cells: unknown {unknown}; valid: {', '.join(cells)}")
  return chosen


def summary(values: Sequence[float], digits: int) -> str:
  """"mean ± std (n)" of `values` to `digits` decimals, "—" when there are none."""
  if not values:
    return "—"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f} ({len(values)})"
