"""Benchmark of the attack step: compile time and optimizer steps per second per victim × restarts.

The attack is the `AttackConfig` default (1 − cosine gradient matching + spatio-temporal TV priors,
signed Adam) against a FedSGD update of one synthetic clip with known labels. Prints one JSON list
of rows to stdout and a markdown table (plus progress lines) to stderr.

  python -m experiments.benchmark --victims=c3d,frame_cnn --restarts=1,8,32 --batching=both
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

import vidleak_jax as vl
from vidleak_jax.attack.config import BATCHING

NUM_CLASSES = 4

_VICTIMS = flags.DEFINE_list("victims", ["c3d", "frame_cnn"],
                             f"Comma list of victims; valid: {', '.join(vl.models.VICTIMS)}.")
_RESTARTS = flags.DEFINE_list("restarts", ["1", "8", "32"], "Comma list of restart counts R.")
_CLIP = flags.DEFINE_list("clip", ["8", "32", "32", "3"], "Clip shape T,H,W,C (batch B=1).")
_BATCHING = flags.DEFINE_enum("batching", "map", [*BATCHING, "both"],
                              "How the R restarts are batched: vmap, map, or both.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed dispatches per configuration.", lower_bound=1)
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Optimizer steps per jitted dispatch (AttackConfig.log_every).",
    lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the victim, data and candidates.")


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


def bench_one(victim: str, restarts: int, batching: str, clip: tuple[int, int, int, int],
              steps: int, steps_per_dispatch: int, seed: int) -> dict[str, Any]:
  """Compiles and times `attack.run` for one victim × R × batching; returns one result row."""
  t, h, w, c = clip
  k_model, k_data, k_init = jax.random.split(jax.random.key(seed), 3)
  model = vl.models.create(victim, k_model, frames=t, height=h, width=w, channels=c,
                           num_classes=NUM_CLASSES)
  apply_fn, params = vl.models.pure(model)
  clips, labels = vl.data.synthetic.synthetic_clips(
      k_data, 1, frames=t, height=h, width=w, channels=c, num_classes=NUM_CLASSES)
  target = vl.fl.updates.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(restarts=restarts, batching=batching,
                                  log_every=steps_per_dispatch)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, tuple(clips.shape), config)
  state = jax.block_until_ready(attack.init(k_init))
  n = jnp.asarray(steps_per_dispatch, jnp.int32)

  start = time.perf_counter()
  compiled = jax.jit(attack.run).lower(state, n).compile()
  compile_s = time.perf_counter() - start

  state, _ = jax.block_until_ready(compiled(state, n))  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, n))
    times.append(time.perf_counter() - start)
  if not bool(jnp.all(jnp.isfinite(metrics["loss"]))):
    _log(f"  warning: non-finite loss for {victim} R={restarts} {batching}")

  step_s = statistics.median(times) / steps_per_dispatch
  return {
      "victim": victim, "clip": list(clip), "restarts": restarts, "batching": batching,
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "compile_s": compile_s, "step_s": step_s, "steps_per_s": 1.0 / step_s,
      "candidate_steps_per_s": restarts / step_s,
  }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows as a markdown table."""
  head = ("| victim | clip | R | batching | backend | compile s | step ms | steps/s "
          "| cand. steps/s |\n|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    lines.append(
        f"| {r['victim']} | {'x'.join(map(str, r['clip']))} | {r['restarts']} | {r['batching']} "
        f"| {r['backend']} | {r['compile_s']:.2f} | {1e3 * r['step_s']:.2f} "
        f"| {r['steps_per_s']:.2f} | {r['candidate_steps_per_s']:.2f} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  clip = tuple(_positive_ints(_CLIP.value))
  restarts = _positive_ints(_RESTARTS.value)
  batchings = list(BATCHING) if _BATCHING.value == "both" else [_BATCHING.value]
  _log(f"backend={jax.default_backend()} device={jax.devices()[0]} clip={clip}")
  rows = []
  for victim in _VICTIMS.value:
    for r in restarts:
      for batching in batchings:
        _log(f"[{victim} R={r} {batching}] compiling + timing ...")
        row = bench_one(victim, r, batching, clip, _STEPS.value, _STEPS_PER_DISPATCH.value,
                        _SEED.value)
        _log(f"  compile {row['compile_s']:.2f}s, step {1e3 * row['step_s']:.2f}ms, "
             f"{row['candidate_steps_per_s']:.2f} candidate steps/s")
        rows.append(row)
  print(json.dumps(rows, indent=2))
  _log(markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
