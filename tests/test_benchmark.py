"""The benchmark's rows: timings consistent with each other, FLOPs and memory from XLA's analyses."""

from __future__ import annotations

import jax
import pytest

import vidleak_jax as vl
from experiments import benchmark_core as benchmark


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
