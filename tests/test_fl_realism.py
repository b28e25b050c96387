"""The FL-realism study's cells are the settings their rows name."""

from __future__ import annotations

import pytest
from absl import flags

from experiments import fl_realism


@pytest.fixture(autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["fl_realism"])


@pytest.mark.parametrize("name", list(fl_realism.CELLS))
@pytest.mark.parametrize("victim", list(fl_realism.VICTIM_KWARGS))
def test_every_cell_is_a_valid_run_of_the_setting_it_names(name, victim, tmp_path):
  flags.FLAGS.out = str(tmp_path)
  cfg = fl_realism.cell_config(name, victim, "synthetic", seed=1)
  cell = fl_realism.CELLS[name]
  assert cfg.victim == victim and cfg.seed == 1 and cfg.workdir.startswith(str(tmp_path))
  if name.startswith("B"):
    assert (cfg.update, cfg.batch_size) == ("fedsgd", int(cell.value))
  if name.startswith("steps"):
    assert cfg.update == "fedavg" and cfg.batch_size == 4
    assert cfg.local.steps(cfg.batch_size) == int(cell.value.split(",")[0])
  if name.startswith("clients"):
    assert cfg.clients == int(cell.value) and cfg.local.steps(cfg.batch_size) == 4
  assert (cfg.train.rounds > 0) == ("trained" in name)
  assert (cfg.victim_kwargs["activation"] == "relu") == name.startswith("relu")
  assert cfg.attack.replay == {"steps4_unknown_order": "full_batch",
                               "steps4_fedsgd_attack": "fedsgd"}.get(name, "order")
