"""experiments/examples: each framework's example runs as a script, recovers the label from the
gradient alone and reconstructs a clip closer to the truth than its starting point."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXAMPLES = ("linen", "nnx", "equinox_model", "plain")
NEEDS = {"equinox_model": "equinox"}
OUTPUT = re.compile(r"labels \[(?P<true>[\d, ]*)\] recovered \[(?P<got>[\d, ]*)\].*\n"
                    r"PSNR init (?P<init>[\d.]+) dB reconstruction (?P<rec>[\d.]+) dB")


def test_every_example_is_short_and_listed():
  folder = pathlib.Path(ROOT) / "experiments" / "examples"
  assert (folder / "__init__.py").exists()
  assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(EXAMPLES)
  for name in EXAMPLES:
    assert len((folder / f"{name}.py").read_text().splitlines()) <= 40, name


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_recovers_the_label_and_improves_psnr(name):
  if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
    pytest.skip(f"{NEEDS[name]} is not installed (pip install -e '.[test]')")
  done = subprocess.run([sys.executable, "-m", f"experiments.examples.{name}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  found = OUTPUT.search(done.stdout)
  assert found, done.stdout
  assert found["got"] == found["true"], done.stdout
  assert float(found["rec"]) > float(found["init"]) + 5.0, done.stdout
