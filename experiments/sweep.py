"""`--sweep=FILE`: runs the points of a sweep file through the pipeline, one after another.

Every point is the base flags (flagfile and command line) with the point's grid values and the
file's `fixed` values applied on top; it runs in this process in `<workdir>/<point_id>`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import time
from typing import Callable, Collection, Iterator

from absl import app, flags, logging
from tqdm import tqdm

from experiments import cli
from vidleak_jax import pipeline, sweep
from vidleak_jax.report import html

# Set by the sweep itself (workdir, per point) or meaningless inside a point (the compilation
# cache opens once per process).
RESERVED = ("workdir", "sweep", "sweep_shard", "coordinator_address", "num_processes",
            "process_id", "compilation_cache_dir")


@contextlib.contextmanager
def flag_overrides(flag_values: flags.FlagValues,
                   overrides: dict[str, sweep.Value]) -> Iterator[None]:
  """Parses `overrides` into `flag_values` for the `with` block, then restores every flag."""
  saved = {name: (flag_values[name].value, flag_values[name].present,
                  flag_values[name].using_default_value) for name in overrides}
  try:
    for name, value in overrides.items():
      flag_values[name].parse(sweep.flag_text(value))
    yield
  finally:
    for name, (value, present, using_default) in saved.items():
      flag = flag_values[name]
      flag.value, flag.present, flag.using_default_value = value, present, using_default


def entry_point_flags(flag_values: flags.FlagValues, main_module: str) -> set[str]:
  """Names of the flags defined by the entry point `main_module` and other experiments.* modules."""
  names = {flag.name for flag in flag_values.get_flags_for_module(main_module)}
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if module.startswith("experiments."):
      names.update(flag.name for flag in module_flags)
  return names


def check_flag_names(spec: sweep.SweepSpec, valid: Collection[str]) -> None:
  """ValueError naming the first grid/fixed flag that the entry point does not define."""
  for name in [*spec.grid, *spec.fixed]:
    if name in RESERVED:
      raise ValueError(f"sweep {spec.name!r}: --{name} cannot be swept or fixed (the sweep sets "
                       f"it); reserved: {', '.join(RESERVED)}")
    if name not in valid:
      close = difflib.get_close_matches(name, valid, n=1)
      hint = f" (did you mean --{close[0]}?)" if close else ""
      raise ValueError(f"sweep {spec.name!r}: unknown flag --{name}{hint}")


def point_config(flag_values: flags.FlagValues, config_from_flags: Callable[[], pipeline.RunConfig],
                 spec: sweep.SweepSpec, point: sweep.Point,
                 workdir: str) -> tuple[pipeline.RunConfig, dict]:
  """(RunConfig, flag values dict) of one point; ValueError naming the point on a bad value."""
  overrides = {**spec.fixed, **point.values, "workdir": os.path.join(workdir, point.point_id)}
  try:
    with flag_overrides(flag_values, overrides):
      config = config_from_flags()
      values = flag_values.flag_values_dict()
  except (flags.Error, app.UsageError, ValueError, KeyError) as e:
    raise ValueError(f"sweep {spec.name!r}, point {point.point_id}: {e}") from None
  if "eval" not in config.stages:
    raise ValueError(f"sweep {spec.name!r}: points must run the 'eval' stage (--stages)")
  return config, values


def _unfinished(workdir: str, spec: sweep.SweepSpec, points, configs) -> list[sweep.Point]:
  """Points without results; ValueError if a finished one ran with other settings."""
  todo = []
  for point in points:
    changed = pipeline.reuse.changed_settings(configs[point.point_id][0])
    if not sweep.is_finished(os.path.join(workdir, point.point_id)) and not changed:
      todo.append(point)
      continue
    if changed:
      raise ValueError(f"sweep {spec.name!r}: point {point.point_id} in {workdir} finished with "
                       f"other settings ({', '.join(changed[:5])}); delete it or use another "
                       f"--workdir")
  return todo


def resolve_shard(shard_text: str | None, process_id: int | None,
                  num_processes: int | None) -> tuple[int, int]:
  """--sweep_shard=i/n, else the multi-host --process_id/--num_processes, else all points."""
  if shard_text:
    try:
      return sweep.parse_shard(shard_text)
    except ValueError as e:
      raise ValueError(f"--sweep_shard: {e}") from None
  if num_processes is not None and num_processes > 1:
    if process_id is None or process_id >= num_processes:
      raise ValueError(f"--process_id must be in [0, {num_processes}) to pick this process's "
                       f"share of the sweep, got {process_id}")
    return process_id, num_processes
  return 0, 1


def run_sweep(flag_values: flags.FlagValues, config_from_flags: Callable[[], pipeline.RunConfig],
              valid_flags: Collection[str]) -> list[dict]:
  """Validates every point, then runs this shard's unfinished points; returns the table rows."""
  spec = sweep.load_spec(flag_values.sweep)
  check_flag_names(spec, valid_flags)
  points = sweep.expand(spec)
  workdir = flag_values.workdir
  configs = {p.point_id: point_config(flag_values, config_from_flags, spec, p, workdir)
             for p in points}  # every point is checked before anything runs
  index, count = resolve_shard(flag_values.sweep_shard, flag_values.process_id,
                               flag_values.num_processes)
  mine = sweep.shard(points, index, count)
  todo = _unfinished(workdir, spec, mine, configs)
  logging.info("sweep %r: %d points, shard %d/%d has %d, %d to run", spec.name, len(points),
               index, count, len(mine), len(todo))
  os.makedirs(workdir, exist_ok=True)
  bar = tqdm(todo, desc=f"sweep {spec.name} [{index}/{count}]", unit="point",
             disable=flag_values.quiet, dynamic_ncols=True)
  for point in bar:
    bar.set_postfix_str(point.point_id)
    config, values = configs[point.point_id]
    start = time.perf_counter()
    try:
      pipeline.run_or_reuse(config, flag_values=values,
                            hidden_settings=cli.housekeeping_flags(flag_values))
    except pipeline.RunDirBusy as e:  # the same sweep started elsewhere runs it: split the work
      logging.info("sweep point %s skipped: %s", point.point_id, e)
      continue
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"sweep point {point.point_id}: {e}") from None
    sweep.mark_finished(config.workdir, spec, point)
    sweep.write_results(workdir, spec)
    logging.info("sweep point %s done in %.1fs", point.point_id, time.perf_counter() - start)
  rows = sweep.write_results(workdir, spec)
  html.write_sweep_report(workdir)
  return rows


def main(flag_values: flags.FlagValues, config_from_flags: Callable[[], pipeline.RunConfig],
         valid_flags: Collection[str]) -> None:
  """The `--sweep` branch of the entry point: bad input exits non-zero with one message."""
  try:
    run_sweep(flag_values, config_from_flags, valid_flags)
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
