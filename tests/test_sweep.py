"""Sweeps: grid expansion, point names, shards, flag validation, kill/resume and sharded tables."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time

import pytest
from absl import flags

from experiments import config_flags
from experiments import sweep as sweep_cli
from vidleak_jax import sweep
from tests.conftest import run_main


SAFE_NAME = re.compile(r"[A-Za-z0-9_.+=,~-]+")


def _spec(grid, fixed=None, name="t"):
  return sweep.parse_spec({"name": name, "grid": grid, "fixed": fixed or {}})


def test_grid_expands_to_the_cartesian_product_with_readable_unique_ids():
  spec = _spec({"victim": ["c3d", "frame_cnn"], "seed": [0, 1, 2]})
  points = sweep.expand(spec)
  assert [p.values for p in points] == sorted(
      [{"victim": v, "seed": s} for v, s in itertools.product(["c3d", "frame_cnn"], [0, 1, 2])],
      key=lambda v: f"victim={v['victim']},seed={v['seed']}")
  assert points[0].point_id == "victim=c3d,seed=0"
  assert [p.point_id for p in points] == sorted(p.point_id for p in points)
  assert len({p.point_id for p in points}) == 6
  assert sweep.expand(_spec({"victim": ["frame_cnn", "c3d"], "seed": [2, 1, 0]})) == points


def test_odd_and_long_values_get_safe_distinct_ids():
  values = ["video:/data/a b.mp4", "video:/data/a_b.mp4", "x" * 300, "x" * 301, 0.001, True]
  points = sweep.expand(_spec({"data": values, "clip_shape": [[4, 8, 8, 3]]}))
  ids = [p.point_id for p in points]
  assert len(set(ids)) == len(values)
  for pid in ids:
    assert SAFE_NAME.fullmatch(pid) and len(pid) <= sweep.MAX_ID_LENGTH, pid
  hashed = [pid for pid in ids if "~" in pid]
  assert len(hashed) == len(values)  # every id holds a list value (clip_shape) → hashed
  assert sweep.point_id({"lr": 0.001, "box": True}) == "lr=0.001,box=true"
  assert sweep.point_id({"a": "x y"}) == sweep.point_id({"a": "x y"})
  assert sweep.point_id({"a": "x y"}) != sweep.point_id({"a": "x_y"})


def test_shards_cover_every_point_exactly_once_round_robin():
  points = sweep.expand(_spec({"seed": list(range(7)), "victim": ["c3d", "cnn_rnn"]}))
  for n in range(1, 6):
    shards = [sweep.shard(points, i, n) for i in range(n)]
    assert sorted((p.point_id for s in shards for p in s)) == [p.point_id for p in points]
    assert all(s == points[i::n] for i, s in enumerate(shards))
  assert sweep.parse_shard("1/3") == (1, 3)
  for bad in ("2/2", "a/b", "-1/2", "1", "0/0"):
    with pytest.raises(ValueError, match="a shard is i/n"):
      sweep.parse_shard(bad)


@pytest.mark.parametrize("obj, message", [
    ({"grid": {}}, "non-empty"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"seed": [{"a": 1}]}}, r"grid\['seed'\]\[0\]"),
    ({"grid": {"seed": [1]}, "fixed": {"seed": 2}}, "both"),
    ({"grid": {"seed": [1]}, "sweeps": 1}, "unknown key"),
    ({"grid": {"bad name": [1]}}, "not a flag name"),
    ({"grid": {"seed": [1, 1]}}, "same point"),
])
def test_malformed_sweep_files_are_rejected_with_the_reason(obj, message):
  with pytest.raises(ValueError, match=message):
    sweep.expand(sweep.parse_spec(obj, source="f.json"))


def test_table_keeps_scalar_metrics_and_drops_lists_and_timings():
  metrics = {"psnr_mean": 20.5, "psnr": [20.5], "compile_s": 3.2, "steps": 4, "ok": True,
             "label_accuracy": None, "sr_metrics": {"psnr_mean": 22.0, "lpips_mean": 0.3}}
  assert sweep.scalar_metrics(metrics) == {"psnr_mean": 20.5, "steps": 4,
                                           "sr_metrics.psnr_mean": 22.0,
                                           "sr_metrics.lpips_mean": 0.3}


def test_flag_overrides_apply_inside_and_restore_after():
  fv = flags.FlagValues()
  flags.DEFINE_integer("steps", 5, "", flag_values=fv)
  flags.DEFINE_list("clip_shape", ["4", "8"], "", flag_values=fv)
  flags.DEFINE_bool("box", True, "", flag_values=fv)
  fv(["prog", "--steps=7"])
  with sweep_cli.flag_overrides(fv, {"steps": 3, "clip_shape": [2, 3], "box": False}):
    assert (fv.steps, fv.clip_shape, fv.box) == (3, ["2", "3"], False)
  assert (fv.steps, fv.clip_shape, fv.box) == (7, ["4", "8"], True)
  assert fv["steps"].present and not fv["box"].present
  with pytest.raises(flags.IllegalFlagValueError):
    with sweep_cli.flag_overrides(fv, {"steps": "many"}):
      pass
  assert fv.steps == 7


def _main(*args, env=None, **popen):
  return run_main("--flagfile=experiments/flags/tiny.flags", "--quiet", *args, env=env,
                  popen=bool(popen), **popen)


@pytest.fixture
def entry_point():
  """The entry point's global flags, parsed from the tiny preset; reset afterwards."""
  from experiments import main as entry_point  # defines the flags once per process
  yield entry_point
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("grid, message", [
    ({"victim": ["c3d", "c4d"]}, "point victim=c4d: flag --victim=c4d"),
    ({"steps": [4, -1]}, "--steps must be >= 1, got -1"),
    ({"workdir": ["a", "b"]}, "--workdir cannot be swept"),
    ({"pooling": ["mean"]}, "--pooling applies to victim='frame_cnn'"),
    ({"stages": [["data", "attack"]]}, "'eval' stage"),
])
def test_bad_sweep_values_are_named_before_anything_runs(tmp_path, entry_point, grid,
                                                         message):
  sweep_file = tmp_path / "bad.json"
  sweep_file.write_text(json.dumps({"name": "bad", "grid": grid}))
  fv = flags.FLAGS
  fv(["prog", "--flagfile=experiments/flags/tiny.flags", f"--sweep={sweep_file}",
      f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(ValueError) as error:
    sweep_cli.run_sweep(fv, config_flags.config_from_flags,
                        sweep_cli.entry_point_flags(fv, entry_point.__name__))
  assert message in str(error.value)
  assert not (tmp_path / "out").exists()
  assert fv.steps == 20 and fv.victim == "c3d" and fv.workdir == str(tmp_path / "out")


def test_unknown_flag_in_a_sweep_file_exits_nonzero_and_writes_nothing(tmp_path):
  sweep_file = tmp_path / "bad.json"
  sweep_file.write_text(json.dumps({"name": "bad", "grid": {"victim": ["c3d"],
                                                            "restart": [1, 2]}}))
  proc = _main(f"--sweep={sweep_file}", f"--workdir={tmp_path / 'out'}")
  assert proc.returncode != 0
  assert "unknown flag --restart (did you mean --restarts?)" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out").exists()


def _files(point_dir):
  return {n: (os.stat(point_dir / n).st_ino, os.stat(point_dir / n).st_mtime_ns)
          for n in os.listdir(point_dir)}


@pytest.mark.slow
def test_killed_sweep_resumes_and_shards_rebuild_the_same_table(tmp_path):
  sweep_file = tmp_path / "seeds.json"
  sweep_file.write_text(json.dumps({"name": "seeds", "grid": {"seed": [0, 1]},
                                    "fixed": {"optimizer": "adam", "steps": 4,
                                              "log_every": 2}}))
  # Points computed twice (whole sweep, then shards) compile once: a persistent XLA cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  whole = tmp_path / "whole"
  first, second = whole / "seed=0", whole / "seed=1"
  proc = _main(f"--sweep={sweep_file}", f"--workdir={whole}", env=env,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not (first / "point.json").exists():
    assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before point 1"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not sweep.is_finished(str(second))
  before = _files(first)

  proc = _main(f"--sweep={sweep_file}", f"--workdir={whole}", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _files(first) == before  # the finished point was skipped: no file touched or added
  assert sweep.is_finished(str(second))
  table = json.loads((whole / "results.json").read_text())
  assert [r["point_id"] for r in table["rows"]] == ["seed=0", "seed=1"]
  for row in table["rows"]:
    metrics = json.loads((whole / row["point_id"] / "metrics.json").read_text())
    assert row["psnr_mean"] == metrics["psnr_mean"] and row["steps"] == 4
    assert row["psnr_mean"] > row["psnr_init_mean"]
  assert "compile_s" not in table["columns"]
  assert "data:image/gif;base64," in (whole / "report.html").read_text()

  sharded = tmp_path / "sharded"
  for i in range(2):
    proc = _main(f"--sweep={sweep_file}", f"--workdir={sharded}", f"--sweep_shard={i}/2",
                 env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sweep.is_finished(str(sharded / f"seed={i}"))
    if i == 0:
      assert not (sharded / "seed=1").exists()
  assert (sharded / "results.json").read_text() == (whole / "results.json").read_text()
  assert (sharded / "results.csv").read_text() == (whole / "results.csv").read_text()

  # Finished points of other settings are never passed off as this sweep's results.
  proc = _main(f"--sweep={sweep_file}", f"--workdir={whole}", "--lr=0.05", env=env)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "point seed=0" in proc.stderr and "finished with other settings (attack.lr)" in proc.stderr
  assert _files(first) == before


@pytest.mark.slow
def test_a_sweep_started_twice_runs_each_point_once(tmp_path):
  sweep_file = tmp_path / "seeds.json"
  sweep_file.write_text(json.dumps({"name": "seeds", "grid": {"seed": [0, 1, 2]},
                                    "fixed": {"steps": 40, "log_every": 5}}))
  procs = [_main(f"--sweep={sweep_file}", f"--workdir={tmp_path / 'out'}",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  logs = [p.communicate(timeout=900)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  runs = sum(log.count("stage attack done") for log in logs)
  assert runs == 3, logs  # every point attacked once, by one of the two processes
  for seed in range(3):
    assert sweep.is_finished(str(tmp_path / "out" / f"seed={seed}"))
