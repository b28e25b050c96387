"""Resumable attacks: a resumed run equals an uninterrupted one; logs and curves stay consistent."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from tensorboardX.proto import event_pb2

import vidleak_jax as vl
from tests.conftest import ROOT, tiny_batch, tiny_victim
from vidleak_jax import pipeline

CONFIG = vl.attack.AttackConfig(restarts=2, steps=12, log_every=3)  # signed Adam, multistep lr


class _Stop(Exception):
  pass


@pytest.fixture
def compile_once(tmp_path_factory):
  """Runs of the same attack share one executable (JAX's persistent compilation cache)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _attack(config=CONFIG, *, update_scale=1.0, **kwargs):
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  target = jax.tree.map(lambda g: g * update_scale,
                        vl.fl.client_update(apply_fn, params, clips, labels))
  return vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                               clip_shape=clips.shape, config=config, **kwargs)


def _assert_same_result(got, expected):
  np.testing.assert_array_equal(got.clips, expected.clips)
  np.testing.assert_array_equal(got.labels, expected.labels)
  np.testing.assert_array_equal(got.restart_losses, expected.restart_losses)
  assert got.loss == expected.loss and got.best_restart == expected.best_restart
  for name in expected.history:
    np.testing.assert_array_equal(got.history[name], expected.history[name])
  for name in ("snapshot_steps", "snapshot_objectives", "snapshots", "init_clips"):
    np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


@pytest.mark.slow
def test_resumed_attack_equals_uninterrupted_and_foreign_checkpoints_are_refused(
    tmp_path, compile_once):
  expected = _attack()
  assert list(expected.snapshot_steps) == [3, 6, 9, 12]
  directory, seen = str(tmp_path / "checkpoints"), []
  record = lambda done, total, info: seen.append((done, info["resumed_from"]))

  # should_stop: a checkpoint at the dispatch it was asked, then AttackInterrupted.
  with pytest.raises(vl.attack.AttackInterrupted, match="step 3/12"):
    _attack(checkpoint_dir=directory, should_stop=lambda: True, checkpoint_every=100,
            progress=record)
  assert seen == [(0, 0), (3, 0)] and os.listdir(directory) == ["3"]

  other = vl.attack.AttackConfig(restarts=2, steps=24, log_every=3)
  with pytest.raises(ValueError, match=r"different attack \(differs: steps 12 -> 24\)"):
    _attack(other, checkpoint_dir=directory)
  with pytest.raises(ValueError, match=r"different attack \(differs: shared_update_sha256\)"):
    _attack(update_scale=2.0, checkpoint_dir=directory)
  with jax.default_matmul_precision("highest"), pytest.raises(
      ValueError, match=r"different attack \(differs: matmul_precision\)"):
    _attack(checkpoint_dir=directory)
  assert os.listdir(directory) == ["3"]  # refused, left untouched

  def interrupt_at_nine(done, total, info):
    record(done, total, info)
    if done == 9:  # the checkpoint after step 6 is saved, the one after step 9 not yet
      raise _Stop

  seen.clear()
  with pytest.raises(_Stop):
    _attack(checkpoint_dir=directory, progress=interrupt_at_nine)
  assert seen == [(3, 3), (6, 3), (9, 3)] and os.listdir(directory) == ["6"]

  seen.clear()
  resumed = _attack(checkpoint_dir=directory, progress=record)
  assert seen == [(6, 6), (9, 6), (12, 6)]
  _assert_same_result(resumed, expected)


def test_a_checkpoint_older_than_a_config_field_resumes_while_the_field_has_its_default(
    tmp_path):
  key, labels, clip_shape = jax.random.key(0), np.array([1]), (1, 2, 4, 4, 3)
  target = {"w": np.ones((3,), np.float32)}
  describe = lambda config: vl.attack.checkpoint.describe(key, config, clip_shape, labels,
                                                          target, None)
  old = {name: value for name, value in describe(CONFIG).items() if name != "fingerprint"}
  del old["config"]["map_batch_size"]  # as written before the field existed
  old["fingerprint"] = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
  state = vl.attack.AttackState(np.zeros((2, 3), np.float32), (), np.asarray(3, np.int32),
                                np.ones((2,), np.float32), np.zeros((2, 3), np.float32))
  record = vl.attack.checkpoint.LoopRecord(done=3, chunks=[{"loss": np.ones((3, 2), np.float32)}])
  writer = vl.attack.checkpoint.Checkpointer(str(tmp_path), old)
  writer.save(state, record)
  writer.close()

  restored, got = vl.attack.checkpoint.Checkpointer(str(tmp_path), describe(CONFIG)).restore(state)
  assert got.done == 3 and int(restored.step) == 3
  np.testing.assert_array_equal(got.history()["loss"], record.history()["loss"])
  other = dataclasses.replace(CONFIG, map_batch_size=4)
  with pytest.raises(ValueError, match=r"differs: map_batch_size 0 -> 4\)"):
    vl.attack.checkpoint.Checkpointer(str(tmp_path), describe(other)).restore(state)


def test_a_stop_requested_after_the_last_dispatch_keeps_the_finished_attack(tmp_path,
                                                                            compile_once):
  config = vl.attack.AttackConfig(restarts=2, steps=3, log_every=3)  # a single dispatch
  expected = _attack(config)
  got = _attack(config, checkpoint_dir=str(tmp_path / "ckpt"), should_stop=lambda: True)
  _assert_same_result(got, expected)


def test_jsonl_resumes_without_duplicate_or_lost_lines(tmp_path):
  def log_steps(start, steps, *, partial_line=False):
    with pipeline.logs.AttackLog(str(tmp_path), quiet=True) as log:
      log(start, 4, {"loss": float("inf"), "resumed_from": start})
      for step in steps:
        log(step, 4, {"loss": 1.0 / step, "objective_mean": 2.0 / step, "grad_match": float("nan"),
                      "resumed_from": start})
    if partial_line:  # as left by a process killed mid-write
      with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9')

  log_steps(0, [1, 2, 3], partial_line=True)
  log_steps(2, [3, 4])  # resumed from a checkpoint at step 2
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [1, 2, 3, 4]
  assert [line["objective"] for line in lines] == [1.0, 0.5, 1 / 3, 0.25]
  assert lines[0]["grad_match"] is None and lines[3]["eta_s"] == 0.0
  assert lines[2]["wall_s"] >= lines[1]["wall_s"]  # time carries over from the first run


def _main(workdir, *extra):
  return [sys.executable, "-m", "experiments.main", "--flagfile=experiments/flags/tiny.flags",
          f"--workdir={workdir}", "--steps=200", "--log_every=5", "--quiet", *extra]


def _checkpoint_steps(workdir) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  except FileNotFoundError:
    return []


def _run(args) -> subprocess.CompletedProcess:
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _interrupt_after_first_checkpoint(workdir, sig) -> subprocess.Popen:
  proc = subprocess.Popen(_main(workdir, "--checkpoint_every=2"), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not _checkpoint_steps(workdir):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.02)
  os.kill(proc.pid, sig)
  proc.wait(timeout=600)
  return proc


def _read_events(directory) -> list[event_pb2.Event]:
  """Every event of the TFRecord files in `directory` (length, crc, payload, crc records)."""
  events = []
  for name in sorted(os.listdir(directory)):
    data = (directory / name).read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      events.append(event_pb2.Event.FromString(data[12:12 + length]))
      data = data[16 + length:]
  return events


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(_main(workdir))
  return workdir


def _assert_same_outputs(workdir, reference):
  got, expected = (json.loads((w / "metrics.json").read_text()) for w in (workdir, reference))
  for key in ("psnr", "psnr_mean", "ssim", "attack_loss", "assignment", "label_accuracy", "curve"):
    assert got[key] == expected[key], key
  got, expected = (vl.report.load_npz(w / "reconstruction.npz") for w in (workdir, reference))
  for key in ("clips", "labels", "loss", "history_loss", "snapshots", "snapshot_steps"):
    np.testing.assert_array_equal(got[key], expected[key])
  assert not (workdir / "checkpoints").exists()  # removed once the outputs were written


def test_eta_leaves_out_the_compile_time(tmp_path, monkeypatch):
  clock = iter([100.0, 130.0])  # AttackLog's start, then the first dispatch's end
  monkeypatch.setattr(pipeline.logs.time, "perf_counter", lambda: next(clock))
  with pipeline.logs.AttackLog(str(tmp_path), quiet=True) as log:
    log(0, 10, {"loss": 1.0, "resumed_from": 0})
    log(2, 10, {"loss": 1.0, "objective_mean": 1.0, "grad_match": 1.0, "resumed_from": 0,
                "compile_s": 20.0})  # 30 s so far: 20 compiling, 10 for 2 steps
  line = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert line["wall_s"] == 30.0 and line["eta_s"] == pytest.approx(40.0)  # 8 steps x 5 s


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  killed = _interrupt_after_first_checkpoint(workdir, signal.SIGKILL)
  assert killed.returncode == -signal.SIGKILL
  rerun = _run(_main(workdir, "--checkpoint_every=2"))
  assert "attack resumed at step" in rerun.stderr
  _assert_same_outputs(workdir, uninterrupted)

  lines, expected = ([json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
                     for w in (workdir, uninterrupted))
  assert [line["step"] for line in lines] == list(range(5, 201, 5))
  assert [line["objective"] for line in lines] == [line["objective"] for line in expected]

  # TensorBoard: replaying the event files with their purge markers gives each step once.
  scalars = {}
  for event in _read_events(workdir / "tb"):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      scalars = {step: v for step, v in scalars.items() if step < event.step}
    for value in event.summary.value:
      if value.tag == "attack/objective":
        scalars[event.step] = value.simple_value
  assert sorted(scalars) == list(range(5, 201, 5))
  np.testing.assert_allclose([scalars[s] for s in sorted(scalars)],
                             [line["objective"] for line in lines], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_rerun_equals_uninterrupted(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  stopped = _interrupt_after_first_checkpoint(workdir, signal.SIGTERM)
  stderr = stopped.stderr.read()
  assert stopped.returncode == 1, stderr[-3000:]
  assert "stopped: attack stopped at step" in stderr and "Traceback" not in stderr
  assert not (workdir / "reconstruction.npz").exists()
  step = _checkpoint_steps(workdir)[-1]
  assert f"step {step}/200" in stderr  # the checkpoint is the step it stopped at
  rerun = _run(_main(workdir))
  assert f"attack resumed at step {step}" in rerun.stderr
  _assert_same_outputs(workdir, uninterrupted)


@pytest.mark.slow
def test_curve_ends_at_the_final_result(uninterrupted):
  metrics = json.loads((uninterrupted / "metrics.json").read_text())
  curve = metrics["curve"]
  assert len(curve["step"]) == len(curve["psnr"]) == len(curve["objective"]) == 32
  assert curve["step"][0] == 5 and curve["step"][-1] == 200
  assert np.all(np.diff(curve["step"]) > 0)
  assert np.all(np.diff(curve["objective"]) <= 0)  # best so far
  assert curve["objective"][-1] == pytest.approx(metrics["attack_loss"], rel=1e-6)
  assert curve["psnr"][-1] == pytest.approx(metrics["psnr_mean"], abs=1e-3)
  assert curve["psnr"][0] < curve["psnr"][-1] - 10  # the attack got closer to the truth
  rec = vl.report.load_npz(uninterrupted / "reconstruction.npz")
  assert rec["snapshots"].shape == (32, 1, 4, 8, 8, 3) and rec["snapshots"].dtype == np.float32
  np.testing.assert_array_equal(rec["snapshots"][-1], rec["clips"])


SHARDED = textwrap.dedent("""
    import sys, jax, numpy as np, pytest
    import vidleak_jax as vl
    from tests.test_resume import _Stop, _assert_same_result, _attack
    assert jax.device_count() == 4, jax.devices()
    config = vl.attack.AttackConfig(restarts=4, steps=6, log_every=3)
    expected = _attack(config)
    def stop(done, total, info):
      if done == 6:
        raise _Stop
    with pytest.raises(_Stop):
      _attack(config, checkpoint_dir=sys.argv[1], progress=stop)
    _assert_same_result(_attack(config, checkpoint_dir=sys.argv[1]), expected)
    print("OK")
""")


@pytest.mark.slow
def test_sharded_attack_resumes_on_its_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


FEATURE_RUN = ["--flagfile=experiments/flags/tiny.flags", "--pipeline=features",
               "--extractor=resnet_small", "--head=linear", "--clip_shape=2,16,16,3",
               "--pretrain_steps=2", "--pretrain_clips=4", "--pretrain_batch=2",
               "--match_steps=300", "--match_log_every=10", "--match_restarts=2",
               "--invert_steps=5", "--quiet"]


@pytest.mark.slow
def test_killed_feature_matching_stage_resumes_to_the_uninterrupted_result(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  _run([sys.executable, "-m", "experiments.main", *FEATURE_RUN, f"--workdir={whole}"])
  proc = subprocess.Popen([sys.executable, "-m", "experiments.main", *FEATURE_RUN,
                           f"--workdir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  stage1, deadline = killed / "checkpoints" / "stage1", time.monotonic() + 600
  while not (stage1.is_dir() and any(n.isdigit() for n in os.listdir(stage1))):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=600)
  rerun = _run([sys.executable, "-m", "experiments.main", *FEATURE_RUN, f"--workdir={killed}"])
  assert "resumed at step" in rerun.stderr
  assert not (killed / "checkpoints").exists()  # removed once reconstruction.npz is written
  got, expected = (vl.report.load_npz(w / "reconstruction.npz") for w in (killed, whole))
  for key in ("features", "history_features", "clips", "loss"):
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  lines = (killed / "metrics_stage1.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(10, 301, 10))
