"""The defences study's cells are the runs their rows name (read in a subprocess: the study
defines module-level flags), and it refuses an unknown cell naming it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from vidleak_jax import fl

_DESCRIBE = """
import json, sys
from absl import flags
from experiments import defenses as d
from vidleak_jax.pipeline.config import parse_defenses
flags.FLAGS(["defenses", "--out=" + sys.argv[1]])
out = {}
for name, cell in d.CELLS.items():
  leak = d.leakage_config(name, "synthetic", 2)
  util = d.utility_config(name, 2)
  small = d.utility_config(name, 2, small=True)
  out[name] = dict(
      family=cell.family, value=cell.value, leak_defenses=parse_defenses(leak.defenses),
      util_defenses=parse_defenses(util.defenses), clients=leak.clients,
      batch=leak.batch_size, leak_act=leak.victim_kwargs.get("activation", "sigmoid"),
      util_act=util.victim_kwargs["activation"], stages=list(util.stages),
      rounds=util.train.rounds, seeds=[leak.seed, util.seed],
      local=[util.local.epochs, util.local.batch_size, util.local.lr], leak_update=leak.update,
      eps=d._epsilons(name), standard_utility=d.standard_utility(name),
      small=[list(small.clip_shape), small.victim_kwargs, parse_defenses(small.defenses),
             small.workdir] if name in d.SMALL_UTILITY else None,
      dirs=[leak.workdir, util.workdir])
  if name in d.FEATURE_CELLS:
    feat = d.feature_config(name, 2)
    out[name].update(feat_defenses=parse_defenses(feat.defenses), feat_pipeline=feat.pipeline,
                     feat_dir=feat.workdir, feat_seed=feat.seed,
                     extractor_dir=feat.features.extractor_dir, feat_attack=feat.features.attack)
print(json.dumps(out))
"""


def test_every_cell_attacks_and_trains_under_the_defence_it_names(tmp_path):
  out = str(tmp_path)
  proc = subprocess.run([sys.executable, "-c", _DESCRIBE, out], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cells = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {"none", "dp_sgd_1.0", "prune_0.2", "fp16", "soteria_80", "secagg_4"} <= set(cells)
  for name, cell in cells.items():
    assert cell["leak_defenses"] == cell["util_defenses"]  # the same defence on both sides
    assert cell["seeds"] == [2, 2] and all(p.startswith(out) for p in cell["dirs"])
    assert cell["dirs"][0] != cell["dirs"][1]
    assert (cell["leak_act"], cell["util_act"]) == ("sigmoid", "relu")
    assert cell["batch"] == 1 and cell["stages"] == ["train"] and cell["rounds"] == 30
    assert cell["local"] == [2, 2, 0.05] and cell["leak_update"] == "fedsgd"  # FedAvg utility
    assert cell["clients"] == (4 if name == "secagg_4" else 1)
    # Soteria's utility: only on the small model (its exact Jacobian), next to an undefended one.
    assert cell["standard_utility"] == (not name.startswith(("soteria", "secagg")))
    if name.startswith("soteria") or name == "none":
      shape, kwargs, defenses, workdir = cell["small"]
      assert shape == [8, 16, 16, 3] and kwargs == {"features": 8, "activation": "relu"}
      assert defenses == cell["leak_defenses"] and workdir.startswith(f"{out}/utility_small/")
    else:
      assert cell["small"] is None
    names = [n for n, _ in cell["leak_defenses"]]
    if name.startswith(("dp_sgd", "prune", "soteria")):
      family, strength = name.rsplit("_", 1)
      assert names == [family] and float(cell["value"]) == float(strength)
      settings = cell["leak_defenses"][0][1]
      assert float(strength) in [float(v) for v in settings.values()]
    elif name in ("none", "secagg_4"):
      assert names == []
    if name.startswith("dp_sgd") and name != "dp_sgd_0":  # ε: 1 step at rate 1; 30 × 8 at 1/4
      sigma = float(cell["value"])
      assert cell["eps"] == [f"{fl.epsilon(sigma, 1.0, 1, 1e-5):.3g}",
                             f"{fl.epsilon(sigma, 0.25, 240, 1e-5):.3g}"]
    if "feat_pipeline" in cell:  # the features_resnet_small preset under the same defence
      assert cell["feat_defenses"] == cell["leak_defenses"] and cell["feat_seed"] == 2
      assert (cell["feat_pipeline"], cell["feat_attack"]) == ("features", "matching")
      assert cell["extractor_dir"] == f"{out}/features/extractor_seed2"  # shared by the cells
      assert cell["feat_dir"].startswith(f"{out}/features/{name}/")
  assert sum("feat_pipeline" in c for c in cells.values()) >= 10


def test_an_unknown_cell_is_refused_naming_the_flag(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.defenses", f"--out={tmp_path}/o",
                         f"--table={tmp_path}/t.md", "--cells=none,dropout"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0 and "--cells: unknown ['dropout']" in proc.stderr
  assert not (tmp_path / "o").exists() and not (tmp_path / "t.md").exists()
