"""One writer per run directory, refused resumes that touch nothing, no score without the truth."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time

import pytest

from tests.conftest import run_main
from vidleak_jax import attack, pipeline

TINY = ["--flagfile=experiments/flags/tiny.flags", "--quiet"]


def _tiny(workdir, **attack_kwargs) -> pipeline.RunConfig:
  return pipeline.RunConfig(
      workdir=str(workdir), clip_shape=(2, 8, 8, 3), quiet=True,
      attack=attack.AttackConfig(optimizer="lbfgs", metric="l2", schedule="constant", steps=4,
                                 log_every=2, **attack_kwargs))


def _digest(directory) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_a_second_process_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  first = run_main(*TINY, f"--workdir={workdir}", "--steps=60", "--log_every=5", popen=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while "process" not in _read(workdir / ".lock"):
    assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
    time.sleep(0.05)
  second = run_main(*TINY, f"--workdir={workdir}", "--steps=60", "--log_every=5")
  assert second.returncode != 0 and "Traceback" not in second.stderr
  assert f"is in use by process {first.pid}" in second.stderr, second.stderr[-2000:]
  assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == list(range(5, 61, 5))  # no second writer
  assert json.loads((workdir / "metrics.json").read_text())["steps"] == 60


def _read(path) -> str:
  try:
    return path.read_text()
  except FileNotFoundError:
    return ""


def test_the_lock_is_released_when_the_run_ends(tmp_path):
  cfg = _tiny(tmp_path / "run")
  pipeline.run(dataclasses.replace(cfg, stages=("data",)))
  pipeline.run(dataclasses.replace(cfg, stages=("data",)))  # not refused by its own old lock
  with pipeline.rundir.exclusive(cfg.workdir):
    with pytest.raises(pipeline.RunDirBusy, match=f"in use by process {os.getpid()}"):
      with pipeline.rundir.exclusive(cfg.workdir):
        pass


def test_a_refused_resume_leaves_every_file_unchanged(tmp_path):
  cfg = _tiny(tmp_path / "run")
  pipeline.run(dataclasses.replace(cfg, stages=("data",)))
  os.makedirs(os.path.join(cfg.workdir, "checkpoints", "4"))  # an attack killed mid-way
  with open(os.path.join(cfg.workdir, ".lock"), "w", encoding="utf-8") as f:
    f.write("process 1 on elsewhere since 2026-01-01T00:00:00\n")  # that run's lock note
  before = _digest(cfg.workdir)
  other = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, lr=0.5))
  with pytest.raises(pipeline.InvalidSetting, match=r"unfinished run with other settings "
                                                    r"\(attack\.lr\)") as error:
    pipeline.run(other)
  assert error.value.field == "attack.lr"
  assert _digest(cfg.workdir) == before
  # Output-only settings and another stage selection still resume.
  pipeline.run(dataclasses.replace(cfg, stages=("data",), quiet=False, checkpoint_every=2))


def test_the_entry_point_names_the_flag_of_a_refused_resume(tmp_path):
  workdir = tmp_path / "run"
  assert run_main(*TINY, f"--workdir={workdir}", "--stages=data").returncode == 0
  os.makedirs(workdir / "checkpoints")
  proc = run_main(*TINY, f"--workdir={workdir}", "--lr=0.5")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "error: --lr: " in proc.stderr and "(attack.lr)" in proc.stderr, proc.stderr[-2000:]


def test_a_captured_update_is_never_scored_against_generated_clips(tmp_path):
  cfg = _tiny(tmp_path / "client")
  pipeline.run(dataclasses.replace(cfg, stages=("data", "attack")))
  captured = dataclasses.replace(cfg, workdir=str(tmp_path / "captured"),
                                 gradients=os.path.join(cfg.workdir, "shared_update.npz"))
  assert pipeline.run(captured) is None  # default stages: data, attack, but no eval
  assert os.path.exists(os.path.join(captured.workdir, "reconstruction.npz"))
  assert not os.path.exists(os.path.join(captured.workdir, "metrics.json"))


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(pipeline.InvalidSetting, match="is a file, not a directory"):
    pipeline.run(_tiny(tmp_path / "file"))
