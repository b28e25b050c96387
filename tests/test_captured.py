"""Attacking a captured update file (--gradients): accepted formats and rejected payloads."""

from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy
from safetensors.numpy import save_file

import vidleak_jax as vl
from tests.conftest import ROOT
from tests.conftest import run_main as _main
from vidleak_jax import report, resources
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


@pytest.mark.slow
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


# ---- what a file declares is checked before its data is read ------------------------------------


def _npy(shape, descr="<f4", data=b"\0" * 64) -> bytes:
  """An .npy member: a format 2.0 header declaring `shape` followed by `data` (not the array)."""
  header = io.BytesIO()
  np.lib.format.write_array_header_2_0(header, {"descr": descr, "fortran_order": False,
                                                "shape": shape})
  return header.getvalue() + data


def _zip(path, members: dict[str, bytes]):
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(f"{name}.npy", data)


def _deflated_zeros_bomb(path, key, shape):
  """A real zip bomb: the full array of zeros, deflated (~1000:1)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
    with z.open(f"{key}.npy", "w", force_zip64=True) as f:
      f.write(_npy(shape, data=b""))
      left, chunk = math.prod(shape) * 4, b"\0" * (16 << 20)
      while left > 0:
        f.write(chunk[:left])
        left -= len(chunk)


# Loads an update in a fresh process and reports its peak memory (the package imported first):
# ru_maxrss, and VmHWM, the peak of this process alone (Linux folds the parent's peak at fork
# into ru_maxrss, which hides a child's smaller peak under pytest's).
PEAK_RSS = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from vidleak_jax.fl.captured import load_update
    params = {"head": {"bias": np.zeros(4, np.float32), "kernel": np.zeros((96, 4), np.float32)}}

    def peak():
      maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
      try:
        with open("/proc/self/status") as f:
          hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
      except (OSError, StopIteration):
        hwm = maxrss
      return {"ru_maxrss": maxrss, "vmhwm": hwm}

    before, start = peak(), time.perf_counter()
    try:
      load_update(sys.argv[1], params)
      message = "accepted"
    except ValueError as e:
      message = str(e)
    print(json.dumps({"before": before, "after": peak(), "seconds": time.perf_counter() - start,
                      "message": message}))
""")


def _peak(path) -> dict:
  proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, shape", [("header", (96, 10**7)), ("deflated", (96, 10**6))])
def test_npz_bombs_are_refused_from_their_headers(tmp_path, kind, shape):
  path = tmp_path / "bomb.npz"
  if kind == "header":  # a 3.8 GB array declared, a few bytes stored
    _zip(path, {"head/kernel": _npy(shape)})
  else:  # 384 MB of zeros that do decompress, in a ~0.4 MB file
    _deflated_zeros_bomb(path, "head/kernel", shape)
  got = _peak(path)
  before, after = got["before"], got["after"]
  growth = {k: after[k] - before[k] for k in after}
  print(f"{kind} bomb ({path.stat().st_size} B, float32{list(shape)}): peak RSS (VmHWM) "
        f"{after['vmhwm'] / 2**20:.0f} MB, {before['vmhwm'] / 2**20:.0f} MB after the imports "
        f"(+{growth['vmhwm'] / 2**20:.1f} MB; ru_maxrss {after['ru_maxrss'] / 2**20:.0f} MB, "
        f"+{growth['ru_maxrss'] / 2**20:.1f}), refused in {got['seconds'] * 1e3:.1f} ms")
  assert growth["vmhwm"] < 200 << 20 and growth["ru_maxrss"] < 200 << 20
  assert got["message"] == (f"{str(path)!r}['head/kernel'] declares float32"
                            f"[{shape[0]}, {shape[1]}], expected float32[96, 4]")


@pytest.fixture
def no_data_read(monkeypatch):
  """Fails the test if any array data of an .npz or .safetensors file is read."""
  def refuse(*args, **kwargs):
    raise AssertionError("array data was read")

  monkeypatch.setattr(np, "load", refuse)
  monkeypatch.setattr(np.lib.format, "read_array", refuse)
  monkeypatch.setattr(safetensors.numpy, "load_file", refuse)


def test_unknown_keys_are_refused_without_reading_data(tmp_path, no_data_read):
  params, flat = _tiny_update()
  members = {key: _npy(value.shape, value.dtype.str) for key, value in flat.items()}
  _zip(tmp_path / "unknown.npz", {**members, "conv9/kernel": _npy((96, 10**7))})
  with pytest.raises(ValueError, match=r"unknown\.npz'?: unknown key 'conv9/kernel'; expected "
                                       r"the model's parameter paths: conv1/bias"):
    load_update(str(tmp_path / "unknown.npz"), params)
  save_file({**flat, "conv9/kernel": np.zeros(3, np.float32)},
            str(tmp_path / "unknown.safetensors"))
  with pytest.raises(ValueError, match=r"unknown\.safetensors'?: unknown key 'conv9/kernel'"):
    load_update(str(tmp_path / "unknown.safetensors"), params)
  save_file({**flat, "head/bias": np.zeros(4, np.float64)}, str(tmp_path / "dtype.safetensors"))
  with pytest.raises(ValueError, match=r"\['head/bias'\] declares float64\[4\], expected "
                                       r"float32\[4\]"):
    load_update(str(tmp_path / "dtype.safetensors"), params)
  del members["head/bias"]
  _zip(tmp_path / "missing.npz", members)
  with pytest.raises(ValueError, match=r"missing key 'head/bias': expected float32\[4\]"):
    load_update(str(tmp_path / "missing.npz"), params)


def test_object_members_and_pickles_are_refused_without_reading_data(tmp_path, monkeypatch):
  params, flat = _tiny_update()
  np.savez(tmp_path / "object.npz", **dict(flat, **{"head/bias": np.array([{}], object)}))
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps(flat))
  _zip(tmp_path / "raw.npz", {"head/bias": pickle.dumps(flat)})  # a member that is no .npy
  with zipfile.ZipFile(tmp_path / "extra.npz", "w") as z:
    z.writestr("notes.txt", b"hello")
  monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
  monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("array data read"))
  cases = {"object.npz": "array 'head/bias' has object dtype",
           "pickle.npz": "not an .npz archive",
           "raw.npz": "array 'head/bias': ValueError",
           "extra.npz": "member 'notes.txt' is not a .npy array"}
  for name, expected in cases.items():
    with pytest.raises(ValueError) as info:
      load_update(str(tmp_path / name), params)
    assert name in str(info.value) and expected in str(info.value), str(info.value)


def test_updates_larger_than_the_available_memory_are_refused(tmp_path, monkeypatch):
  params, flat = _tiny_update()
  np.savez(tmp_path / "g.npz", **flat)
  monkeypatch.setattr(resources, "available_host_bytes", lambda: 1000)
  with pytest.raises(resources.InsufficientMemory, match=r"g\.npz' declares ~.* GiB of arrays, "
                                                         r"more than the 0\.0 GiB") as info:
    load_update(str(tmp_path / "g.npz"), params)
  assert info.value.field == "gradients"
