"""The matmul floor: HLO dots parsed with their shapes, layouts and dimensions; the benchmark row."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from experiments import benchmark_core
from experiments.gemm_ceiling import DotSpec, dot_specs, parse_dots, time_dots

_HLO = """
%fused_computation (param_0: f32[64,32], param_1: f32[16,32]) -> f32[64,16] {
  %param_0 = f32[64,32]{1,0} parameter(0)
  %param_1 = f32[16,32]{0,1} parameter(1)
  ROOT %dot.0 = f32[64,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%fused_computation.1 (param_0: f32[3,5,7], param_1: f32[3,7,2]) -> f32[3,5,2] {
  %param_0 = f32[3,5,7]{2,1,0} parameter(0)
  %param_1 = f32[3,7,2]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[3,5,2]{2,1,0} dot(%param_0, %param_1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}
"""


def test_parse_dots_reads_shapes_layouts_and_dimensions_per_computation():
  plain, batched = parse_dots(_HLO)  # `param_0` means a different array in each computation
  assert plain == DotSpec((64, 32), (16, 32), (0, 1), (1, 0), ((1,), (1,)), ((), ()))
  assert batched == DotSpec((3, 5, 7), (3, 7, 2), (0, 1, 2), (0, 1, 2), ((2,), (1,)),
                            ((0,), (0,)))
  assert plain.flops == 2 * 64 * 32 * 16 and batched.flops == 2 * 3 * 5 * 7 * 2


def test_dot_specs_of_a_compiled_function():
  a, b = jnp.ones((8, 5)), jnp.ones((5, 3))
  c, d = jnp.ones((2, 4, 6)), jnp.ones((2, 6, 7))
  specs = dot_specs(lambda a, b, c, d: (a @ b, jnp.einsum("bij,bjk->bik", c, d)), a, b, c, d)
  assert sorted(s.flops for s in specs) == sorted([2 * 8 * 5 * 3, 2 * 2 * 4 * 6 * 7])
  assert time_dots(specs, repeats=3) >= 0.0


@pytest.mark.slow
def test_benchmark_row_with_the_matmul_floor():
  row = benchmark_core.bench_one("c3d", restarts=2, batching="vmap", clip=(4, 16, 16, 3),
                                 steps=1, steps_per_dispatch=1, seed=0, gemm_ceiling=True)
  # The matmuls are most, not all, of the step's FLOPs (XLA's cost analysis counts the rest too).
  assert 0.5 * row["candidate_step_gflop"] < row["gemm_gflop_per_candidate_step"]
  assert row["gemm_gflop_per_candidate_step"] <= row["candidate_step_gflop"]
  assert row["gemm_ceiling_candidate_steps_per_s"] == pytest.approx(2 / row["gemm_s_per_step"])
  assert "matmul ceiling" in benchmark_core.markdown_table([row])
