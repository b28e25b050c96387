"""Attack progress for people and programs: a tqdm bar, `metrics.jsonl` and TensorBoard scalars.

`<workdir>/metrics.jsonl` gets one JSON line per log point (dispatch): `step`, `objective` (best
so far), `objective_mean` (mean over restarts at that step), `grad_match` (gradient-matching term
of the restart best at that step), `wall_s` (attack time so far, summed over resumed runs) and
`eta_s`. `<workdir>/tb/` gets the objectives as TensorBoard scalars (`tensorboard --logdir
<workdir>/tb`). A resumed attack first cuts both back to the step it resumes from, so no log point
appears twice or goes missing. Lines are appended whole; one cut short by a killed process is
dropped on resume. An optimisation named other than "attack" (the feature pipeline's stages)
logs to `metrics_<name>.jsonl` and `tb/<name>/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import tensorboardX
from absl import logging
from tqdm import tqdm

from vidleak_jax import io as vio
from vidleak_jax.training import without_orbax_info

JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
SCALARS = {"objective": "loss", "objective_mean": "objective_mean", "grad_match": "grad_match"}


def read_jsonl(path: str, *, up_to_step: int | None = None) -> list[str]:
  """The complete lines of a metrics.jsonl (with their newline), stopping at the first line past
  `up_to_step`, cut short or not a log point; [] if `path` does not exist."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return []
  kept = []
  for line in text.splitlines(keepends=True):
    try:
      entry = json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
      break
    step = entry.get("step") if isinstance(entry, dict) else None
    if not isinstance(step, int) or (up_to_step is not None and step > up_to_step):
      break
    kept.append(line)
  return kept


class AttackLog:
  """A `reconstruct` progress function: tqdm bar (off when `quiet`), and when `write` (process 0
  only) metrics.jsonl and TensorBoard events in `workdir`. Use as a context manager; while open,
  orbax's INFO log lines are dropped."""

  def __init__(self, workdir: str, *, quiet: bool = False, write: bool = True,
               name: str = "attack"):
    own = name != "attack"
    self._name = name
    self._jsonl = os.path.join(workdir, f"metrics_{name}.jsonl" if own else JSONL)
    self._tb_dir = os.path.join(workdir, TENSORBOARD_DIR, *([name] if own else []))
    self._quiet, self._write = quiet, write
    self._bar = self._file = self._tb = None
    self._clock = time.perf_counter()
    self._start_step, self._wall_offset = 0, 0.0
    self._orbax_quiet = contextlib.ExitStack()
    self._orbax_quiet.enter_context(without_orbax_info())

  def _begin(self, start: int, total: int) -> None:
    """Opens the outputs at the step the attack starts from, dropping log points after it."""
    self._start_step = start
    self._bar = tqdm(total=total, initial=start, desc=self._name, unit="step",
                     disable=self._quiet, dynamic_ncols=True)
    if not self._write:
      return
    kept = read_jsonl(self._jsonl, up_to_step=start)
    vio.write_text(self._jsonl, "".join(kept))
    self._wall_offset = json.loads(kept[-1])["wall_s"] if kept else 0.0
    self._file = open(self._jsonl, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(self._tb_dir, purge_step=start + 1)

  def __call__(self, done: int, total: int, info: dict[str, float]) -> None:
    if self._bar is None:
      self._begin(int(info["resumed_from"]), total)
    if done <= self._start_step:
      return
    self._bar.update(done - self._bar.n)
    self._bar.set_postfix(loss=f"{info['loss']:.4g}")
    if done >= total:
      self._bar.close()
    elapsed = time.perf_counter() - self._clock
    running = max(elapsed - info.get("compile_s", 0.0), 1e-9)  # the steps' time, not compiling
    eta = running / (done - self._start_step) * (total - done)
    logging.log_every_n_seconds(logging.INFO, "%s step %d/%d  loss %.5g  eta %.0fs", 10,
                                self._name, done, total, info["loss"], eta)
    if self._write:
      self._log(done, info, wall=self._wall_offset + elapsed, eta=eta)

  def _log(self, step: int, info: dict[str, float], *, wall: float, eta: float) -> None:
    line: dict[str, Any] = {name: info[key] for name, key in SCALARS.items()}
    for name, value in line.items():
      self._tb.add_scalar(f"attack/{name}", value, global_step=step)
    self._tb.flush()  # like the JSONL line: on disk before the next checkpoint can cover it
    line.update(step=step, wall_s=round(wall, 3), eta_s=round(eta, 3))
    self._file.write(json.dumps(vio.to_jsonable(line), sort_keys=True, allow_nan=False) + "\n")
    self._file.flush()

  def close(self) -> None:
    for resource in (self._bar, self._file, self._tb):
      if resource is not None:
        resource.close()
    self._orbax_quiet.close()

  def __enter__(self) -> AttackLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
