"""The entry point end to end, and its errors on bad input."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import ROOT, run_main


_main = run_main


def test_tiny_preset_runs_end_to_end(tmp_path):
  workdir = tmp_path / "run"  # given relative to the working directory, as users do
  proc = _main(f"--flagfile={ROOT}/experiments/flags/tiny.flags", "--workdir=run", "--quiet",
               cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "data.npz", "shared_update.npz", "reconstruction.npz",
               "metrics.json", "truth.png", "reconstruction.png", "comparison.gif"):
    assert (workdir / name).stat().st_size > 0, name
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert len(metrics["psnr"]) == len(metrics["ssim"]) == 1
  assert len(metrics["psnr_per_frame"][0]) == 4
  assert metrics["label_accuracy"] == 1.0
  assert metrics["psnr_mean"] > metrics["psnr_init_mean"] + 3.0
  config = json.loads((workdir / "config.json").read_text())
  assert config["victim"] == "c3d" and config["steps"] == 20

  # Stages run separately: eval alone re-reads the attack's output.
  os.remove(workdir / "metrics.json")
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}", "--quiet",
               "--stages=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / "metrics.json").read_text())["psnr"] == metrics["psnr"]


@pytest.mark.parametrize("bad, expected", [
    ("--metric=cosin", "--metric"),
    ("--steps=-5", "--steps"),
    ("--clip_shape=4,16,16", "--clip_shape"),
    ("--optimizer=adamw", "--optimizer"),
    ("--stages=data,attak", "attak"),
    ("--checkpoint_every=0", "--checkpoint_every"),
])
def test_bad_flag_values_exit_nonzero_with_one_clear_message(tmp_path, bad, expected):
  workdir = tmp_path / "run"
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}", bad)
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_unknown_flag_in_a_flagfile_is_named(tmp_path):
  flagfile = tmp_path / "bad.flags"
  flagfile.write_text("--victim=c3d\n--restart=4\n")
  proc = _main(f"--flagfile={flagfile}", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode != 0
  assert "restart" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


def test_attack_without_data_explains_which_stage_is_missing(tmp_path):
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={tmp_path}",
               "--stages=attack")
  assert proc.returncode != 0
  assert "data.npz" in proc.stderr and "'data' stage" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra, batch_size", [
    (("--batch_size=2", "--steps=60", "--references=2"), 2),  # batch label recovery + matching
    (("--update=fedavg", "--local_epochs=2", "--metric=cosine", "--steps=60"), 1),
])
def test_batches_and_fedavg_updates_leak(tmp_path, extra, batch_size):
  workdir = tmp_path / "run"
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}", "--quiet",
               *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert len(metrics["psnr"]) == batch_size
  assert sorted(metrics["assignment"]) == list(range(batch_size))
  assert metrics["label_accuracy"] == 1.0
  assert metrics["psnr_mean"] > metrics["psnr_init_mean"] + 5.0


@pytest.mark.slow
def test_reference_initialisation_from_the_attackers_frames(tmp_path):
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={tmp_path / 'ref'}",
               "--quiet", "--references=3", "--init=reference")
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
  assert metrics["psnr_init_mean"] > 15.0  # starts from the camera's background, not noise
  proc = _main("--flagfile=experiments/flags/tiny.flags", f"--workdir={tmp_path / 'none'}",
               "--quiet", "--init=reference")
  assert proc.returncode != 0 and "--references" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_every_stage_runs_at_the_requested_matmul_precision(tmp_path, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from vidleak_jax import pipeline  # pylint: disable=import-outside-toplevel

  seen = []
  monkeypatch.setattr(pipeline.frames, "stage_data",
                      lambda cfg: seen.append(jax.config.jax_default_matmul_precision))
  for precision in ("highest", "default"):
    pipeline.run(pipeline.RunConfig(workdir=str(tmp_path / precision), stages=("data",),
                                    matmul_precision=precision))
  assert seen == ["highest", "default"]
  assert jax.config.jax_default_matmul_precision is None  # restored afterwards
  with pytest.raises(ValueError, match="unknown matmul_precision .tf32.; valid: default"):
    pipeline.RunConfig(workdir=str(tmp_path), matmul_precision="tf32")
