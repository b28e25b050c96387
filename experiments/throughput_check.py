"""The GPU throughput check in one command: the benchmark (one invocation, every conv mode, with
profiles) and the quickstart's compile times and PSNR per conv mode, with the figures the
throughput targets ask for.

  python -m experiments.throughput_check --out=/tmp/throughput            # on the GPU (~8 min)
  python -m experiments.throughput_check --out=/tmp/throughput --smoke    # tiny, any machine

Phases, each a subprocess bounded by what is left of --deadline_s (a run that does not fit is
skipped and says so): the environment; the quickstart preset's data + attack stages for every
seed and conv, the persistent compilation cache emptied before each conv's first seed (cold),
its later seeds served from it (warm: same shapes, same executable); `experiments.benchmark` on
the C3D at 8×32×32 and 16×112×112, R = 1, 32, 256, for each of --convs, its rows appended to
benchmark_rows.jsonl as they finish. After every phase <out>/summary.json and summary.md are
rewritten, so a run cut short keeps what it measured. PSNR is computed here with numpy (per frame
-10·log10(MSE), averaged over frames; tested equal to `vl.metrics.psnr`), so this process never
opens the accelerator that its phases' subprocesses use.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from experiments import profile_summary
from experiments.benchmark_core import add_conv_agreement, add_cost_vs_single, markdown_table
from vidleak_jax.attack.config import CONVS

_OUT = flags.DEFINE_string("out", None, "Directory of the outputs (created).", required=True)
_DEADLINE = flags.DEFINE_integer("deadline_s", 540, "Wall-clock budget of all phases.",
                                 lower_bound=1)
_CONVS = flags.DEFINE_list("convs", ["im2col", "pallas"], "Conv modes compared.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Quickstart seeds.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes and few steps: checks the machinery, "
                           "measures nothing.")
flags.register_validator("convs", lambda v: bool(v) and all(c in CONVS for c in v),
                         message=f"--convs must be a non-empty comma list of: {', '.join(CONVS)}")
flags.register_validator("seeds", lambda v: bool(v) and all(s.isdigit() for s in v),
                         message="--seeds must be a non-empty comma list of non-negative integers")
_KEEP_TRACES = flags.DEFINE_bool("keep_traces", False, "Keep the raw profiler traces (large) "
                                 "besides their summaries in the benchmark rows.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "flags", "quickstart.flags")
# The benchmark's clips (R = 1, 32, 256 each); the smoke run's stand-ins (R = 1, 2).
BENCH = ("8,32,32,3", "16,112,112,3")
SMOKE_BENCH = ("4,8,8,3", "4,16,16,3")
TARGETS = {"c3d_8x32x32_r256_candidate_steps_per_s": 200_000,
           "c3d_16x112x112_r32_cost_vs_r1": 0.3, "quickstart_warm_compile_s": 5.0}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """Mean over clips of the per-frame PSNR averaged over frames; x, y [B, T, H, W, C] in [0, 1]."""
  mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=(2, 3, 4))
  return float(np.mean(-10.0 * np.log10(np.maximum(mse, 1e-20))))


class Runner:
  """Runs phases as subprocesses within one deadline."""

  def __init__(self, deadline_s: float):
    self.end = time.monotonic() + deadline_s

  def left(self) -> float:
    return self.end - time.monotonic()

  def run(self, cmd: Sequence[str], log_path: str, stdout_path: str | None = None,
          need_s: float = 10.0) -> dict[str, Any]:
    """{"cmd", "rc" (None: skipped or timed out), "wall_s", "note"}; stderr to `log_path`."""
    record: dict[str, Any] = {"cmd": " ".join(cmd), "rc": None, "wall_s": 0.0}
    if self.left() < need_s:
      record["note"] = f"skipped: {self.left():.0f} s left, needs ~{need_s:.0f}"
      _log(f"  {record['note']}")
      return record
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as err, \
        open(stdout_path or os.devnull, "w", encoding="utf-8") as out:
      try:
        record["rc"] = subprocess.run(cmd, stdout=out, stderr=err, cwd=REPO, env=env,
                                      timeout=self.left(), check=False).returncode
      except subprocess.TimeoutExpired:
        record["note"] = "stopped at the deadline"
    record["wall_s"] = time.monotonic() - start
    return record


def benchmark(runner: Runner, out: str) -> dict[str, Any]:
  """The benchmark phase: its rows (combined at the end, else as appended so far)."""
  jsonl = os.path.join(out, "benchmark_rows.jsonl")
  profiles = os.path.join(out, "profiles")
  cmd = [sys.executable, "-m", "experiments.benchmark", "--victims=c3d", "--keep_going",
         f"--conv={','.join(_CONVS.value)}", f"--rows_jsonl={jsonl}", f"--profile_dir={profiles}"]
  if _SMOKE.value:
    cmd += [f"--clip={c}" for c in SMOKE_BENCH] + ["--steps=1", "--steps_per_dispatch=1",
                                                   "--restarts=1,2"]
  else:
    cmd += [f"--clip={c}" for c in BENCH] + ["--steps=3", "--steps_per_dispatch=10",
                                             "--restarts=1,32,256"]
  _log("benchmark: " + " ".join(cmd[2:]))
  record = runner.run(cmd, os.path.join(out, "benchmark.log"), os.path.join(out, "benchmark.json"),
                      need_s=60)
  appended = []
  if os.path.exists(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      appended = [json.loads(line) for line in f if line.strip()]
  try:
    with open(os.path.join(out, "benchmark.json"), encoding="utf-8") as f:
      rows = json.load(f)
  except (OSError, ValueError):  # cut short: the rows timed so far, compared as the end would
    rows = add_conv_agreement(add_cost_vs_single([r for r in appended if "error" not in r]))
  if not _KEEP_TRACES.value:
    shutil.rmtree(profiles, ignore_errors=True)
  return {**record, "rows": rows, "failed": [r for r in appended if "error" in r]}


def environment() -> dict[str, str]:
  """jax's version, backend and first device, asked of a subprocess: this process keeps off the
  accelerator, which its phases' subprocesses use (a GPU client here would hold its memory)."""
  code = ("import json, sys, jax; print(json.dumps({'jax': jax.__version__, 'backend': "
          "jax.default_backend(), 'device': str(jax.devices()[0]), 'python': sys.version.split()[0]"
          "}))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        check=False)
  return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}


def quickstart(runner: Runner, out: str, cache_root: str) -> list[dict[str, Any]]:
  """The quickstart phase: one record per conv × seed, with compile_s, PSNR and the process's
  wall time."""
  records = []
  extra = ["--steps=4", "--log_every=2"] if _SMOKE.value else []
  for conv in _CONVS.value:
    cache = os.path.join(cache_root, conv)
    shutil.rmtree(cache, ignore_errors=True)  # the first seed compiles cold
    for i, seed in enumerate(_SEEDS.value):
      workdir = os.path.join(out, "quickstart", f"{conv}_seed{seed}")
      shutil.rmtree(workdir, ignore_errors=True)
      cmd = [sys.executable, "-m", "experiments.main", f"--flagfile={QUICKSTART}",
             f"--workdir={workdir}", "--stages=data,attack", f"--seed={seed}", f"--conv={conv}",
             f"--compilation_cache_dir={cache}", "--quiet", *extra]
      _log(f"quickstart conv={conv} seed={seed} ({'cold' if i == 0 else 'warm'} cache)")
      record = runner.run(cmd, workdir + ".log", need_s=30)
      record.update(conv=conv, seed=int(seed), cache="cold" if i == 0 else "warm")
      try:
        with np.load(os.path.join(workdir, "reconstruction.npz")) as rec, \
            np.load(os.path.join(workdir, "data.npz")) as data:
          record.update(compile_s=float(rec["compile_s"]),
                        psnr_db=psnr(rec["clips"], data["clips"]),
                        init_psnr_db=psnr(rec["init_clips"], data["clips"]))
      except OSError as e:
        record["note"] = record.get("note") or f"no reconstruction: {e}"
      records.append(record)
  return records


def _mean_std(values: Sequence[float]) -> str:
  if not values:
    return "—"
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.2f} ± {std:.2f} ({len(values)})"


def checks(rows: list[dict], runs: list[dict]) -> list[dict[str, Any]]:
  """The targets per conv: {target, conv, value (None: not measured), goal, met}. In a smoke run
  the tiny stand-ins take the places of 8×32×32 R = 256 and 16×112×112 R = 32."""
  small, big = ("x".join(c.split(",")[:3]) for c in (SMOKE_BENCH if _SMOKE.value else BENCH))
  r_top, r_mid = (2, 2) if _SMOKE.value else (256, 32)

  def row(conv, clip, restarts):
    return next((r for r in rows if r["victim"] == "c3d" and r["conv"] == conv
                 and r["restarts"] == restarts and "x".join(map(str, r["clip"][:3])) == clip),
                None)

  out = []
  for conv in _CONVS.value:
    top, mid = row(conv, small, r_top), row(conv, big, r_mid)
    warm = [r["compile_s"] for r in runs
            if r["conv"] == conv and r["cache"] == "warm" and "compile_s" in r]
    values = {"c3d_8x32x32_r256_candidate_steps_per_s": top and top["candidate_steps_per_s"],
              "c3d_16x112x112_r32_cost_vs_r1": mid and mid.get("candidate_cost_vs_r1"),
              "quickstart_warm_compile_s": statistics.median(warm) if warm else None}
    for name, value in values.items():
      goal = TARGETS[name]
      met = None if value is None else (value >= goal if name.endswith("per_s") else value <= goal)
      out.append({"target": name, "conv": conv, "value": value, "goal": goal, "met": met})
  return out


def summary_markdown(env: dict, runs: list[dict], bench: dict, targets: list[dict]) -> str:
  lines = ["# Throughput check" + (" (smoke: tiny shapes, measures nothing)" if _SMOKE.value
                                    else ""), "",
           f"jax {env.get('jax')}, backend {env.get('backend')}, device {env.get('device')}", "",
           "## Targets", "", "| target | conv | measured | goal | met |", "|---|---|---|---|---|"]
  for t in targets:
    value = "—" if t["value"] is None else f"{t['value']:.4g}"
    lines.append(f"| {t['target']} | {t['conv']} | {value} | {t['goal']} | "
                 f"{'—' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
  lines += ["", "## Quickstart (data + attack stages)", "",
            "| conv | compile s, cold | compile s, warm | PSNR dB | start PSNR dB |",
            "|---|---|---|---|---|"]
  for conv in _CONVS.value:
    mine = [r for r in runs if r["conv"] == conv and "psnr_db" in r]
    cold = [r["compile_s"] for r in mine if r["cache"] == "cold"]
    warm = [r["compile_s"] for r in mine if r["cache"] == "warm"]
    lines.append(f"| {conv} | {_mean_std(cold)} | {_mean_std(warm)} | "
                 f"{_mean_std([r['psnr_db'] for r in mine])} | "
                 f"{_mean_std([r['init_psnr_db'] for r in mine])} |")
  first = {r["seed"]: r["psnr_db"] for r in runs if r["conv"] == _CONVS.value[0] and "psnr_db" in r}
  for conv in _CONVS.value[1:]:
    diffs = [f"seed {r['seed']} {r['psnr_db'] - first[r['seed']]:+.3f}" for r in runs
             if r["conv"] == conv and "psnr_db" in r and r["seed"] in first]
    if diffs:
      lines.append(f"- PSNR with {conv} minus with {_CONVS.value[0]} (dB): {', '.join(diffs)}")
  lines += [f"- {r['conv']} seed {r['seed']}: {r['note']}" for r in runs if r.get("note")]
  lines += ["", "## Benchmark", "", f"`{bench.get('cmd', '')}`" + (
      f" ({bench['note']})" if bench.get("note") else ""), ""]
  lines += [f"- failed: {r['victim']} {'x'.join(map(str, r['clip']))} R={r['restarts']} "
            f"{r['conv']}: {r['error'][:300]}" for r in bench.get("failed", [])]
  if bench.get("rows"):
    lines.append(markdown_table(bench["rows"]))
    for row in bench["rows"]:
      if "profile" in row:
        clip = "x".join(map(str, row["clip"]))
        name = f"{row['victim']} {clip} R={row['restarts']} {row['conv']}"
        lines += ["", profile_summary.markdown(row["profile"], name)]
  return "\n".join(lines) + "\n"


def _write(out: str, env: dict, runs: list[dict], bench: dict) -> None:
  targets = checks(bench.get("rows", []), runs)
  summary = {"env": env, "smoke": _SMOKE.value, "targets": targets, "quickstart": runs,
             "benchmark": bench}
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(summary_markdown(env, runs, bench, targets))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = os.path.abspath(_OUT.value)
  os.makedirs(os.path.join(out, "quickstart"), exist_ok=True)
  runner = Runner(_DEADLINE.value)
  env = environment()
  _log(f"env: {env}")
  runs: list[dict] = []
  bench: dict[str, Any] = {}
  _write(out, env, runs, bench)
  with tempfile.TemporaryDirectory(prefix="vidleak_jax_check_xla_") as cache_root:
    runs = quickstart(runner, out, cache_root)
  _write(out, env, runs, bench)
  bench = benchmark(runner, out)
  _write(out, env, runs, bench)
  with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
    _log(f.read())


if __name__ == "__main__":
  app.run(main)
