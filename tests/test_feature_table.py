"""The feature sweep's tables: csv + markdown, the depth-trend test, merging several sweeps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from experiments import combine_feature_tables, feature_table
from tests.conftest import ROOT

def test_sweep_table_is_written_as_markdown_and_csv(tmp_path):
  rows = [{"pipeline": "frames (C3D)", "head": "-", "psnr": 30.4219, "ssim": 0.925},
          {"pipeline": "features (resnet_small)", "head": "gru", "head_params": 25028,
           "feature_rel_error": 0.0123456, "psnr": 14.4}]
  feature_table.write_tables(rows, str(tmp_path), "table", "caption")
  lines = (tmp_path / "table.csv").read_text().splitlines()
  assert lines[0].split(",") == list(feature_table.COLUMNS)
  assert lines[2].split(",")[:5] == ["features (resnet_small)", "gru", "25028", "0.0123456", ""]
  markdown = (tmp_path / "table.md").read_text()
  assert "| frames (C3D) | - | - | - | - | - | 30.42 | 0.925 |" in markdown
  assert "| 0.01235 |" in markdown
  # Several seeds: the csv keeps one line per seed, the markdown shows mean ± std per head.
  seeded = [dict(rows[1], seed=0, feature_rel_error=0.1),
            dict(rows[1], seed=1, feature_rel_error=0.3)]
  feature_table.write_tables(seeded, str(tmp_path), "seeds", "caption")
  assert len((tmp_path / "seeds.csv").read_text().splitlines()) == 3
  markdown = (tmp_path / "seeds.md").read_text()
  assert "| gru | 25028 | 0.2 ± 0.1 | - | - | 14.40 |" in markdown
  assert markdown.rstrip().endswith("| 0/1 |")
  assert [p.name for p in tmp_path.iterdir()] and not any(
      p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _depth_rows(errors: np.ndarray, first_seed: int = 0) -> list[dict]:
  """Sweep rows for errors [seeds, 4] in DEPTH_ORDER (plus a raw-frame row per seed)."""
  rows = []
  for i, per_head in enumerate(errors):
    rows.append({"pipeline": "frames (C3D)", "head": "-", "psnr": 15.0, "seed": first_seed + i})
    rows += [{"pipeline": "features (resnet_small)", "head": head, "feature_rel_error": float(e),
              "seed": first_seed + i} for head, e in zip(feature_table.DEPTH_ORDER, per_head)]
  return rows


def _page_l(data: np.ndarray) -> float:
  """Page's L from its definition: sum over treatments j = 1..k of j × (rank sum of treatment j),
  ranks taken within each block (no ties in the data used here)."""
  ranks = np.argsort(np.argsort(data, axis=1), axis=1) + 1
  return float(np.sum(np.arange(1, data.shape[1] + 1) * ranks.sum(axis=0)))


def test_depth_trend_is_pages_test_over_seeds():
  rng = np.random.default_rng(0)
  growing = np.linspace(0.2, 0.5, 4) + 0.1 * rng.standard_normal((8, 4))
  trend = feature_table.depth_trend(_depth_rows(growing))
  assert trend["seeds"] == 8 and trend["page_l"] == _page_l(growing)
  assert trend["mean"] == pytest.approx(growing.mean(0).tolist())
  assert trend["sem"] == pytest.approx((growing.std(0, ddof=1) / np.sqrt(8)).tolist())
  assert trend["deepest_above_linear"] == int(np.sum(growing[:, 3] > growing[:, 0]))
  assert trend["p_value"] < 0.01
  shrinking = feature_table.depth_trend(_depth_rows(growing[:, ::-1]))
  assert shrinking["p_value"] > 0.9  # one-sided: a falling error is no evidence of growth
  assert feature_table.depth_trend(_depth_rows(growing[:1])) is None  # one seed: no test
  incomplete = [r for r in _depth_rows(growing) if not (r["head"] == "mlp3" and r["seed"] == 0)]
  assert feature_table.depth_trend(incomplete)["seeds"] == 7
  other_extractor = [dict(r, pipeline="features (vgg16)") for r in _depth_rows(growing)]
  assert feature_table.depth_trend(_depth_rows(growing) + other_extractor)["seeds"] == 16
  alone = feature_table.depth_trend(_depth_rows(growing) + other_extractor,
                                    pipeline="features (vgg16)")
  assert alone["seeds"] == 8 and alone["page_l"] == _page_l(growing)


def test_each_pipeline_of_a_table_gets_its_own_depth_trend(tmp_path):
  rng = np.random.default_rng(1)
  growing = np.linspace(0.2, 0.5, 4) + 0.05 * rng.standard_normal((6, 4))
  flat = 0.3 + 0.05 * rng.standard_normal((6, 4))
  other = [dict(r, pipeline="features (resnet_small, subspace)") for r in _depth_rows(flat)
           if r["pipeline"] != "frames (C3D)"]
  feature_table.write_tables(_depth_rows(growing) + other, str(tmp_path), "two", "caption")
  trends = [line for line in (tmp_path / "two.md").read_text().splitlines() if "Page" in line]
  assert len(trends) == 2
  assert trends[0].startswith("features (resnet_small): feature_rel_error vs MLP depth")
  assert trends[1].startswith("features (resnet_small, subspace): feature_rel_error")
  for line, data in zip(trends, (growing, flat)):
    assert f"L = {_page_l(data):.0f}," in line


def test_sweeps_of_different_seeds_merge_into_one_table(tmp_path):
  rng = np.random.default_rng(1)
  errors = np.linspace(0.2, 0.5, 4) + 0.1 * rng.standard_normal((6, 4))
  feature_table.write_tables(_depth_rows(errors[:3]), str(tmp_path), "a", "caption a")
  feature_table.write_tables(_depth_rows(errors[3:], first_seed=3), str(tmp_path), "b", "b")
  assert "Page's trend test" in (tmp_path / "a.md").read_text()
  paths = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
  merged = combine_feature_tables.read_rows(paths)
  assert len(merged) == 6 * 5
  from_csv, direct = feature_table.depth_trend(merged), feature_table.depth_trend(_depth_rows(errors))
  for key in direct:
    assert from_csv[key] == pytest.approx(direct[key]), key
  with pytest.raises(ValueError, match="the same seed twice"):
    combine_feature_tables.read_rows([paths[0], paths[0]])
  # A table written before a column existed merges too, with that column empty.
  lines = (tmp_path / "b.csv").read_text().splitlines()
  drop = lines[0].split(",").index("first_layer_sv_ratio")
  (tmp_path / "old.csv").write_text("\n".join(
      ",".join(v for i, v in enumerate(line.split(",")) if i != drop) for line in lines) + "\n")
  old = combine_feature_tables.read_rows([paths[0], str(tmp_path / "old.csv")])
  assert len(old) == 6 * 5 and all(r.get("first_layer_sv_ratio") is None for r in old)

  out = tmp_path / "merged"
  proc = subprocess.run([sys.executable, "-m", "experiments.combine_feature_tables",
                         f"--csv={','.join(paths)}", f"--out={out}", "--caption=all seeds"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  markdown = (tmp_path / "merged.md").read_text()
  assert markdown.startswith("all seeds") and "6 seeds" in markdown
  assert "| 0/1/2/3/4/5 |" in markdown

  (tmp_path / "bad.csv").write_text("pipeline,head\nx,y\n")
  proc = subprocess.run([sys.executable, "-m", "experiments.combine_feature_tables",
                         f"--csv={tmp_path / 'bad.csv'}", f"--out={tmp_path / 'none'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "bad.csv: not a feature-sweep table" in proc.stderr
  assert "Traceback" not in proc.stderr and not list(tmp_path.glob("none*"))
