"""`python -m experiments.report --workdir=DIR`: writes DIR/report.html, one self-contained file.

DIR is a run directory (after the eval stage) or a sweep directory (with results.json).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import cli
from vidleak_jax.report import html

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run or sweep directory to report on.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  try:
    print(html.write_report(FLAGS.workdir, hidden=cli.housekeeping_flags(FLAGS)))
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
