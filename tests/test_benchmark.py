"""The benchmark's rows: timings consistent with each other, FLOPs and memory from XLA's
analyses, conv modes that agree, the profile; bad flags refused."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import vidleak_jax as vl
from experiments import benchmark_core as benchmark
from tests.conftest import ROOT


@pytest.mark.parametrize("victim", ["c3d", "frame_cnn"])
def test_benchmark_row_is_consistent(victim):
  clip = (4, 16, 16, 3)
  row = benchmark.bench_one(victim, restarts=2, batching="auto", clip=clip, steps=1,
                            steps_per_dispatch=2, seed=0)
  assert row["batching"] in ("map", "vmap") and row["conv"] == "im2col"  # resolved, not "auto"
  assert row["candidate_steps_per_s"] == pytest.approx(2 / row["step_s"])
  assert row["jax_peak_mem_source"] == "xla_memory_analysis" and row["jax_peak_mem_bytes"] > 0

  # One candidate step (gradient of a gradient-matching loss) costs several forward passes.
  t, h, w, c = clip
  model = vl.models.create(victim, jax.random.key(0), frames=t, height=h, width=w, channels=c,
                           num_classes=benchmark.NUM_CLASSES)
  apply_fn, params = vl.models.pure(model)
  cost = jax.jit(apply_fn).lower(params, jax.numpy.zeros((1, *clip))).compile().cost_analysis()
  forward_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  assert 3 * forward_flops < 1e9 * row["candidate_step_gflop"] < 30 * forward_flops
  assert row["achieved_gflop_per_s"] == pytest.approx(
      row["candidate_step_gflop"] * row["candidate_steps_per_s"])

  table = benchmark.markdown_table([row])
  assert table.count("\n") == 2 and f"| {victim} |" in table


@pytest.mark.parametrize("name", benchmark.LIBRARY_MODELS)
def test_library_models_compute_what_the_c3d_victim_computes(name):
  clip = (4, 8, 8, 3)
  model = vl.models.create("c3d", jax.random.key(0), frames=4, height=8, width=8, channels=3,
                           num_classes=benchmark.NUM_CLASSES)
  apply_fn, params = vl.models.pure(model)
  library_fn, library_params = benchmark.library_model(name, model, params, clip)
  clips = jax.random.uniform(jax.random.key(1), (2, *clip))
  np.testing.assert_allclose(jax.jit(library_fn)(library_params, clips),
                             jax.jit(apply_fn)(params, clips), rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match="c3d_lax"):
    benchmark.library_model("c3d_torch", model, params, clip)


def test_rounds_combine_to_medians_with_paired_speedups():
  def row(step_s, torch_step_s):
    return {"victim": "c3d", "clip": [8, 32, 32, 3], "restarts": 4, "batching": "map",
            "map_batch_size": 2, "conv": "im2col", "backend": "cpu", "compile_s": 3.0,
            "step_s": step_s, "steps_per_s": 1 / step_s, "candidate_steps_per_s": 4 / step_s,
            "candidate_step_gflop": 0.05, "achieved_gflop_per_s": 0.2 / step_s,
            "torch_mode": "vmap", "torch_compile_s": 1.0, "torch_step_s": torch_step_s,
            "torch_steps_per_s": 1 / torch_step_s, "torch_candidate_steps_per_s": 4 / torch_step_s,
            "speedup": torch_step_s / step_s, "jax_peak_mem_bytes": 1, "torch_peak_mem_bytes": 1}

  # Round 2 ran in a slow spell of the machine: both sides took twice as long.
  (combined,) = benchmark.combine_rounds([[row(0.010, 0.020)], [row(0.020, 0.040)],
                                          [row(0.011, 0.022)]])
  assert combined["rounds"] == 3 and combined["step_s"] == 0.011
  assert combined["candidate_steps_per_s"] == pytest.approx(4 / 0.011)
  assert combined["candidate_steps_per_s_range"] == pytest.approx([200.0, 400.0])
  assert combined["torch_candidate_steps_per_s"] == pytest.approx(4 / 0.022)
  assert combined["speedup"] == pytest.approx(2.0)
  assert combined["speedup_range"] == pytest.approx([2.0, 2.0])
  assert combined["achieved_gflop_per_s"] == pytest.approx(0.05 * 4 / 0.011)
  assert "(200–400)" in benchmark.markdown_table([combined])
  with pytest.raises(ValueError, match="equally long"):
    benchmark.combine_rounds([[row(0.01, 0.02)], []])


def test_cost_per_candidate_is_relative_to_the_fastest_single_candidate_row():
  def row(restarts, batching, step_s, gemm_s, victim="c3d"):
    return {"victim": victim, "clip": [8, 32, 32, 3], "restarts": restarts, "batching": batching,
            "conv": "im2col", "step_s": step_s, "gemm_s_per_step": gemm_s}

  round_1 = benchmark.add_cost_vs_single([
      row(1, "vmap", 0.010, 0.004), row(1, "map", 0.012, 0.004), row(32, "vmap", 0.160, 0.128),
      row(32, "map", 0.320, 0.064), row(32, "map", 1.0, 0.5, victim="frame_cnn")])
  # R = 32 vmap: 0.160 / 32 = 5 ms per candidate against the fastest R = 1 step of 10 ms.
  assert round_1[2]["candidate_cost_vs_r1"] == pytest.approx(0.5)
  assert round_1[2]["gemm_floor_vs_r1"] == pytest.approx(0.4)
  assert round_1[3]["candidate_cost_vs_r1"] == pytest.approx(1.0)
  assert round_1[1]["candidate_cost_vs_r1"] == pytest.approx(1.2)
  assert "candidate_cost_vs_r1" not in round_1[4]  # no R = 1 row of that victim

  # A slow round (everything twice as long) leaves the paired ratios unchanged.
  round_2 = benchmark.add_cost_vs_single([
      row(1, "vmap", 0.020, 0.008), row(1, "map", 0.024, 0.008), row(32, "vmap", 0.320, 0.256),
      row(32, "map", 0.640, 0.128), row(32, "map", 2.0, 1.0, victim="frame_cnn")])
  for r in round_1 + round_2:
    r.update(candidate_steps_per_s=r["restarts"] / r["step_s"], candidate_step_gflop=0.05,
             compile_s=1.0, backend="cpu", map_batch_size=2,
             gemm_ceiling_candidate_steps_per_s=r["restarts"] / r["gemm_s_per_step"])
  combined = benchmark.combine_rounds([round_1, round_2])
  assert combined[2]["candidate_cost_vs_r1"] == pytest.approx(0.5)
  assert combined[2]["candidate_cost_vs_r1_range"] == pytest.approx([0.5, 0.5])
  assert combined[2]["gemm_s_per_step"] == pytest.approx((0.128 + 0.256) / 2)
  table = benchmark.markdown_table(combined)
  assert "cost per cand. ÷ R=1" in table and "| 0.50 (0.50–0.50) | 0.40 (0.40–0.40) |" in table


def test_matmul_ceiling_is_compared_with_the_torch_peer_of_the_same_round():
  def row(step_s, torch_step_s, gemm_s):
    return {"victim": "c3d", "clip": [8, 32, 32, 3], "restarts": 32, "batching": "vmap",
            "map_batch_size": 2, "conv": "im2col", "backend": "cpu", "compile_s": 3.0,
            "step_s": step_s, "steps_per_s": 1 / step_s, "candidate_steps_per_s": 32 / step_s,
            "candidate_step_gflop": 0.05, "gemm_s_per_step": gemm_s,
            "gemm_ceiling_candidate_steps_per_s": 32 / gemm_s, "torch_mode": "vmap",
            "torch_compile_s": 1.0, "torch_step_s": torch_step_s,
            "torch_steps_per_s": 1 / torch_step_s, "torch_candidate_steps_per_s": 32 / torch_step_s,
            "speedup": torch_step_s / step_s, "gemm_ceiling_vs_torch": torch_step_s / gemm_s,
            "jax_peak_mem_bytes": 1, "torch_peak_mem_bytes": 1}

  (combined,) = benchmark.combine_rounds([[row(0.1, 0.08, 0.04)], [row(0.2, 0.16, 0.08)],
                                          [row(0.1, 0.09, 0.03)]])
  assert combined["gemm_ceiling_vs_torch"] == pytest.approx(2.0)
  assert combined["gemm_ceiling_vs_torch_range"] == pytest.approx([2.0, 3.0])
  assert "| 2.00x (2.00–3.00) |" in benchmark.markdown_table([combined])


def test_conv_modes_agree_at_the_start_and_the_profile_is_in_the_row(tmp_path):
  # XLA's own convolutions and the im2col rewrite compute one objective: the rows' start objective
  # and gradient agree to float rounding, and `add_conv_agreement` says so against im2col.
  rows = [benchmark.bench_one("c3d", restarts=2, batching="vmap", clip=(4, 8, 8, 3), steps=1,
                              steps_per_dispatch=1, seed=0, conv=conv,
                              profile_dir=str(tmp_path / conv)) for conv in ("xla", "im2col")]
  xla, im2col = benchmark.add_conv_agreement(rows)
  assert xla["start_vs_conv"] == "im2col" and "start_vs_conv" not in im2col
  assert xla["start_objective"] > 0 and xla["start_gradient_norm"] > 0
  assert xla["start_objective_rel_diff"] < 1e-4 and xla["start_gradient_rel_diff"] < 1e-4
  for row in (xla, im2col):
    assert row["profile"]["device"] == "cpu" and row["profile"]["busy_s"] > 0
  assert "e-" in benchmark.markdown_table([xla, im2col]).splitlines()[2]


def test_conv_agreement_is_relative_to_im2col_within_one_configuration():
  def row(conv, restarts, objective):
    return {"victim": "c3d", "clip": [8, 32, 32, 3], "restarts": restarts, "batching": "vmap",
            "conv": conv, "start_objective": objective, "start_gradient_norm": 2.0}
  rows = benchmark.add_conv_agreement([row("pallas", 4, 1.5), row("im2col", 4, 1.0),
                                       row("pallas", 8, 3.0), row("xla", 8, 2.0)])
  assert [r.get("start_vs_conv") for r in rows] == ["im2col", None, None, "pallas"]
  assert rows[0]["start_objective_rel_diff"] == pytest.approx(0.5)
  assert rows[3]["start_objective_rel_diff"] == pytest.approx(1 / 3)
  assert rows[3]["start_gradient_rel_diff"] == 0.0


@pytest.mark.parametrize("flag, message", [("--conv=im2col,fast", "--conv must be"),
                                           ("--clip=8,32,32", "--clip must be four"),
                                           ("--restarts=0", "--restarts must be")])
def test_bad_benchmark_flags_are_refused_naming_the_flag(flag, message):
  done = subprocess.run([sys.executable, "-m", "experiments.benchmark", flag],
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0 and message in done.stderr and not done.stdout


_FAILING_R2 = """
import sys
from absl import app
from experiments import benchmark
real = benchmark.bench_one
def bench_one(victim, restarts, *args, **kwargs):
  if restarts == 2:
    raise RuntimeError("no kernel for R = 2")
  return real(victim, restarts, *args, **kwargs)
benchmark.bench_one = bench_one
sys.argv[0] = "benchmark"
app.run(benchmark.main)
"""


def test_keep_going_records_a_failing_configuration_and_times_the_others(tmp_path):
  jsonl = tmp_path / "rows.jsonl"
  done = subprocess.run(
      [sys.executable, "-c", _FAILING_R2, "--victims=c3d", "--clip=4,8,8,3", "--restarts=2,1",
       "--steps=1", "--steps_per_dispatch=1", "--rounds=2", "--keep_going",
       f"--rows_jsonl={jsonl}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 3, done.stderr[-3000:]
  assert "no kernel for R = 2" in done.stderr and "failed (left out of the table" in done.stderr
  (row,) = json.loads(done.stdout)
  assert row["restarts"] == 1 and row["rounds"] == 2 and row["candidate_steps_per_s"] > 0
  lines = [json.loads(line) for line in jsonl.read_text().splitlines()]  # not retried in round 2
  assert [(r["restarts"], "error" in r) for r in lines] == [(2, True), (1, False), (1, False)]
