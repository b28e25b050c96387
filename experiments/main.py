r"""vidleak_jax entry point: `python -m experiments.main --flagfile=experiments/flags/quickstart.flags`.

Stages (select with --stages): pretrain (feature pipeline only) → data → attack → sr (only with
--sr) → eval, all reading/writing --workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import feature_flags  # --pipeline=features and its flags
from experiments import sr_flags  # --sr and the sr stage's flags
from experiments import cli, sweep
from vidleak_jax import attack, models, pipeline

_ATTACK_DEFAULTS = attack.AttackConfig()
FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", "runs/default", "Output directory of the run.")
flags.DEFINE_list("stages", list(pipeline.STAGES), f"Stages to run, of {', '.join(pipeline.STAGES)}.")
flags.DEFINE_integer("seed", 0, "One seed for data, victim initialisation and attack.")
# Data and victim.
flags.DEFINE_string("data", "synthetic", "Client data: synthetic | video:PATH | shipped:NAME | "
                    "folder:DIR | tfds:BUILDER:MANUAL_DIR (builders video_folder, ucf_crime, "
                    "ucf101).")
flags.DEFINE_integer("frame_stride", 1, "Take every n-th frame of real video.", lower_bound=1)
flags.DEFINE_integer("references", 0, "Reference frames of the same camera given to the "
                     "attacker (0, 1 or many).", lower_bound=0)
flags.DEFINE_string("tfds_dir", None, "Where tfds builds datasets (default ~/tensorflow_datasets).")
flags.DEFINE_string("data_split", "train", "Split of a tfds dataset.")
flags.DEFINE_list("clip_shape", ["4", "16", "16", "3"], "Clip shape T,H,W,C.")
flags.DEFINE_integer("batch_size", 1, "Clips in the client's batch (B).", lower_bound=1)
flags.DEFINE_integer("num_classes", 4, "Number of classes.", lower_bound=2)
flags.DEFINE_enum("victim", "c3d", models.VICTIMS.names(), "Victim video classifier.")
flags.DEFINE_integer("victim_features", 12, "Channels of the victim's conv layers.", lower_bound=1)
flags.DEFINE_enum("activation", "sigmoid", models.ACTIVATIONS.names(), "Victim activation.")
flags.DEFINE_enum("pooling", None, ["mean", "max", "concat"], "frame_cnn temporal pooling.")
flags.DEFINE_list("input_size", None, "Victim input H,W (frames are resized in the model).")
# Federated update.
flags.DEFINE_enum("update", "fedsgd", ["fedsgd", "fedavg"], "What the client shares.")
flags.DEFINE_integer("local_steps", 1, "FedAvg local SGD steps.", lower_bound=1)
flags.DEFINE_float("local_lr", 0.1, "FedAvg local learning rate.", lower_bound=0.0)
# Attack.
flags.DEFINE_enum("metric", _ATTACK_DEFAULTS.metric, attack.DISTANCES.names(),
                  "Gradient-matching metric.")
flags.DEFINE_enum("optimizer", _ATTACK_DEFAULTS.optimizer, attack.OPTIMIZERS.names(),
                  "Attack optimizer.")
flags.DEFINE_float("lr", _ATTACK_DEFAULTS.lr, "Attack learning rate.", lower_bound=0.0)
flags.DEFINE_enum("schedule", _ATTACK_DEFAULTS.schedule, attack.SCHEDULES.names(),
                  "Learning-rate schedule.")
flags.DEFINE_integer("steps", _ATTACK_DEFAULTS.steps, "Attack steps.", lower_bound=1)
flags.DEFINE_integer("restarts", _ATTACK_DEFAULTS.restarts, "Restarts R, optimised as one batch.",
                     lower_bound=1)
flags.DEFINE_float("tv_spatial", 1e-2, "Weight of the spatial total-variation prior.",
                   lower_bound=0.0)
flags.DEFINE_float("tv_temporal", 1e-2, "Weight of the temporal total-variation prior.",
                   lower_bound=0.0)
flags.DEFINE_bool("box", True, "Project candidates to [0, 1] after every step.")
flags.DEFINE_enum("init", _ATTACK_DEFAULTS.init, list(attack.config.INITS),
                  "Candidate initialisation (reference: median of the --references frames).")
flags.DEFINE_enum("batching", _ATTACK_DEFAULTS.batching, list(attack.config.BATCHING),
                  "How restarts are batched in the jitted step (auto: map on CPU, vmap on "
                  "GPU/TPU).")
flags.DEFINE_integer("map_batch_size", _ATTACK_DEFAULTS.map_batch_size,
                     "With --batching=map: restarts vmapped together per lax.map step (0: "
                     "auto, pairs for clips of <= 65,536 values, else one at a time).",
                     lower_bound=0)
flags.DEFINE_enum("conv", _ATTACK_DEFAULTS.conv, list(attack.config.CONVS),
                  "Victim convolution kernels while attacking (auto: im2col).")
flags.DEFINE_integer("log_every", _ATTACK_DEFAULTS.log_every, "Steps per dispatch / log line.",
                     lower_bound=1)
flags.DEFINE_enum("param", _ATTACK_DEFAULTS.param, attack.PARAMETRIZATIONS.names(),
                  "What the attack optimises: the clip (direct) or a residual on the median of the "
                  "--references frames (background_residual; 0 references = direct).")
flags.DEFINE_float("residual_l1", 0.0, "Weight of mean |residual| (background_residual).",
                   lower_bound=0.0)
flags.DEFINE_float("residual_l2", 0.0, "Weight of mean residual^2 (background_residual).",
                   lower_bound=0.0)
flags.DEFINE_float("residual_tv", 0.0, "Weight of the residual's spatial TV "
                   "(background_residual).", lower_bound=0.0)
flags.DEFINE_enum("attack_scale", "1", ["1", "2", "4"], "Candidates live at H/s x W/s and are "
                  "upsampled bicubically to the victim's size.")
flags.DEFINE_bool("known_labels", False, "Give the attacker the true labels (else recovered).")
flags.DEFINE_string("gradients", None, "Attack this captured update (.npz or .safetensors, keys = "
                    "parameter paths, see README) instead of the client's; use --stages=attack.")
# Outputs.
flags.DEFINE_integer("png_scale", 4, "Integer upscaling of frames in PNG/GIF outputs.",
                     lower_bound=1)
flags.DEFINE_float("gif_fps", 4.0, "Frames per second of comparison.gif.", lower_bound=0.1)
flags.DEFINE_bool("quiet", False, "No progress bar (batch jobs).")
flags.DEFINE_enum("matmul_precision", "highest", list(pipeline.MATMUL_PRECISIONS),
                  "Precision of float32 matmuls/convolutions (jax.default_matmul_precision); "
                  "'default' lets GPUs use faster TF32 passes.")
flags.DEFINE_integer("checkpoint_every", 1, "Save the attack's progress in <workdir>/checkpoints "
                     "every n dispatches (of --log_every steps); rerunning resumes.", lower_bound=1)
# Multi-host (jax.distributed): the same command on every process; process 0 writes the outputs.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0; enables multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).", lower_bound=0)
# Sweeps: every point of a JSON grid in <workdir>/<point_id> (README: Sweeps).
flags.DEFINE_string("sweep", None, "Sweep file (JSON grid of flag values) to run point by point.")
flags.DEFINE_string("sweep_shard", None, "i/n: run share i of n of the sweep's sorted points "
                    "(default: --process_id/--num_processes, else all).")


def _ints(name: str, values, count: int) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    out = ()
  if len(out) != count or min(out) < 1:
    raise app.UsageError(f"--{name} expects {count} positive integers separated by commas, "
                         f"got {','.join(values)!r}")
  return out


def config_from_flags() -> pipeline.RunConfig:
  """Builds the run configuration; invalid values raise app.UsageError naming the flag."""
  victim_kwargs = {"features": FLAGS.victim_features, "activation": FLAGS.activation}
  if FLAGS.pooling is not None:
    if FLAGS.victim != "frame_cnn":
      raise app.UsageError(f"--pooling applies to --victim=frame_cnn, not {FLAGS.victim!r}")
    victim_kwargs["pooling"] = FLAGS.pooling
  if FLAGS.input_size:
    victim_kwargs["input_size"] = _ints("input_size", FLAGS.input_size, 2)
  try:
    attack_config = attack.AttackConfig(
        metric=FLAGS.metric, optimizer=FLAGS.optimizer, lr=FLAGS.lr, schedule=FLAGS.schedule,
        steps=FLAGS.steps, restarts=FLAGS.restarts, box=FLAGS.box, init=FLAGS.init,
        priors={"tv_spatial": FLAGS.tv_spatial, "tv_temporal": FLAGS.tv_temporal},
        batching=FLAGS.batching, map_batch_size=FLAGS.map_batch_size, conv=FLAGS.conv,
        log_every=FLAGS.log_every,
        param=FLAGS.param, residual_l1=FLAGS.residual_l1, residual_l2=FLAGS.residual_l2,
        residual_tv=FLAGS.residual_tv, attack_scale=int(FLAGS.attack_scale))
    return pipeline.RunConfig(
        workdir=FLAGS.workdir, stages=tuple(FLAGS.stages), seed=FLAGS.seed, data=FLAGS.data,
        frame_stride=FLAGS.frame_stride, references=FLAGS.references, tfds_dir=FLAGS.tfds_dir,
        data_split=FLAGS.data_split,
        clip_shape=_ints("clip_shape", FLAGS.clip_shape, 4), batch_size=FLAGS.batch_size,
        num_classes=FLAGS.num_classes, victim=FLAGS.victim, victim_kwargs=victim_kwargs,
        update=FLAGS.update, local_steps=FLAGS.local_steps, local_lr=FLAGS.local_lr,
        known_labels=FLAGS.known_labels, gradients=FLAGS.gradients, attack=attack_config,
        png_scale=FLAGS.png_scale,
        gif_fps=FLAGS.gif_fps, quiet=FLAGS.quiet, checkpoint_every=FLAGS.checkpoint_every,
        matmul_precision=FLAGS.matmul_precision,
        **feature_flags.run_config_kwargs(),
        **sr_flags.run_config_kwargs())
  except (KeyError, ValueError) as e:
    raise app.UsageError(str(e).strip("'\"")) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  if FLAGS.sweep:  # each point runs single-process here; hosts split points (--sweep_shard)
    try:
      return sweep.main(FLAGS, config_from_flags, sweep.entry_point_flags(FLAGS, __name__))
    except attack.AttackInterrupted as e:  # SIGTERM: rerunning resumes the point and the sweep
      sys.exit(f"stopped: {e}")
  config = config_from_flags()
  if FLAGS.coordinator_address:
    pipeline.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    pipeline.run(config, flag_values=FLAGS.flag_values_dict(),
                 hidden_settings=cli.housekeeping_flags(FLAGS))
  except (OSError, ValueError, KeyError) as e:  # bad inputs: files, data, shapes, names
    sys.exit(f"error: {e}")
  except attack.AttackInterrupted as e:  # SIGTERM: progress saved, rerun to resume
    sys.exit(f"stopped: {e}")


if __name__ == "__main__":
  app.run(main)
