"""Two local CPU processes (jax.distributed over gloo) reproduce the single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


ARGS = ["-m", "experiments.main", "--flagfile=experiments/flags/tiny.flags", "--restarts=4",
        "--quiet"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_result(tmp_path):
  single = subprocess.run([sys.executable, *ARGS, f"--workdir={tmp_path / 'single'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, *ARGS, f"--workdir={tmp_path / 'multi'}", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "4 global devices" in outs[0][1]

  expected = json.loads((tmp_path / "single" / "metrics.json").read_text())
  got = json.loads((tmp_path / "multi" / "metrics.json").read_text())
  assert abs(got["psnr"][0] - expected["psnr"][0]) < 1e-3
  assert abs(got["attack_loss"] - expected["attack_loss"]) <= 1e-4 * abs(expected["attack_loss"])
