"""What the study scripts (fl_realism, defenses) share: the cells a run picks, the table's
mean ± std cells, and the local training that trains their ReLU victims."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from absl import app

from vidleak_jax import fl

# The training population's (and a trained ReLU victim's client's) local SGD: 2 epochs of
# mini-batches of 2 over each client's 8 clips, lr 0.05. 30 FedAvg rounds of 8 such clients
# train the ReLU C3D to 0.84 ± 0.03 test accuracy (3 seeds, chance 0.25); FedSGD at lr 0.1
# did not train reliably (0.33–0.85 after 100 rounds).
RELU_LOCAL = fl.LocalTraining(epochs=2, batch_size=2, lr=0.05)


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
