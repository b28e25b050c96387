"""The matrix-product ceiling of a jitted computation: how fast it could run if everything except its
matrix products were free.

`dot_specs` reads every `dot` that XLA kept in the *optimised* HLO of a function (operand shapes,
physical layouts and dimension numbers: what the compiled program runs); `time_dots` times each
distinct product alone with XLA's own kernels on this device, operands warm in cache and the cost
of an empty dispatch subtracted. For products large enough to keep every core busy (those of a
batched attack step) the sum is a floor: no run of the step spends less time in them. Products of a few microseconds cost
more in a call of their own than inside a fused program, so for a single small candidate the sum
can exceed the whole step. The benchmark uses it to bound what any rewrite of the non-matmul work
could reach.
"""

from __future__ import annotations

import collections
import math
import re
import statistics
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*f32\[(?P<dims>[\d,]*)\](?:\{(?P<layout>[\d,]*)"
    r"[^}]*\})?\s+(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_DIMS = re.compile(r"(?P<side>lhs|rhs)_(?P<kind>batch|contracting)_dims=\{(?P<dims>[\d,]*)\}")


class DotSpec(NamedTuple):
  """One float32 matrix product: logical operand shapes, their layouts (major-to-minor dimension
  order) and (lhs, rhs) contracting / batch dimensions."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_order: tuple[int, ...]
  rhs_order: tuple[int, ...]
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]

  @property
  def flops(self) -> int:
    """2 × (product of lhs dims) × (rhs dims that are neither batch nor contracting)."""
    rhs_free = [n for i, n in enumerate(self.rhs)
                if i not in self.contracting[1] and i not in self.batch[1]]
    return 2 * math.prod(self.lhs) * math.prod(rhs_free)


def _ints(text: str | None) -> tuple[int, ...]:
  return tuple(int(t) for t in (text or "").split(",") if t)


def parse_dots(hlo_text: str) -> list[DotSpec]:
  """Every f32 `dot` in an HLO module's text, operand shapes looked up in its computation."""
  specs, shapes = [], {}
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
      shapes = {}  # a new computation: instruction names are local to it
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    dims = _ints(m["dims"])
    order = tuple(reversed(_ints(m["layout"]))) if m["layout"] else tuple(range(len(dims)))
    shapes[m["name"]] = (dims, order)
    if m["op"] != "dot":
      continue
    operands = re.findall(r"%([\w.\-]+)", m["args"])
    if len(operands) != 2 or not all(o in shapes for o in operands):
      raise ValueError(f"cannot resolve the operands of HLO dot: {line.strip()[:200]}")
    found = {(d["side"], d["kind"]): _ints(d["dims"]) for d in _DIMS.finditer(m["attrs"])}
    (lhs, lhs_order), (rhs, rhs_order) = (shapes[o] for o in operands)
    specs.append(DotSpec(
        lhs, rhs, lhs_order, rhs_order,
        (found.get(("lhs", "contracting"), ()), found.get(("rhs", "contracting"), ())),
        (found.get(("lhs", "batch"), ()), found.get(("rhs", "batch"), ()))))
  return specs


def dot_specs(fn: Callable, *args) -> list[DotSpec]:
  """The matrix products of `jax.jit(fn)(*args)` after XLA's optimisations, in program order."""
  return parse_dots(jax.jit(fn).lower(*args).compile().as_text())


def _median_call_s(fn: Callable, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _operand(key: jax.Array, shape: tuple[int, ...], order: tuple[int, ...]) -> jax.Array:
  """Random array stored in `order` (major-to-minor); `_logical` turns it back into `shape`."""
  return jax.random.normal(key, tuple(shape[d] for d in order))


def _logical(x: jax.Array, order: tuple[int, ...]) -> jax.Array:
  return jnp.transpose(x, [order.index(d) for d in range(len(order))])


def time_dots(specs: Sequence[DotSpec], repeats: int = 20, seed: int = 0) -> float:
  """Seconds that the products in `specs` take at least: each distinct product timed alone (its
  own jitted call, operands in their HLO layout and warm, median of `repeats`), minus the time of
  an empty call, times how often it occurs."""
  key = jax.random.key(seed)
  floor = _median_call_s(jax.jit(lambda x: x), (jnp.zeros(()),), repeats)
  total = 0.0
  for spec, count in collections.Counter(specs).items():
    key, k_lhs, k_rhs = jax.random.split(key, 3)
    args = (_operand(k_lhs, spec.lhs, spec.lhs_order), _operand(k_rhs, spec.rhs, spec.rhs_order))

    def product(a, b, spec=spec):
      return jax.lax.dot_general(_logical(a, spec.lhs_order), _logical(b, spec.rhs_order),
                                 (spec.contracting, spec.batch),
                                 precision=jax.lax.Precision.HIGHEST)

    total += count * max(_median_call_s(jax.jit(product), args, repeats) - floor, 0.0)
  return total


def candidate_step_gemm_ceiling(objective: Callable[[jax.Array], jax.Array],
                                candidates: jax.Array, group: int) -> dict[str, float]:
  """The matmul floor of one attack step: the value and gradient of `objective` over `candidates`
  [R, ...], computed as the attack does, in vmapped groups of `group` candidates (R for "vmap").
  Returns seconds per step in matmuls, their GFLOP per candidate, and the candidate-steps/s that
  the step could not exceed even if all its other work were free."""
  restarts = candidates.shape[0]
  specs = dot_specs(jax.vmap(jax.value_and_grad(objective)), candidates[:group])
  seconds = time_dots(specs) * restarts / group  # a partial last group pro rata
  flops = sum(s.flops for s in specs) / group
  return {"gemm_s_per_step": seconds, "gemm_gflop_per_candidate_step": flops / 1e9,
          "gemm_ceiling_candidate_steps_per_s": restarts / seconds if seconds else math.inf}
