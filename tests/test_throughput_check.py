"""The one-command GPU throughput check, run tiny on the CPU in a process of its own (its absl
flags): its quickstart runs, benchmark rows and targets, and its PSNR against the project's
metric."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import ROOT


@pytest.mark.slow
def test_smoke_run_measures_every_phase(tmp_path):
  out = tmp_path / "check"
  proc = subprocess.run([sys.executable, "-m", "experiments.throughput_check", f"--out={out}",
                         "--smoke", "--convs=im2col", "--seeds=0,1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  runs = summary["quickstart"]
  assert [(r["seed"], r["cache"], r["rc"]) for r in runs] == [(0, "cold", 0), (1, "warm", 0)]
  for r in runs:  # the PSNR it reports is the project's metric of the run's own files
    workdir = out / "quickstart" / f"im2col_seed{r['seed']}"
    with np.load(workdir / "reconstruction.npz") as rec, np.load(workdir / "data.npz") as data:
      expected = float(np.mean(vl.metrics.psnr(rec["clips"], data["clips"])))
    assert r["psnr_db"] == pytest.approx(expected, rel=1e-5)
    assert r["compile_s"] > 0
  rows = summary["benchmark"]["rows"]
  assert sorted((tuple(r["clip"]), r["restarts"]) for r in rows) == [
      ((4, 8, 8, 3), 1), ((4, 8, 8, 3), 2), ((4, 16, 16, 3), 1), ((4, 16, 16, 3), 2)]
  assert all(r["profile"]["busy_s"] > 0 for r in rows)
  targets = {t["target"]: t for t in summary["targets"]}
  assert set(targets) == {"c3d_8x32x32_r256_candidate_steps_per_s",
                          "c3d_16x112x112_r32_cost_vs_r1", "quickstart_warm_compile_s"}
  assert all(t["value"] is not None and t["met"] in (True, False) for t in targets.values())
  assert "## Targets" in (out / "summary.md").read_text()
  assert not (out / "profiles").exists()  # raw traces dropped, their summaries kept in the rows
