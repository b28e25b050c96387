r"""Runs every single-run preset (experiments/flags/*.flags, not the sweeps) at seed 0 and records or
compares their metrics.json numbers: the check that a restructuring changed no result.

  python -m experiments.preset_metrics --out=runs/presets --record=runs/presets.json
  python -m experiments.preset_metrics --out=runs/presets_new \
      --compare=experiments/results/preset_metrics_seed0.json

experiments/results/preset_metrics_seed0.json holds the presets' numbers before the pipeline
package (about 12 min on 2 cores for all 17 presets).

Timing fields (compile_s) are left out; everything else numeric in metrics.json must agree to
--rtol / --atol. Each preset runs in <out>/<preset> with its SR network checkpoint inside it, so
nothing is shared between runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

SKIP_PREFIX = "feature_sweep"  # flagfiles of experiments.feature_sweep, not of experiments.main
TIMING = ("compile_s",)


def presets(root: str) -> list[str]:
  """Names of the single-run presets under `root`."""
  names = [os.path.basename(p)[:-6] for p in sorted(glob.glob(os.path.join(root, "*.flags")))]
  return [n for n in names if not n.startswith(SKIP_PREFIX)]


def numbers(tree, prefix: str = "") -> dict[str, float]:
  """Flat {path: float} of every numeric leaf (timing fields left out)."""
  out: dict[str, float] = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k not in TIMING:
        out.update(numbers(v, f"{prefix}/{k}" if prefix else k))
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      out.update(numbers(v, f"{prefix}[{i}]"))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    out[prefix] = float(tree)
  return out


def run_preset(name: str, out: str, root: str) -> dict[str, float]:
  """Runs preset `name` in <out>/<name> and returns its metrics.json numbers."""
  workdir = os.path.join(out, name)
  cmd = [sys.executable, "-m", "experiments.main", f"--flagfile={root}/{name}.flags",
         f"--workdir={workdir}", "--seed=0", "--quiet",
         f"--sr_checkpoint={os.path.join(workdir, 'sr_checkpoint')}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    sys.exit(f"preset {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.json")) as f:
    result = numbers(json.load(f))
  print(f"{name}: {time.perf_counter() - start:.0f} s, psnr_mean {result.get('psnr_mean')}",
        flush=True)
  return result


def max_deviation(before: dict[str, float], after: dict[str, float]) -> tuple[float, str]:
  """(largest |after - before| / max(|before|, 1e-12) over the shared numbers, its path)."""
  worst = (0.0, "")
  for path, want in before.items():
    have = after.get(path)
    if have is not None and not (math.isnan(have) and math.isnan(want)):
      worst = max(worst, (abs(have - want) / max(abs(want), 1e-12), path))
  return worst


def compare(before: dict, after: dict, rtol: float, atol: float) -> list[str]:
  """Every number of `before` missing from `after` or differing beyond rtol / atol."""
  bad = []
  for preset, values in before.items():
    got = after.get(preset, {})
    print(f"{preset}: psnr_mean {values.get('psnr_mean')} -> {got.get('psnr_mean')}, largest "
          "relative deviation %.2e (%s)" % max_deviation(values, got))
    for path, want in values.items():
      have = got.get(path)
      if have is None:
        bad.append(f"{preset}: {path} missing")
      elif not (math.isclose(have, want, rel_tol=rtol, abs_tol=atol) or (
          math.isnan(have) and math.isnan(want))):
        bad.append(f"{preset}: {path} {want!r} -> {have!r}")
  return bad


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--flags_dir", default="experiments/flags")
  parser.add_argument("--only", default="", help="comma-separated preset names (default: all)")
  parser.add_argument("--record")
  parser.add_argument("--compare")
  parser.add_argument("--rtol", type=float, default=1e-4)
  parser.add_argument("--atol", type=float, default=1e-5)
  args = parser.parse_args()
  names = [n for n in presets(args.flags_dir) if not args.only or n in args.only.split(",")]
  results = {}
  if args.record and os.path.exists(args.record):
    with open(args.record) as f:
      results = json.load(f)
  for name in names:
    if args.record and name in results:
      continue
    results[name] = run_preset(name, args.out, args.flags_dir)
    if args.record:
      with open(args.record, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
  if args.compare:
    with open(args.compare) as f:
      before = {k: v for k, v in json.load(f).items() if k in names}
    bad = compare(before, results, args.rtol, args.atol)
    print("\n".join(bad) or f"all {len(before)} presets agree (rtol {args.rtol}, atol {args.atol})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
