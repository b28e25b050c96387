"""The train stage and the attacked round through the entry point: FedAvg rounds with test
accuracy, a model trained elsewhere (victim_weights), N clients, and bad FL settings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from absl import flags

import vidleak_jax as vl
from experiments import config_flags
from tests.conftest import run_main
from vidleak_jax.tree_io import flatten_tree

TINY = ("--flagfile=experiments/flags/tiny.flags", "--quiet")
FL = ("--fl_rounds=2", "--fl_clients=2", "--fl_client_clips=4", "--fl_test_clips=8",
      "--update=fedavg", "--local_epochs=2", "--local_batch_size=1", "--batch_size=2")


@pytest.mark.slow
def test_train_stage_then_the_same_model_from_a_weights_file(tmp_path):
  trained = tmp_path / "trained"
  done = run_main(*TINY, *FL, f"--workdir={trained}", "--stages=train,data,attack")
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((trained / "train.json").read_text())
  assert len(report["test_accuracy"]) == 2 and report["rounds"] == 2
  assert os.path.isdir(trained / "global_model")
  # The attacked round starts from the trained model: its update differs from a fresh model's.
  fresh = tmp_path / "fresh"
  done = run_main(*TINY, *FL[4:], f"--workdir={fresh}", "--stages=data,attack")
  assert done.returncode == 0, done.stderr[-2000:]
  update = dict(np.load(trained / "shared_update.npz"))
  assert not all(np.array_equal(update[k], v) for k, v in np.load(fresh / "shared_update.npz")
                 .items())
  # The same weights given as a file (what `train` produced elsewhere) give the same update.
  values = flags.FlagValues()
  config_flags.define_flags(values)
  values(["prog", *TINY, *FL, f"--workdir={trained}"])
  cfg = config_flags.config_from_flags(values)
  params = vl.pipeline.build_victim(cfg)[1]
  assert not np.array_equal(*(flatten_tree(p)["conv1/kernel"] for p in (
      params, vl.pipeline.build_victim(cfg, trained=False)[1])))
  np.savez(tmp_path / "weights.npz", **flatten_tree(params))
  loaded = tmp_path / "loaded"
  done = run_main(*TINY, *FL[4:], f"--workdir={loaded}", "--stages=data,attack",
                  f"--victim_weights={tmp_path / 'weights.npz'}")
  assert done.returncode == 0, done.stderr[-2000:]
  for k, v in np.load(loaded / "shared_update.npz").items():
    np.testing.assert_array_equal(v, update[k])


@pytest.mark.parametrize("extra, message", [
    (("--clients=0",), "--clients must be >= 1, got 0"),
    (("--update=fedavg", "--batch_size=4", "--local_batch_size=3"),
     "--local_batch_size: local batch_size=3 does not fit the client's 4 clip"),
    (("--fl_rounds=1", "--fl_client_clips=8", "--local_batch_size=3"),
     "--local_batch_size: local batch_size=3 does not fit the client's 8 clip"),
    (("--victim_weights={bad}",), "--victim_weights: victim_weights="),
    (("--fl_rounds=-1",), "--fl_rounds must be >= 0, got -1"),
])
def test_bad_fl_settings_are_refused_before_anything_is_written(tmp_path, extra, message):
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"conv1/kernel": np.zeros((3, 3))})
  workdir = tmp_path / "run"
  done = run_main(*TINY, f"--workdir={workdir}", *(e.format(bad=bad) for e in extra))
  assert done.returncode == 1
  assert message in done.stderr, done.stderr[-2000:]
  assert not workdir.exists()
