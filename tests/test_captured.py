"""Attacking a captured update file (--gradients): accepted formats and rejected payloads."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import vidleak_jax as vl
from tests.conftest import run_main as _main
from vidleak_jax import report
from vidleak_jax.fl.captured import load_update
from vidleak_jax.tree_io import flatten_tree

TINY = ["--flagfile=experiments/flags/tiny.flags", "--quiet", "--stages=attack"]


def _tiny_update():
  """(params, flat update) of the tiny preset's victim (c3d, 4×8×8, seed 0) on a synthetic clip."""
  victim_key = jax.random.split(jax.random.key(0), 3)[1]  # the pipeline's victim key for seed 0
  module = vl.models.create("c3d", victim_key, frames=4, height=8, width=8, channels=3,
                            num_classes=4, features=12, activation="sigmoid")
  apply_fn, params = vl.models.pure(module)
  clips, labels = vl.data.synthetic_clips(jax.random.key(3), 1, frames=4, height=8, width=8)
  return params, flatten_tree(vl.fl.client_update(apply_fn, params, clips, labels))


def test_npz_and_safetensors_round_trip(tmp_path):
  params, flat = _tiny_update()
  np.savez(tmp_path / "g.npz", **flat)
  save_file(flat, str(tmp_path / "g.safetensors"))
  for name in ("g.npz", "g.safetensors"):
    loaded = load_update(str(tmp_path / name), params)
    for a, b in zip(jax.tree.leaves(loaded), flat.values()):
      np.testing.assert_array_equal(a, b)


def test_attack_stage_inverts_a_captured_update(tmp_path):
  _, flat = _tiny_update()
  np.savez(tmp_path / "g.npz", **flat)
  proc = _main(*TINY, f"--workdir={tmp_path / 'run'}", f"--gradients={tmp_path / 'g.npz'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rec = report.load_npz(tmp_path / "run" / "reconstruction.npz")
  assert rec["clips"].shape == (1, 4, 8, 8, 3) and rec["labels"].shape == (1,)
  assert not (tmp_path / "run" / "shared_update.npz").exists()


def _bad_files(tmp_path, flat):
  wrong_shape = dict(flat, **{"head/bias": np.zeros(5, np.float32)})
  nan = dict(flat, **{"conv1/bias": np.full_like(flat["conv1/bias"], np.nan)})
  unknown = dict(flat, **{"conv9/kernel": np.zeros(3, np.float32)})
  np.savez(tmp_path / "shape.npz", **wrong_shape)
  np.savez(tmp_path / "nan.npz", **nan)
  save_file(unknown, str(tmp_path / "unknown.safetensors"))
  np.savez(tmp_path / "object.npz", **dict(flat, **{"head/bias": np.array([{}], object)}))
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps(flat))
  return {"shape.npz": "head/bias", "nan.npz": "NaN", "unknown.safetensors": "conv9",
          "object.npz": "object.npz", "pickle.npz": "pickle.npz"}


def test_bad_update_files_are_rejected_before_anything_is_written(tmp_path):
  _, flat = _tiny_update()
  for name, expected in _bad_files(tmp_path, flat).items():
    workdir = tmp_path / f"run_{name}"
    proc = _main(*TINY, f"--workdir={workdir}", f"--gradients={tmp_path / name}")
    assert proc.returncode != 0, name
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists(), name


@pytest.mark.parametrize("name", ["g.pkl", "missing.npz"])
def test_unsupported_or_missing_files_name_the_file(tmp_path, name):
  params, _ = _tiny_update()
  with pytest.raises(ValueError, match=name):
    load_update(str(tmp_path / name), params)
