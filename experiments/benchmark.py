"""Benchmark of the attack step: compile time and optimizer steps per second per victim × restarts.

The attack is the `AttackConfig` default (1 − cosine gradient matching + spatio-temporal TV priors,
signed Adam) against a FedSGD update of one synthetic clip with known labels. Prints one JSON list
of rows to stdout and a markdown table (plus progress lines) to stderr. With --vs=torch every row
also times the PyTorch peer (experiments/torch_peer.py) on the identical setup: same params, clip,
target gradient and initial candidates (needs `pip install -e ".[bench]"`).

  python -m experiments.benchmark --victims=c3d,frame_cnn --restarts=1,8,32 --batching=both
  python -m experiments.benchmark --vs=torch --victims=c3d,frame_cnn --restarts=1,4
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.host_memory import host_mark, host_peak_since
import vidleak_jax as vl
from vidleak_jax.attack.config import BATCHING, CONVS, resolve_batching, resolve_conv

NUM_CLASSES = 4

_VICTIMS = flags.DEFINE_list("victims", ["c3d", "frame_cnn"],
                             f"Comma list of victims; valid: {', '.join(vl.models.VICTIMS)}.")
_RESTARTS = flags.DEFINE_list("restarts", ["1", "8", "32"], "Comma list of restart counts R.")
_CLIP = flags.DEFINE_list("clip", ["8", "32", "32", "3"], "Clip shape T,H,W,C (batch B=1).")
_CONV = flags.DEFINE_enum("conv", "auto", [*CONVS, "both"],
                          "Victim conv kernels in the attack: auto (im2col), xla, im2col, or both.")
_BATCHING = flags.DEFINE_enum("batching", "auto", [*BATCHING, "both"],
                              "How the R restarts are batched: vmap, map, or both.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed dispatches per configuration.", lower_bound=1)
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Optimizer steps per jitted dispatch (AttackConfig.log_every).",
    lower_bound=1)
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "high", "highest"],
    "float32 matmul/conv precision on both sides (the runner's default is highest; 'default' "
    "lets GPUs use TF32).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the victim, data and candidates.")
_VS = flags.DEFINE_enum("vs", "none", ["none", "torch"],
                        "Also time a peer implementation on the identical setup: none or torch.")
_TORCH_MODE = flags.DEFINE_enum(
    "torch_mode", "auto", ["auto", "vmap", "loop"],
    "How the torch peer batches restarts: auto (a loop for R=1, torch.func vmap for R>1), vmap, "
    "or loop (one candidate at a time, the fallback).")
_TORCH_MISSING = ("--vs=torch needs PyTorch, which is not installed; install the bench extra with "
                  '`pip install -e ".[bench]"` (or `pip install torch==2.13.0`)')


def _positive_ints(values: Sequence[str]) -> list[int] | None:
  """`values` as positive ints, or None if any is not one."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    return None
  return out if out and min(out) >= 1 else None


flags.register_validator(
    "victims", lambda v: bool(v) and all(name in vl.models.VICTIMS for name in v),
    message=f"--victims must be a non-empty comma list of: {', '.join(vl.models.VICTIMS)}")
flags.register_validator("restarts", lambda v: _positive_ints(v) is not None,
                         message="--restarts must be a comma list of positive integers")
flags.register_validator(
    "clip", lambda v: len(v) == 4 and _positive_ints(v) is not None,
    message="--clip must be four positive integers T,H,W,C")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _jax_peak_memory(compiled: Any, mark: tuple[int, bool]) -> tuple[int, str]:
  """(bytes, source): the executable's own peak (arguments + outputs + temporaries, as XLA planned
  it; the same on every backend and independent of earlier rows), else host peak-RSS growth."""
  stats = compiled.memory_analysis()
  peak = getattr(stats, "peak_memory_in_bytes", None)
  if peak:
    return int(peak), "xla_memory_analysis"
  return host_peak_since(mark)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """float32 GFLOP/s of one large n×n matmul on the default device: the roofline to compare with."""
  a = jnp.ones((n, n), jnp.float32)
  product = jax.jit(lambda m: m @ m)
  jax.block_until_ready(product(a))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(product(a))
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def candidate_step_flops(attack: Any, candidate: jax.Array) -> float:
  """XLA's FLOP count of one candidate's objective value and gradient (the bulk of a step)."""
  lowered = jax.jit(jax.value_and_grad(lambda x: attack.objective(x)[0])).lower(candidate)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def bench_one(victim: str, restarts: int, batching: str, clip: tuple[int, int, int, int],
              steps: int, steps_per_dispatch: int, seed: int, vs: str = "none",
              torch_mode: str = "auto", conv: str = "auto", precision: str = "highest"
              ) -> dict[str, Any]:
  """Compiles and times `attack.run` for one victim × R × batching; returns one result row.

  With `vs="torch"` the PyTorch peer is timed on the same params, target and initial candidates.
  """
  t, h, w, c = clip
  k_model, k_data, k_init = jax.random.split(jax.random.key(seed), 3)
  model = vl.models.create(victim, k_model, frames=t, height=h, width=w, channels=c,
                           num_classes=NUM_CLASSES)
  apply_fn, params = vl.models.pure(model)
  clips, labels = vl.data.synthetic.synthetic_clips(
      k_data, 1, frames=t, height=h, width=w, channels=c, num_classes=NUM_CLASSES)
  target = vl.fl.updates.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(restarts=restarts, batching=batching, conv=conv,
                                  log_every=steps_per_dispatch)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, tuple(clips.shape), config)
  state = jax.block_until_ready(attack.init(k_init))
  init_candidates = state.candidates
  n = jnp.asarray(steps_per_dispatch, jnp.int32)

  start = time.perf_counter()
  with jax.default_matmul_precision(precision):
    compiled = jax.jit(attack.run).lower(state, n).compile()
  compile_s = time.perf_counter() - start

  mark = host_mark()  # host peak memory of the runs (warm-up included), not of the compile

  state, _ = jax.block_until_ready(compiled(state, n))  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, n))
    times.append(time.perf_counter() - start)
  if not bool(jnp.all(jnp.isfinite(metrics["loss"]))):
    _log(f"  warning: non-finite loss for {victim} R={restarts} {batching}")
  peak, source = _jax_peak_memory(compiled, mark)
  flops = candidate_step_flops(attack, init_candidates[0])

  step_s = statistics.median(times) / steps_per_dispatch
  row = {
      "victim": victim, "clip": list(clip), "restarts": restarts, "matmul_precision": precision,
      "batching": resolve_batching(batching), "conv": resolve_conv(conv),
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "compile_s": compile_s, "step_s": step_s, "steps_per_s": 1.0 / step_s,
      "candidate_steps_per_s": restarts / step_s,
      "jax_peak_mem_bytes": peak, "jax_peak_mem_source": source,
      "candidate_step_gflop": flops / 1e9, "achieved_gflop_per_s": flops * restarts / step_s / 1e9,
  }
  if vs == "torch":
    from experiments import torch_peer  # imports torch: only with --vs=torch

    torch_peer.set_float32_precision(precision)
    peer = torch_peer.make_torch_attack(victim, params, tuple(clips.shape), target, labels,
                                        init_candidates, config, mode=torch_mode)
    row.update(torch_peer.time_torch_attack(peer, steps, steps_per_dispatch))
    if not row["torch_finite"]:
      _log(f"  warning: non-finite torch loss for {victim} R={restarts}")
    row["speedup"] = row["candidate_steps_per_s"] / row["torch_candidate_steps_per_s"]
  return row


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows as a markdown table (with the torch-peer columns when the rows have them)."""
  vs = any("torch_step_s" in r for r in rows)
  cols = ["victim", "clip", "R", "batching", "conv", "backend", "compile s", "step ms", "steps/s",
          "cand. steps/s", "GFLOP/s"]
  if vs:
    cols += ["torch mode", "torch 1st step s", "torch step ms", "torch cand. steps/s",
             "speedup", "JAX peak MB", "torch peak MB"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [r["victim"], "x".join(map(str, r["clip"])), r["restarts"], r["batching"], r["conv"],
             r["backend"], f"{r['compile_s']:.2f}", f"{1e3 * r['step_s']:.2f}",
             f"{r['steps_per_s']:.2f}", f"{r['candidate_steps_per_s']:.2f}",
             f"{r['achieved_gflop_per_s']:.1f}"]
    if vs and "torch_step_s" in r:
      cells += [r["torch_mode"], f"{r['torch_compile_s']:.2f}", f"{1e3 * r['torch_step_s']:.2f}",
                f"{r['torch_candidate_steps_per_s']:.2f}", f"{r['speedup']:.2f}x",
                f"{r['jax_peak_mem_bytes'] / 2**20:.1f}",
                f"{r['torch_peak_mem_bytes'] / 2**20:.1f}"]
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  clip = tuple(_positive_ints(_CLIP.value))
  restarts = _positive_ints(_RESTARTS.value)
  batchings = ["vmap", "map"] if _BATCHING.value == "both" else [_BATCHING.value]
  convs = ["xla", "im2col"] if _CONV.value == "both" else [_CONV.value]
  if _VS.value == "torch":
    try:
      import torch
    except ImportError:
      sys.exit(f"error: {_TORCH_MISSING}")
    _log(f"torch {torch.__version__}: {torch.get_num_threads()} threads")
  _log(f"backend={jax.default_backend()} device={jax.devices()[0]} clip={clip}; "
       f"a 2048x2048 float32 matmul runs at {matmul_gflops():.0f} GFLOP/s")
  rows = []
  for victim in _VICTIMS.value:
    for r in restarts:
      for batching, conv in itertools.product(batchings, convs):
        _log(f"[{victim} R={r} batching={batching} conv={conv}] compiling + timing ...")
        row = bench_one(victim, r, batching, clip, _STEPS.value, _STEPS_PER_DISPATCH.value,
                        _SEED.value, _VS.value, _TORCH_MODE.value, conv, _PRECISION.value)
        _log(f"  compile {row['compile_s']:.2f}s, step {1e3 * row['step_s']:.2f}ms, "
             f"{row['candidate_steps_per_s']:.2f} candidate steps/s")
        if "torch_step_s" in row:
          _log(f"  torch ({row['torch_mode']}): step {1e3 * row['torch_step_s']:.2f}ms, "
               f"{row['torch_candidate_steps_per_s']:.2f} candidate steps/s, "
               f"JAX speedup {row['speedup']:.2f}x")
        rows.append(row)
  print(json.dumps(rows, indent=2))
  _log(markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
