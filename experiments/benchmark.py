"""Benchmark of the attack step: compile time and optimizer steps per second per victim × restarts.

The attack is the `AttackConfig` default (1 − cosine gradient matching + spatio-temporal TV priors,
signed Adam) against a FedSGD update of one synthetic clip with known labels. Prints one JSON list
of rows to stdout and a markdown table (plus progress lines) to stderr. Every step is compiled
twice in a persistent compilation cache of its own, emptied before each configuration: cold
(`compile_s`) and warm (`compile_warm_s`, what a later run of the CLI gets from its cache). With --vs=torch every row
also times the PyTorch peer (experiments/torch_peer.py) on the identical setup: same params, clip,
target gradient and initial candidates (needs `pip install -e ".[bench]"`).

  python -m experiments.benchmark --victims=c3d,frame_cnn --restarts=1,8,32 --batching=both
  python -m experiments.benchmark --vs=torch --victims=c3d,frame_cnn --restarts=1,4
  python -m experiments.benchmark --vs=torch --restarts=1,32 --gemm_ceiling  # + the matmul floor
  python -m experiments.benchmark --victims=c3d,c3d_linen,c3d_lax --restarts=1,8  # other libraries
  python -m experiments.benchmark --victims=c3d --clip=8,32,32,3 --clip=16,112,112,3 \
      --restarts=1,32,256 --conv=im2col,pallas --profile_dir=/tmp/prof  # where the time goes

The measuring code lives in `experiments.benchmark_core` (no flags, importable by tests).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from typing import Sequence

import jax
from absl import app, flags

from experiments import cli, profile_summary
from experiments.benchmark_core import (LIBRARY_MODELS, add_conv_agreement, add_cost_vs_single,
                                        bench_one, combine_rounds, markdown_table, matmul_gflops)
import vidleak_jax as vl
from vidleak_jax.attack.config import BATCHING, CONVS
from vidleak_jax.pipeline import MATMUL_PRECISIONS

_MODELS = (*vl.models.VICTIMS, *LIBRARY_MODELS)
_VICTIMS = flags.DEFINE_list(
    "victims", ["c3d", "frame_cnn"],
    f"Comma list of victims; valid: {', '.join(_MODELS)} (c3d_linen / c3d_lax: the c3d victim, "
    "same weights, written with flax.linen / plain channels-first lax).")
_RESTARTS = flags.DEFINE_list("restarts", ["1", "8", "32"], "Comma list of restart counts R.")
_CLIP = flags.DEFINE_multi_string(
    "clip", ["8,32,32,3"], "Clip shape T,H,W,C (batch B=1); repeat the flag for several shapes.")
_CONV = flags.DEFINE_list(
    "conv", ["auto"],
    "Comma list of how the victim's convolutions run in the attack: auto (= im2col: rewritten as "
    "patches + matmuls by vl.attack.fast_convs), pallas (an implicit-GEMM Pallas kernel, "
    "vl.attack.pallas_conv), xla (as written); both = xla,im2col.")
_BATCHING = flags.DEFINE_enum("batching", "auto", [*BATCHING, "both"],
                              "How the R restarts are batched: vmap, map, or both.")
_MAP_BATCH_SIZE = flags.DEFINE_integer(
    "map_batch_size", vl.attack.AttackConfig().map_batch_size,
    "With batching=map: candidates vmapped together per lax.map step (0: auto).", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed dispatches per configuration.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Time every configuration this many times, round-robin (all configurations once "
    "per round); rows report medians over rounds and the per-round range.", lower_bound=1)
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Optimizer steps per jitted dispatch (AttackConfig.log_every).",
    lower_bound=1)
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", list(MATMUL_PRECISIONS),
    "float32 matmul/conv precision on both sides (the pipeline's default is highest; 'default' "
    "lets GPUs use TF32).")
_GEMM_CEILING = flags.DEFINE_bool(
    "gemm_ceiling", False,
    "Also time the step's matrix products alone (XLA's kernels, at the step's shapes): the "
    "candidate-steps/s that no rewrite of the other work could exceed (experiments.gemm_ceiling).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the victim, data and candidates.")
_ROWS_JSONL = flags.DEFINE_string(
    "rows_jsonl", "",
    "If set, every configuration's row is appended to this JSON-lines file as soon as it is "
    "timed (what a run cut short keeps); stdout still gets the combined rows at the end.")
_KEEP_GOING = flags.DEFINE_bool(
    "keep_going", False,
    "A configuration that raises (a kernel that does not compile, memory) is logged, recorded in "
    "--rows_jsonl with its error, left out of later rounds and of the table, and the others run; "
    "the exit status is then 3. Without it the first error ends the run.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "",
    "If set, every configuration's timed dispatches are traced with jax.profiler into a folder of "
    "its own here, and its rows hold (and stderr shows) where the device's time went "
    "(experiments.profile_summary).")
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
    "victims", lambda v: bool(v) and all(name in _MODELS for name in v),
    message=f"--victims must be a non-empty comma list of: {', '.join(_MODELS)}")
flags.register_validator("restarts", lambda v: _positive_ints(v) is not None,
                         message="--restarts must be a comma list of positive integers")
flags.register_validator(
    "clip", lambda v: bool(v) and all(_clip(c) is not None for c in v),
    message="--clip must be four positive integers T,H,W,C (the flag repeated for more shapes)")
flags.register_validator(
    "conv", lambda v: bool(v) and all(c in (*CONVS, "both") for c in v),
    message=f"--conv must be a non-empty comma list of: {', '.join(CONVS)}, both")


def _clip(value: str) -> tuple[int, ...] | None:
  """"T,H,W,C" as four positive ints, or None."""
  shape = _positive_ints(value.split(","))
  return tuple(shape) if shape is not None and len(shape) == 4 else None


def _convs(values: Sequence[str]) -> list[str]:
  """--conv's modes, "both" expanded to xla, im2col, each once in the order given."""
  out = [c for v in values for c in (("xla", "im2col") if v == "both" else (v,))]
  return list(dict.fromkeys(out))


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _empty(directory: str) -> None:
  """Removes the files under `directory` (compiled programs; on GPUs also XLA's autotuning
  results), keeping its folders: the next compile is cold."""
  for folder, _, files in os.walk(directory):
    for name in files:
      os.remove(os.path.join(folder, name))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  clips = list(dict.fromkeys(_clip(c) for c in _CLIP.value))
  restarts = _positive_ints(_RESTARTS.value)
  batchings = ["vmap", "map"] if _BATCHING.value == "both" else [_BATCHING.value]
  convs = _convs(_CONV.value)
  if _VS.value == "torch":
    try:
      import torch
    except ImportError:
      sys.exit(f"error: {_TORCH_MISSING}")
    _log(f"torch {torch.__version__}: {torch.get_num_threads()} threads")
  with tempfile.TemporaryDirectory(prefix="vidleak_jax_bench_xla_") as cache_dir:
    cli.enable_compilation_cache(cache_dir, min_compile_time_s=0.0)  # before anything compiles
    rows, failed = _bench(clips, restarts, batchings, convs, cache_dir)
  rows = add_conv_agreement(rows)
  print(json.dumps(rows, indent=2))
  if rows:
    _log(markdown_table(rows))
  for row in rows:
    if "profile" in row:
      name = _name(row["victim"], row["clip"], row["restarts"], row["batching"], row["conv"])
      _log("\n" + profile_summary.markdown(row["profile"], name))
  if failed:
    _log(f"failed (left out of the table, errors in the log above): {', '.join(failed)}")
    sys.exit(3)


def _name(victim: str, clip: Sequence[int], restarts: int, batching: str, conv: str) -> str:
  """A configuration's name (its profile's folder)."""
  return f"{victim}_{'x'.join(map(str, clip))}_R{restarts}_{batching}_{conv}"


def _bench(clips: list[tuple[int, ...]], restarts: list[int], batchings: list[str],
           convs: list[str], cache_dir: str) -> tuple[list[dict], list[str]]:
  """(The rows of every configuration, combined over rounds; the names of those that failed,
  with --keep_going)."""
  _log(f"backend={jax.default_backend()} device={jax.devices()[0]} clips={clips} "
       f"matmul_precision={_PRECISION.value}; a 2048x2048 float32 matmul runs at "
       f"{matmul_gflops():.0f} GFLOP/s")
  configurations = list(itertools.product(_VICTIMS.value, clips, restarts, batchings, convs))
  rounds, failed = [], set()
  for i in range(_ROUNDS.value):
    rows = []
    round_note = f" round {i + 1}/{_ROUNDS.value}" if _ROUNDS.value > 1 else ""
    for configuration in configurations:
      victim, clip, r, batching, conv = configuration
      name = _name(*configuration)
      if name in failed:
        continue
      _log(f"[{name}{round_note}] compiling + timing ...")
      _empty(cache_dir)
      profile_dir = os.path.join(_PROFILE_DIR.value,
                                 name + (f"_round{i + 1}" if round_note else ""))
      try:
        row = bench_one(victim, r, batching, clip, _STEPS.value, _STEPS_PER_DISPATCH.value,
                        _SEED.value, _VS.value, _TORCH_MODE.value, conv, _PRECISION.value,
                        _GEMM_CEILING.value, _MAP_BATCH_SIZE.value, warm_compile=True,
                        profile_dir=profile_dir if _PROFILE_DIR.value else None)
      except Exception as e:  # pylint: disable=broad-except
        if not _KEEP_GOING.value:
          raise
        failed.add(name)
        error = f"{type(e).__name__}: {e}"[:4000]
        _log(f"  failed: {error}")
        _append_row({"victim": victim, "clip": list(clip), "restarts": r, "batching": batching,
                     "conv": conv, "error": error})
        continue
      _append_row(row)
      _log(f"  compile {row['compile_s']:.2f}s cold, {row['compile_warm_s']:.2f}s warm; step "
           f"{1e3 * row['step_s']:.2f}ms, {row['candidate_steps_per_s']:.2f} candidate steps/s")
      if "gemm_s_per_step" in row:
        _log(f"  matmuls alone {1e3 * row['gemm_s_per_step']:.2f}ms per step: ceiling "
             f"{row['gemm_ceiling_candidate_steps_per_s']:.2f} candidate steps/s")
      if "torch_step_s" in row:
        _log(f"  torch ({row['torch_mode']}): step {1e3 * row['torch_step_s']:.2f}ms, "
             f"{row['torch_candidate_steps_per_s']:.2f} candidate steps/s, "
             f"JAX speedup {row['speedup']:.2f}x")
      rows.append((name, row))
    rounds.append(rows)
  # A configuration that failed in a later round only is left out of every round.
  rounds = [add_cost_vs_single([row for name, row in rows if name not in failed])
            for rows in rounds]
  return (combine_rounds(rounds) if len(rounds) > 1 else rounds[0]), sorted(failed)


def _append_row(row: dict) -> None:
  """Appends `row` to --rows_jsonl (when set)."""
  if _ROWS_JSONL.value:
    with open(_ROWS_JSONL.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
