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
