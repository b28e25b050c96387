"""Parameter sweeps: a grid of flag values → named points, shards, and one results table.

A sweep file is JSON: {"name": str, "grid": {flag: [value, ...], ...}, "fixed": {flag: value}}.
Its points are the Cartesian product of the grid; point `victim=c3d,seed=0` runs in
`<workdir>/victim=c3d,seed=0/` and is finished once its `point.json` (written last) and
`metrics.json` exist. Everything here is pure bookkeeping; running points is the caller's job.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
from typing import Any, Sequence

from vidleak_jax.io import write_json, write_text

Value = str | int | float | bool | list
POINT_FILE = "point.json"
METRICS_FILE = "metrics.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
MAX_ID_LENGTH = 96
_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.+-]+")
_FLAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A parsed sweep file: `grid` flag → candidate values (file order kept), `fixed` overrides."""

  name: str
  grid: dict[str, list[Value]]
  fixed: dict[str, Value]


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: its directory name and the flag values it sets."""

  point_id: str
  values: dict[str, Value]


def _check_value(where: str, value: Any) -> Value:
  scalar = (str, int, float, bool)
  if isinstance(value, list) and value and all(isinstance(v, scalar) for v in value):
    return value
  if isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"{where}: expected a finite number, got {value!r}")
  if not isinstance(value, scalar):
    raise ValueError(f"{where}: expected a string, number, boolean or list of them, got "
                     f"{json.dumps(value)}")
  return value


def parse_spec(obj: Any, *, source: str = "sweep") -> SweepSpec:
  """Validates the decoded JSON of a sweep file; ValueError naming `source` and the bad part."""
  if not isinstance(obj, dict):
    raise ValueError(f"{source}: expected a JSON object with keys name, grid, fixed")
  unknown = sorted(set(obj) - {"name", "grid", "fixed"})
  if unknown:
    raise ValueError(f"{source}: unknown key(s) {unknown}; valid: name, grid, fixed")
  name, grid, fixed = obj.get("name", ""), obj.get("grid"), obj.get("fixed", {})
  if not isinstance(name, str):
    raise ValueError(f"{source}: 'name' must be a string, got {json.dumps(name)}")
  if not isinstance(grid, dict) or not grid:
    raise ValueError(f"{source}: 'grid' must be a non-empty object {{flag: [values...]}}")
  if not isinstance(fixed, dict):
    raise ValueError(f"{source}: 'fixed' must be an object {{flag: value}}")
  for flag in [*grid, *fixed]:
    if not _FLAG_NAME.fullmatch(flag):
      raise ValueError(f"{source}: {flag!r} is not a flag name")
  for flag, values in grid.items():
    if not isinstance(values, list) or not values:
      raise ValueError(f"{source}: grid[{flag!r}] must be a non-empty list of values")
    for i, v in enumerate(values):
      _check_value(f"{source}: grid[{flag!r}][{i}]", v)
  for flag, v in fixed.items():
    _check_value(f"{source}: fixed[{flag!r}]", v)
  both = sorted(set(grid) & set(fixed))
  if both:
    raise ValueError(f"{source}: flag(s) {both} are both in 'grid' and in 'fixed'")
  return SweepSpec(name=name, grid={k: list(v) for k, v in grid.items()}, fixed=dict(fixed))


def load_spec(path: str) -> SweepSpec:
  """Reads and validates a sweep file; OSError / ValueError naming `path`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  return parse_spec(obj, source=path)


def flag_text(value: Value) -> str:
  """The command-line text of a value: booleans true/false, lists comma-joined."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, list):
    return ",".join(flag_text(v) for v in value)
  return str(value)


def point_id(values: dict[str, Value]) -> str:
  """A filesystem-safe, deterministic name: `flag=value,...` in the given order.

  Values that are not plain [A-Za-z0-9_.+-] text (lists, paths, spaces, ...) are sanitised, and
  any sanitised or over-long name ends in `~` + 8 hex digits of a hash of all values, so distinct
  values give distinct names.
  """
  parts, exact = [], True
  for flag, value in values.items():
    text = flag_text(value)
    if not _SAFE_TEXT.fullmatch(text):
      text, exact = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "_", False
    parts.append(f"{flag}={text}")
  name = ",".join(parts)
  if exact and len(name) <= MAX_ID_LENGTH:
    return name
  digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
  return f"{name[:MAX_ID_LENGTH - 9]}~{digest}"


def expand(spec: SweepSpec) -> list[Point]:
  """Cartesian product of the grid as points sorted by point id (the order shards split)."""
  flags = list(spec.grid)
  points = [Point(point_id(dict(zip(flags, combo))), dict(zip(flags, combo)))
            for combo in itertools.product(*(spec.grid[f] for f in flags))]
  seen: dict[str, Point] = {}
  for p in points:
    if p.point_id in seen:
      raise ValueError(f"sweep {spec.name!r}: grid values {seen[p.point_id].values} and "
                       f"{p.values} are the same point {p.point_id!r} (duplicate values?)")
    seen[p.point_id] = p
  return sorted(points, key=lambda p: p.point_id)


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' → (i, n) with 0 <= i < n; ValueError otherwise."""
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
  if not match or not int(match[1]) < int(match[2]):
    raise ValueError(f"a shard is i/n with 0 <= i < n (e.g. 0/2), got {text!r}")
  return int(match[1]), int(match[2])


def shard(points: Sequence[Point], index: int, count: int) -> list[Point]:
  """Round-robin share `index` of `count` of the (sorted) point list."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"shard index must satisfy 0 <= {index} < {count}")
  return list(points[index::count])


def is_finished(point_dir: str) -> bool:
  """True once a point's completion marker and metrics exist."""
  return all(os.path.isfile(os.path.join(point_dir, n)) for n in (POINT_FILE, METRICS_FILE))


def mark_finished(point_dir: str, spec: SweepSpec, point: Point) -> None:
  """Writes the completion marker (atomically, after every other output of the point) with the
  point's grid values (whether its settings still match is `pipeline.reuse`'s run.json)."""
  write_json(os.path.join(point_dir, POINT_FILE),
             {"sweep": spec.name, "point_id": point.point_id, "values": point.values,
              "fixed": spec.fixed})


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """Numeric scalar entries of metrics.json (nested dicts as `outer.inner`), timings (`*_s`) out.

  Timings vary between otherwise identical runs, so leaving them out keeps the table a
  deterministic function of the sweep.
  """
  out: dict[str, float] = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(scalar_metrics(value, prefix=f"{name}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_s"):
      out[name] = value
  return out


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def collect_rows(workdir: str, spec: SweepSpec) -> list[dict[str, Any]]:
  """One row per finished point on disk, in point order: point_id, swept values, metrics."""
  rows = []
  for p in expand(spec):
    point_dir = os.path.join(workdir, p.point_id)
    if not is_finished(point_dir):
      continue
    metrics = scalar_metrics(_read_json(os.path.join(point_dir, METRICS_FILE)))
    rows.append({"point_id": p.point_id, **p.values, **metrics})
  return rows


def table_columns(spec: SweepSpec, rows: Sequence[dict[str, Any]]) -> list[str]:
  """point_id, the swept flags, then the metric columns (main ones first, others sorted)."""
  leading = ["point_id", *spec.grid]
  main = ["psnr_mean", "ssim_mean", "psnr_init_mean", "label_accuracy", "attack_loss"]
  found = {k for r in rows for k in r} - set(leading)
  return leading + [m for m in main if m in found] + sorted(found - set(main))


def _cell(value: Any) -> str:
  """CSV text of a value; floats in full precision (repr), missing values empty."""
  if value is None:
    return ""
  return repr(value) if isinstance(value, float) else flag_text(value)


def write_results(workdir: str, spec: SweepSpec) -> list[dict[str, Any]]:
  """Rebuilds results.json and results.csv from the finished points on disk; returns the rows.

  Shards sharing a workdir take turns (a lock file), so the last one writes every row.
  """
  with open(os.path.join(workdir, ".results.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _write_results(workdir, spec)


def _write_results(workdir: str, spec: SweepSpec) -> list[dict[str, Any]]:
  rows = collect_rows(workdir, spec)
  columns = table_columns(spec, rows)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_cell(row.get(c)) for c in columns])
  write_json(os.path.join(workdir, RESULTS_JSON),
             {"name": spec.name, "grid": spec.grid, "fixed": spec.fixed, "columns": columns,
              "rows": [{c: row.get(c) for c in columns} for row in rows]})
  write_text(os.path.join(workdir, RESULTS_CSV), buf.getvalue())
  return rows
