"""The classifier-complexity sweep of the feature pipeline, end to end from its flagfile."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# The depth preset with every optimisation cut to a few steps and a smaller clip.
SHORT = ["--seeds=0", "--heads=linear,mlp1", "--clip_shape=2,16,16,3", "--pretrain_steps=5",
         "--match_steps=5", "--match_restarts=2", "--invert_steps=5", "--raw_steps=5"]


def _sweep(*args):
  return subprocess.run([sys.executable, "-m", "experiments.feature_sweep", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_depth_sweep_preset_writes_one_table_over_heads_and_attacks(tmp_path):
  def table():
    with open(tmp_path / "feature_sweep_b4_depth.csv", encoding="utf-8") as f:
      return list(csv.DictReader(f))

  proc = _sweep("--flagfile=experiments/flags/feature_sweep_depth.flags", *SHORT,
                f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = table()
  # A finished run written before first_layer_sv_ratio existed: the sweep computes it again.
  metrics_path = tmp_path / "seed_0" / "mlp1" / "metrics.json"
  metrics = json.loads(metrics_path.read_text())
  del metrics["first_layer_sv_ratio"]
  metrics_path.write_text(json.dumps(metrics))
  # The same sweep with a second attack reuses every finished run and adds the new ones.
  proc = _sweep("--flagfile=experiments/flags/feature_sweep_depth.flags", *SHORT,
                "--feature_attacks=matching,subspace", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("is done, reusing its metrics.json") == 3  # raw, linear, mlp1
  rows = table()
  ratio = "first_layer_sv_ratio"
  without_ratio = lambda table_rows: [{k: v for k, v in r.items() if k != ratio}
                                      for r in table_rows]
  assert without_ratio(r for r in rows if "subspace" not in r["pipeline"]) == without_ratio(first)
  linear, mlp1 = 1, 2  # row indices; mlp1's ratio recomputed, linear's read from metrics.json
  assert float(rows[mlp1][ratio]) == pytest.approx(float(first[mlp1][ratio]), rel=1e-5, abs=1e-9)
  assert rows[linear][ratio] == first[linear][ratio]
  # Raw frames, one row per head and attack, the true-feature inversion (multi-seed averaging:
  # test_feature_table.py).
  features, subspace = "features (resnet_small)", "features (resnet_small, subspace)"
  assert [(r["seed"], r["pipeline"], r["head"]) for r in rows] == [("0", p, h) for p, h in (
      ("frames (C3D)", "-"), (features, "linear"), (features, "mlp1"), (subspace, "linear"),
      (subspace, "mlp1"), (features, "true features"))]
  for row in rows:
    assert 0 < float(row["psnr"]) < 60
    if row["head"] in ("linear", "mlp1"):
      assert 0 <= float(row["feature_rel_error"]) and -1 <= float(row["feature_cosine"]) <= 1
      assert int(row["head_params"]) > 0 and 0 <= float(row["first_layer_sv_ratio"]) <= 1
  markdown = (tmp_path / "feature_sweep_b4_depth.md").read_text()
  assert "B=4, 4 classes, true labels given, seeds 0 " in markdown and "| 0 |" in markdown
  assert "stage 1 (matching/subspace; 5 L-BFGS steps, 2 restart(s))" in markdown
  # Every run attacked the clips of the raw-frame run (the sweep checks it) in the seed's dir.
  for run in ("raw_frames", "linear", "mlp1", "linear_subspace", "mlp1_subspace"):
    assert (tmp_path / "seed_0" / run / "metrics.json").exists()


@pytest.mark.parametrize("bad, expected", [
    ("--heads=linear,deep", "deep"),
    ("--seeds=0,0", "--seeds needs distinct integers"),
    ("--clip_shape=4,32,x,3", "--clip_shape expects T,H,W,C"),
    ("--feature_attacks=matching,magic", "--feature_attacks: unknown ['magic']"),
])
def test_bad_sweep_flags_are_named_before_anything_runs(tmp_path, bad, expected):
  proc = _sweep("--flagfile=experiments/flags/feature_sweep_depth.flags", bad,
                f"--workdir={tmp_path / 'sweep'}")
  assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not (tmp_path / "sweep").exists()
