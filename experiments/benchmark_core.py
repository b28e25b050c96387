"""The attack-step benchmark itself, free of command-line flags (importable anywhere).

`bench_one` compiles and times one victim × R × batching × conv configuration of the default
attack (1 − cosine gradient matching + spatio-temporal TV, signed Adam) against the FedSGD update
of one synthetic clip, optionally side by side with the PyTorch peer; `markdown_table` formats
rows. The command line is `experiments.benchmark`.

Besides the project's victims, `LIBRARY_MODELS` are the c3d victim written with other libraries
(same architecture, same weights, so the same function): their rows show what the attack makes
of a model it did not build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from experiments import profile_summary
from experiments.gemm_ceiling import candidate_step_gemm_ceiling
from experiments.host_memory import host_mark, host_peak_since
import vidleak_jax as vl
from vidleak_jax.attack.config import resolve_batching, resolve_conv, resolve_map_batch_size
from vidleak_jax.attack.driver import compile_hoisted

NUM_CLASSES = 4
# The c3d victim (`vidleak_jax.models.victims.C3D`) written with flax.linen (channels-last, like the
# victim) and with plain `lax` (channels-first NCDHW / OIDHW, lax's default layout).
LIBRARY_MODELS = ("c3d_linen", "c3d_lax")
_C3D_STRIDES = ((1, 2, 2), (2, 2, 2), (1, 1, 1))


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


CACHE_HIT = "/jax/compilation_cache/cache_hits"  # JAX's monitoring event of a persistent-cache hit


def timed_compile(fn: Any, *args: Any, precision: str) -> tuple[Any, Any, float, int]:
  """(callable, its `Compiled`, seconds, persistent-cache hits) of tracing, lowering and compiling
  `fn(*args)` the way the attack driver does (`driver.compile_hoisted`: closed-over arrays as
  arguments) from empty in-memory caches: with a persistent cache
  (`experiments.cli.enable_compilation_cache`) a first call measures a cold compile, a second one
  the warm compile that a later run gets."""
  hits = []

  def listener(event: str, **_: Any) -> None:
    if event == CACHE_HIT:
      hits.append(event)

  jax.clear_caches()
  jax.monitoring.register_event_listener(listener)
  try:
    start = time.perf_counter()
    with jax.default_matmul_precision(precision):
      run, compiled = compile_hoisted(fn, *args)
    seconds = time.perf_counter() - start
  finally:
    jax.monitoring.unregister_event_listener(listener)
  return run, compiled, seconds, len(hits)


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


def _c3d_linen(victim: Any, params: Any) -> tuple[Any, Any]:
  """(apply_fn, params) of a flax.linen C3D computing what `victim` (a default c3d) computes."""
  import flax.linen as linen  # only for these rows

  mean, std = victim.preprocess.mean, victim.preprocess.std
  features, classes = params["conv1"]["kernel"].shape[-1], params["head"]["kernel"].shape[-1]

  class C3D(linen.Module):
    @linen.compact
    def __call__(self, clips):
      x = (clips - jnp.asarray(mean, clips.dtype)) / jnp.asarray(std, clips.dtype)
      for i, strides in enumerate(_C3D_STRIDES):
        x = jax.nn.sigmoid(linen.Conv(features, (3, 3, 3), strides, padding="SAME",
                                      name=f"conv{i + 1}")(x))
      return linen.Dense(classes, name="head")(x.reshape(x.shape[0], -1))

  module = C3D()
  return lambda p, clips: module.apply({"params": p}, clips), params


def _c3d_lax(victim: Any, params: Any, clip: tuple[int, ...]) -> tuple[Any, Any]:
  """(apply_fn, params) of a plain-`lax` channels-first C3D computing what `victim` computes."""
  mean, std = victim.preprocess.mean, victim.preprocess.std
  dims = clip[:3]  # T, H, W after the SAME-padded strided convolutions
  for strides in _C3D_STRIDES:
    dims = tuple(-(-d // s) for d, s in zip(dims, strides))
  head = params["head"]["kernel"]  # rows in the victim's (t, h, w, f) order -> (f, t, h, w)
  head = head.reshape(*dims, -1, head.shape[-1]).transpose(3, 0, 1, 2, 4)
  lax_params = {f"conv{i}": {"kernel": params[f"conv{i}"]["kernel"].transpose(4, 3, 0, 1, 2),
                             "bias": params[f"conv{i}"]["bias"]} for i in (1, 2, 3)}
  lax_params["head"] = {"kernel": head.reshape(-1, head.shape[-1]),
                        "bias": params["head"]["bias"]}

  def apply_fn(p, clips):
    x = (clips - jnp.asarray(mean, clips.dtype)) / jnp.asarray(std, clips.dtype)
    x = x.transpose(0, 4, 1, 2, 3)  # NCDHW
    for i, strides in enumerate(_C3D_STRIDES):
      conv = p[f"conv{i + 1}"]
      x = lax.conv_general_dilated(x, conv["kernel"], strides, "SAME")
      x = jax.nn.sigmoid(x + conv["bias"][:, None, None, None])
    return x.reshape(x.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]

  return apply_fn, lax_params


def library_model(name: str, victim: Any, params: Any,
                  clip: tuple[int, ...]) -> tuple[Any, Any]:
  """(apply_fn, params) of library model `name` (`LIBRARY_MODELS`) computing what `victim`, a
  default c3d for clips [B, *clip] with parameters `params`, computes."""
  if name == "c3d_linen":
    return _c3d_linen(victim, params)
  if name == "c3d_lax":
    return _c3d_lax(victim, params, clip)
  raise KeyError(f"unknown library model {name!r}; valid: {', '.join(LIBRARY_MODELS)}")


def bench_one(victim: str, restarts: int, batching: str, clip: tuple[int, int, int, int],
              steps: int, steps_per_dispatch: int, seed: int, vs: str = "none",
              torch_mode: str = "auto", conv: str = "auto", precision: str = "highest",
              gemm_ceiling: bool = False, map_batch_size: int | None = None,
              warm_compile: bool = False, profile_dir: str | None = None) -> dict[str, Any]:
  """Compiles and times `attack.run` for one victim × R × batching; returns one result row.

  `victim`: a project victim or one of `LIBRARY_MODELS` (built from the c3d victim's weights).
  With `vs="torch"` the PyTorch peer is timed on the same params, target and initial candidates
  (for a library model: the c3d peer, which computes the same function).
  With `gemm_ceiling` the row also holds the step's matmul floor (`experiments.gemm_ceiling`).
  With `warm_compile` (needs an empty persistent compilation cache) the step is compiled twice:
  `compile_s` is the cold compile, `compile_warm_s` the second one, served by the cache (NaN, with
  a warning, when the cache did not serve it).
  With `profile_dir` the timed dispatches run under `jax.profiler` (a trace in that directory) and
  the row holds its `experiments.profile_summary` as "profile".
  Every row holds the objective and its gradient's norm at the first initial candidate
  ("start_objective", "start_gradient_norm", same seed: the same candidate for every conv and
  batching), so rows of two conv modes check each other.
  """
  t, h, w, c = clip
  k_model, k_data, k_init = jax.random.split(jax.random.key(seed), 3)
  peer = "c3d" if victim in LIBRARY_MODELS else victim
  model = vl.models.create(peer, k_model, frames=t, height=h, width=w, channels=c,
                           num_classes=NUM_CLASSES)
  apply_fn, params = peer_apply_fn, peer_params = vl.models.pure(model)
  if victim in LIBRARY_MODELS:
    apply_fn, params = library_model(victim, model, params, clip)
  clips, labels = vl.data.synthetic.synthetic_clips(
      k_data, 1, frames=t, height=h, width=w, channels=c, num_classes=NUM_CLASSES)
  target = vl.fl.updates.client_update(apply_fn, params, clips, labels)
  config = vl.attack.AttackConfig(restarts=restarts, batching=batching, conv=conv,
                                  log_every=steps_per_dispatch)
  if map_batch_size is not None:
    config = dataclasses.replace(config, map_batch_size=map_batch_size)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, tuple(clips.shape), config)
  state = jax.block_until_ready(attack.init(k_init))
  init_candidates = state.candidates
  n = jnp.asarray(steps_per_dispatch, jnp.int32)

  run, compiled, compile_s, hits = timed_compile(attack.run, state, n, precision=precision)
  if warm_compile:
    if hits:
      _log(f"  warning: the cold compile of {victim} R={restarts} hit the persistent cache")
    run, compiled, compile_warm_s, hits = timed_compile(attack.run, state, n,
                                                        precision=precision)
    if not hits:
      _log(f"  warning: the persistent cache did not serve the warm compile of {victim} "
           f"R={restarts}")
      compile_warm_s = float("nan")

  mark = host_mark()  # host peak memory of the runs (warm-up included), not of the compile

  state, _ = jax.block_until_ready(run(state, n))  # warm-up
  times = []
  with profile_summary.trace(profile_dir) if profile_dir else contextlib.nullcontext():
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = jax.block_until_ready(run(state, n))
      times.append(time.perf_counter() - start)
  if not bool(jnp.all(jnp.isfinite(metrics["loss"]))):
    _log(f"  warning: non-finite loss for {victim} R={restarts} {batching}")
  peak, source = _jax_peak_memory(compiled, mark)
  flops = candidate_step_flops(attack, init_candidates[0])
  with jax.default_matmul_precision(precision):
    start_value, start_grad = jax.jit(jax.value_and_grad(lambda x: attack.objective(x)[0]))(
        init_candidates[0])

  step_s = statistics.median(times) / steps_per_dispatch
  row = {
      "victim": victim, "clip": list(clip), "restarts": restarts, "matmul_precision": precision,
      "batching": resolve_batching(batching), "conv": resolve_conv(conv),
      "map_batch_size": resolve_map_batch_size(config.map_batch_size, tuple(clips.shape)),
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "compile_s": compile_s, **({"compile_warm_s": compile_warm_s} if warm_compile else {}),
      "step_s": step_s, "steps_per_s": 1.0 / step_s,
      "candidate_steps_per_s": restarts / step_s,
      "jax_peak_mem_bytes": peak, "jax_peak_mem_source": source,
      "candidate_step_gflop": flops / 1e9, "achieved_gflop_per_s": flops * restarts / step_s / 1e9,
      "start_objective": float(start_value),
      "start_gradient_norm": float(jnp.linalg.norm(start_grad.ravel())),
  }
  if profile_dir:
    row["profile"] = profile_summary.summarize(profile_dir)
  if gemm_ceiling:
    with jax.default_matmul_precision(precision):
      group = restarts if row["batching"] == "vmap" else min(row["map_batch_size"], restarts)
      row.update(candidate_step_gemm_ceiling(lambda x: attack.objective(x)[0], init_candidates,
                                             group))
  if vs == "torch":
    from experiments import torch_peer  # imports torch: only with --vs=torch

    torch_peer.set_float32_precision(precision)
    peer_target = vl.fl.updates.client_update(peer_apply_fn, peer_params, clips, labels)
    peer = torch_peer.make_torch_attack(peer, peer_params, tuple(clips.shape), peer_target,
                                        labels, init_candidates, config, mode=torch_mode)
    row.update(torch_peer.time_torch_attack(peer, steps, steps_per_dispatch))
    if not row["torch_finite"]:
      _log(f"  warning: non-finite torch loss for {victim} R={restarts}")
    row["speedup"] = row["candidate_steps_per_s"] / row["torch_candidate_steps_per_s"]
    if gemm_ceiling:  # the most any rewrite of the non-matmul work could reach against PyTorch
      row["gemm_ceiling_vs_torch"] = (row["gemm_ceiling_candidate_steps_per_s"]
                                      / row["torch_candidate_steps_per_s"])
  return row


def add_cost_vs_single(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows of one round with the per-candidate cost relative to one candidate alone.

  `candidate_cost_vs_r1` = (step_s / R) / s1 and, with a matmul floor, `gemm_floor_vs_r1` =
  (gemm_s_per_step / R) / s1, where s1 is the fastest R = 1 step of the same victim, clip and conv
  in `rows` (any batching: at R = 1 they compute the same thing). Below 1, batching pays; the
  floor ratio is the least the first could become with XLA's matrix products unchanged. Rows
  without an R = 1 partner are returned unchanged.
  """
  def family(row):
    return row["victim"], tuple(row["clip"]), row["conv"]

  single = {}
  for row in rows:
    if row["restarts"] == 1:
      single[family(row)] = min(row["step_s"], single.get(family(row), float("inf")))
  out = []
  for row in rows:
    row = dict(row)
    base = single.get(family(row))
    if base is not None:
      row["candidate_cost_vs_r1"] = row["step_s"] / row["restarts"] / base
      if "gemm_s_per_step" in row:
        row["gemm_floor_vs_r1"] = row["gemm_s_per_step"] / row["restarts"] / base
    out.append(row)
  return out


def add_conv_agreement(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows where another conv mode ran the same victim, clip, R and batching, with the relative
  differences of their start objective and start gradient norm to that row's: "start_vs_conv"
  (its mode: im2col where it ran, else the first), "start_objective_rel_diff",
  "start_gradient_rel_diff". Two modes compute one function: these are float rounding (pallas
  against im2col on a CPU: 1e-5 / 1e-7 at float32 `highest`), unless one of them is wrong."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    key = row["victim"], tuple(row["clip"]), row["restarts"], row["batching"]
    groups.setdefault(key, []).append(row)
  out = []
  for row in rows:
    row = dict(row)
    group = groups[row["victim"], tuple(row["clip"]), row["restarts"], row["batching"]]
    ref = next((r for r in group if r["conv"] == "im2col"), group[0])
    if ref["conv"] != row["conv"]:
      row["start_vs_conv"] = ref["conv"]
      for key, diff in (("start_objective", "start_objective_rel_diff"),
                        ("start_gradient_norm", "start_gradient_rel_diff")):
        row[diff] = abs(row[key] - ref[key]) / max(abs(ref[key]), 1e-30)
    out.append(row)
  return out


def combine_rounds(rounds: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
  """One row per configuration from `rounds[i][j]` (configuration j timed in round i, the
  configurations interleaved in every round): median step and compile times with the rates derived
  from them, the range of candidate-steps/s over rounds, and the median of the per-round speedups
  (each a ratio of two timings taken back to back, so a slow spell of the machine cancels); the
  matmul floor and the ratios of `add_cost_vs_single` likewise as medians with their ranges."""
  if not rounds or any(len(r) != len(rounds[0]) for r in rounds):
    raise ValueError("rounds must be a non-empty list of equally long row lists")
  combined = []
  for timings in zip(*rounds):
    row = dict(timings[0], rounds=len(timings))
    restarts = row["restarts"]
    for prefix in ("", "torch_"):
      if f"{prefix}step_s" not in row:
        continue
      step_s = statistics.median(t[f"{prefix}step_s"] for t in timings)
      for compile_key in (f"{prefix}compile_s", f"{prefix}compile_warm_s"):
        if compile_key in row:
          row[compile_key] = statistics.median(t[compile_key] for t in timings)
      row.update({f"{prefix}step_s": step_s, f"{prefix}steps_per_s": 1.0 / step_s,
                  f"{prefix}candidate_steps_per_s": restarts / step_s})
      rates = [t[f"{prefix}candidate_steps_per_s"] for t in timings]
      row[f"{prefix}candidate_steps_per_s_range"] = [min(rates), max(rates)]
    row["achieved_gflop_per_s"] = row["candidate_step_gflop"] * row["candidate_steps_per_s"]
    if "gemm_s_per_step" in row:
      row["gemm_s_per_step"] = statistics.median(t["gemm_s_per_step"] for t in timings)
      row["gemm_ceiling_candidate_steps_per_s"] = restarts / row["gemm_s_per_step"]
    for ratio in ("candidate_cost_vs_r1", "gemm_floor_vs_r1", "gemm_ceiling_vs_torch"):  # paired
      if ratio in row:
        values = [t[ratio] for t in timings]
        row[ratio], row[f"{ratio}_range"] = statistics.median(values), [min(values), max(values)]
    if "speedup" in row:
      speedups = [t["speedup"] for t in timings]
      row["speedup"] = statistics.median(speedups)
      row["speedup_range"] = [min(speedups), max(speedups)]
    combined.append(row)
  return combined


def _rate(row: dict[str, Any], prefix: str) -> str:
  """Candidate-steps/s, with the range over rounds when there were several."""
  cell = f"{row[prefix + 'candidate_steps_per_s']:.2f}"
  spread = row.get(prefix + "candidate_steps_per_s_range")
  return cell + (f" ({spread[0]:.0f}–{spread[1]:.0f})" if spread else "")


def _ratio(row: dict[str, Any], key: str, suffix: str = "") -> str:
  """`row[key]` with 2 decimals (and its range over rounds), "-" when absent."""
  if key not in row:
    return "-"
  spread = row.get(f"{key}_range")
  return f"{row[key]:.2f}{suffix}" + (f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread else "")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows as a markdown table (with the warm-compile, matmul-floor, cost-vs-R=1, conv-agreement
  and torch-peer columns when rows have them)."""
  vs = any("torch_step_s" in r for r in rows)
  gemm = any("gemm_s_per_step" in r for r in rows)
  relative = []  # (column, row key) of the ratios to one candidate alone
  if any("candidate_cost_vs_r1" in r for r in rows):
    relative = [("cost per cand. ÷ R=1", "candidate_cost_vs_r1")]
    relative += [("matmul floor ÷ R=1", "gemm_floor_vs_r1")] if gemm else []
  warm = any("compile_warm_s" in r for r in rows)
  agree = any("start_objective_rel_diff" in r for r in rows)
  cols = ["victim", "clip", "R", "batching", "conv", "backend", "compile s",
          *(["warm compile s"] if warm else []), "step ms", "steps/s", "cand. steps/s", "GFLOP/s"]
  if gemm:
    cols += ["matmul-only ms", "matmul ceiling cand. steps/s"]
  cols += [column for column, _ in relative]
  cols += ["start obj. / grad. rel. diff (vs conv)"] if agree else []
  if vs:
    cols += ["torch mode", "torch 1st step s", "torch step ms", "torch cand. steps/s",
             "speedup", "JAX peak MB", "torch peak MB"]
    cols += ["matmul ceiling ÷ torch"] if gemm else []
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    batching = r["batching"] + (f"/{r['map_batch_size']}" if r["batching"] == "map" else "")
    cells = [r["victim"], "x".join(map(str, r["clip"])), r["restarts"], batching, r["conv"],
             r["backend"], f"{r['compile_s']:.2f}"]
    cells += [_ratio(r, "compile_warm_s")] if warm else []
    cells += [f"{1e3 * r['step_s']:.2f}", f"{r['steps_per_s']:.2f}", _rate(r, ""),
              f"{r['achieved_gflop_per_s']:.1f}"]
    if gemm and "gemm_s_per_step" in r:
      cells += [f"{1e3 * r['gemm_s_per_step']:.2f}", f"{r['gemm_ceiling_candidate_steps_per_s']:.1f}"]
    elif gemm:
      cells += ["-", "-"]
    cells += [_ratio(r, key) for _, key in relative]
    if agree:
      cells += [f"{r['start_objective_rel_diff']:.1e} / {r['start_gradient_rel_diff']:.1e} "
                f"({r['start_vs_conv']})" if "start_vs_conv" in r else "-"]
    if vs and "torch_step_s" in r:
      cells += [r["torch_mode"], f"{r['torch_compile_s']:.2f}", f"{1e3 * r['torch_step_s']:.2f}",
                _rate(r, "torch_"), _ratio(r, "speedup", "x"),
                f"{r['jax_peak_mem_bytes'] / 2**20:.1f}",
                f"{r['torch_peak_mem_bytes'] / 2**20:.1f}"]
      cells += [_ratio(r, "gemm_ceiling_vs_torch", "x")] if gemm else []
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines)
