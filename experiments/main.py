r"""vidleak_jax entry point: `python -m experiments.main --flagfile=experiments/flags/quickstart.flags`.

Stages (select with --stages): pretrain (feature pipeline only) → data → attack → sr (only with
--sr) → eval, all reading/writing --workdir. Every setting of a run is a flag generated from the
config dataclasses (`experiments.config_flags`); `--helpfull` lists them by section.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import cli, config_flags, sweep
from vidleak_jax import attack, pipeline

FLAGS = flags.FLAGS
config_flags.define_flags(FLAGS)
# Multi-host (jax.distributed): the same command on every process; process 0 writes the outputs.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0; enables multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).", lower_bound=0)
# Sweeps: every point of a JSON grid in <workdir>/<point_id> (README: Sweeps).
flags.DEFINE_string("sweep", None, "Sweep file (JSON grid of flag values) to run point by point.")
flags.DEFINE_string("sweep_shard", None, "i/n: run share i of n of the sweep's sorted points "
                    "(default: --process_id/--num_processes, else all).")
flags.DEFINE_string("compilation_cache_dir", cli.default_compilation_cache_dir(),
                    "Where compiled programs are kept for later runs (JAX's persistent "
                    "compilation cache; default: $JAX_COMPILATION_CACHE_DIR, else "
                    "$XDG_CACHE_HOME/vidleak_jax/xla or ~/.cache/vidleak_jax/xla); empty: off.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  try:  # before anything compiles
    cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if FLAGS.sweep:  # each point runs single-process here; hosts split points (--sweep_shard)
    try:
      return sweep.main(FLAGS, config_flags.config_from_flags,
                        sweep.entry_point_flags(FLAGS, __name__))
    except attack.AttackInterrupted as e:  # SIGTERM: rerunning resumes the point and the sweep
      sys.exit(f"stopped: {e}")
  try:
    config = config_flags.config_from_flags(FLAGS)
  except app.UsageError as e:  # one line, without the help text
    sys.exit(f"error: {e}")
  if FLAGS.coordinator_address:
    pipeline.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    pipeline.run(config, flag_values=FLAGS.flag_values_dict(),
                 hidden_settings=cli.housekeeping_flags(FLAGS))
  except pipeline.InvalidSetting as e:  # a setting that the run's inputs contradict
    sys.exit(f"error: {config_flags.flag_error(e)}")
  except (OSError, ValueError, KeyError) as e:  # bad inputs: files, data, shapes, names
    sys.exit(f"error: {e}")
  except attack.AttackInterrupted as e:  # SIGTERM: progress saved, rerun to resume
    sys.exit(f"stopped: {e}")


if __name__ == "__main__":
  app.run(main)
