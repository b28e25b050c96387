"""Run, or reuse a finished run with identical settings (sweeps, feature_sweep, scenarios)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from vidleak_jax import attack, pipeline
from vidleak_jax.pipeline.run import changed_since, run_settings


def _files(directory) -> dict[str, int]:
  paths = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names]
  return {os.path.relpath(p, directory): os.stat(p).st_mtime_ns for p in paths}


def test_a_finished_run_is_reused_and_one_of_other_settings_refused(tmp_path):
  cfg = pipeline.RunConfig(workdir=str(tmp_path / "run"), clip_shape=(2, 8, 8, 3), quiet=True,
                           attack=attack.AttackConfig(optimizer="lbfgs", metric="l2",
                                                      schedule="constant", steps=4, log_every=2))
  assert pipeline.reuse.changed_settings(cfg) is None
  first = pipeline.run_or_reuse(cfg)
  before = _files(cfg.workdir)
  assert "run.json" in before and pipeline.reuse.changed_settings(cfg) == []
  # Output-only settings do not count; nothing is run again or touched.
  again = pipeline.run_or_reuse(dataclasses.replace(cfg, quiet=False, checkpoint_every=3))
  with open(os.path.join(cfg.workdir, "metrics.json"), encoding="utf-8") as f:
    assert again == json.load(f) and again["psnr"] == pytest.approx(list(first["psnr"]))
  assert _files(cfg.workdir) == before
  other = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, lr=0.5), seed=1)
  with pytest.raises(ValueError, match=r"other settings \(attack\.lr, seed\)"):
    pipeline.run_or_reuse(other)
  assert _files(cfg.workdir) == before
  # A run killed before it finished has no run.json: it is run again.
  os.remove(os.path.join(cfg.workdir, "run.json"))
  assert list(pipeline.run_or_reuse(cfg)["psnr"]) == pytest.approx(list(first["psnr"]))


def test_a_setting_added_after_a_run_counts_as_changed_only_off_its_default(tmp_path):
  cfg = pipeline.RunConfig(workdir=str(tmp_path / "run"))
  done = run_settings(cfg)
  del done["clients"], done["local"]["momentum"]  # as recorded before those settings existed
  assert changed_since(done, cfg) == []
  moved = dataclasses.replace(cfg, clients=2, local=dataclasses.replace(cfg.local, momentum=0.5))
  assert changed_since(done, moved) == ["clients", "local.momentum"]
  assert changed_since(done, dataclasses.replace(cfg, seed=3)) == ["seed"]
