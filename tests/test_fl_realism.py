"""The FL-realism study's cells are the settings their rows name (read in a subprocess: the
study defines module-level flags, as the other study scripts do)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

_DESCRIBE = """
import json, sys
from absl import flags
from experiments import fl_realism as f
flags.FLAGS(["fl_realism", "--out=" + sys.argv[1]])
out = {}
for name, cell in f.CELLS.items():
  for victim in f.VICTIM_KWARGS:
    cfg = f.cell_config(name, victim, "synthetic", 1)
    out[f"{name}/{victim}"] = dict(
        value=cell.value, victim=cfg.victim, seed=cfg.seed, workdir=cfg.workdir,
        update=cfg.update, batch_size=cfg.batch_size, clients=cfg.clients,
        steps=cfg.local.steps(cfg.batch_size) if cfg.update == "fedavg" else None,
        rounds=cfg.train.rounds,
        activation=cfg.victim_kwargs["activation"], replay=cfg.attack.replay)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fl_realism"))
  proc = subprocess.run([sys.executable, "-c", _DESCRIBE, out], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_cell_is_a_valid_run_of_the_setting_it_names(cells):
  out, described = cells
  assert len(described) == 16 * 2  # every cell builds a valid RunConfig for both victims
  for key, cfg in described.items():
    name, victim = key.split("/")
    assert cfg["victim"] == victim and cfg["seed"] == 1 and cfg["workdir"].startswith(out)
    if name.startswith("B"):
      assert (cfg["update"], cfg["batch_size"]) == ("fedsgd", int(cfg["value"]))
    if name.startswith("steps"):
      assert cfg["update"] == "fedavg" and cfg["batch_size"] == 4
      assert cfg["steps"] == int(cfg["value"].split(",")[0])
    if name.startswith("clients"):
      assert cfg["clients"] == int(cfg["value"]) and cfg["steps"] == 4
    assert (cfg["rounds"] > 0) == ("trained" in name)
    assert (cfg["activation"] == "relu") == name.startswith("relu")
    assert cfg["replay"] == {"steps4_unknown_order": "full_batch",
                             "steps4_fedsgd_attack": "fedsgd"}.get(name, "order")
