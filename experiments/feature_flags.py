"""Flags of the feature pipeline (`--pipeline=features`); `experiments.main` imports this module."""

from __future__ import annotations

from typing import Any

from absl import flags

from vidleak_jax import pipeline
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.attack.objectives import DISTANCES
from vidleak_jax.attack.optimizers import OPTIMIZERS, SCHEDULES
from vidleak_jax.models import extractors, heads
from vidleak_jax.pretrain import PretrainConfig

FLAGS = flags.FLAGS
_FC = pipeline.FeatureConfig()
_INV = _FC.inversion
_PRE = PretrainConfig()

flags.DEFINE_enum("pipeline", "frames", list(pipeline.PIPELINES),
                  "frames: the victim classifies raw frames; features: a frozen extractor turns "
                  "each clip into features [T,D] and only a classifier head is trained/shared.")
flags.DEFINE_enum("extractor", _FC.extractor, extractors.EXTRACTORS.names(),
                  "Frozen feature extractor (feature pipeline).")
flags.DEFINE_integer("extractor_layer", None, "alexnet/vgg16: LPIPS ReLU tap 1..5 (default 5).",
                     lower_bound=1, upper_bound=5)
flags.DEFINE_list("extractor_input_size", None, "Extractor input H,W (frames resized inside).")
flags.DEFINE_string("extractor_weights", None, "resnet18: local .safetensors with a PyTorch "
                    "(torchvision layout) state dict.")
flags.DEFINE_string("extractor_dir", None, "Checkpoints of the locally pre-trained extractor "
                    "(default <workdir>/extractor); shared between runs.")
flags.DEFINE_enum("head", _FC.head, heads.HEADS.names(), "Classifier on the features.")
flags.DEFINE_integer("head_hidden", None, "Hidden width of the head (default 64).", lower_bound=1)
flags.DEFINE_enum("head_pooling", None, list(heads.POOLINGS),
                  "linear/mlp heads: time-mean of the features or all of them flattened.")
flags.DEFINE_enum("head_activation", None, ["relu", "sigmoid", "tanh", "gelu"],
                  "Activation of the linear/mlp/conv1d/transformer head.")
flags.DEFINE_enum("feature_attack", _FC.attack, list(pipeline.FEATURE_ATTACKS),
                  "analytic | matching | subspace (stage 1, then feature inversion) | "
                  "end_to_end (pixels).")
flags.DEFINE_enum("match_optimizer", _FC.matching.optimizer, OPTIMIZERS.names(),
                  "Stage 1 (feature matching) optimizer.")
flags.DEFINE_enum("match_metric", _FC.matching.metric, DISTANCES.names(),
                  "Stage 1 gradient-matching metric.")
flags.DEFINE_float("match_lr", _FC.matching.lr, "Stage 1 learning rate.", lower_bound=0.0)
flags.DEFINE_integer("match_steps", _FC.matching.steps, "Stage 1 steps.", lower_bound=1)
flags.DEFINE_integer("match_restarts", _FC.matching.restarts,
                     "Stage 1 starts optimised at once (the best objective wins).", lower_bound=1)
flags.DEFINE_enum("invert_optimizer", _INV.optimizer, OPTIMIZERS.names(),
                  "Stage 2 (feature inversion) optimizer.")
flags.DEFINE_enum("invert_schedule", _INV.schedule, SCHEDULES.names(), "Stage 2 lr schedule.")
flags.DEFINE_float("invert_lr", _INV.lr, "Stage 2 learning rate.", lower_bound=0.0)
flags.DEFINE_integer("invert_steps", _INV.steps, "Stage 2 steps.", lower_bound=1)
flags.DEFINE_float("invert_tv_spatial", _INV.tv_spatial, "Stage 2 spatial TV weight.",
                   lower_bound=0.0)
flags.DEFINE_float("invert_tv_temporal", _INV.tv_temporal, "Stage 2 temporal TV weight.",
                   lower_bound=0.0)
flags.DEFINE_string("pretrain_data", _FC.pretrain_data, "Extractor pre-training clips (a --data "
                    "spec: synthetic, folder:DIR, ...).")
flags.DEFINE_integer("pretrain_clips", _FC.pretrain_clips, "Clips in the pre-training set.",
                     lower_bound=1)
flags.DEFINE_integer("pretrain_steps", _PRE.steps, "Pre-training steps.", lower_bound=1)
flags.DEFINE_integer("pretrain_batch", _PRE.batch_size, "Pre-training minibatch.", lower_bound=1)
flags.DEFINE_float("pretrain_lr", _PRE.lr, "Pre-training Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("pretrain_checkpoint_every", _PRE.checkpoint_every, "Pre-training steps "
                     "between checkpoints.", lower_bound=1)


def _input_size() -> tuple[int, int] | None:
  if not FLAGS.extractor_input_size:
    return None
  try:
    size = tuple(int(v) for v in FLAGS.extractor_input_size)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"--extractor_input_size expects H,W (2 positive integers), got "
                     f"{','.join(FLAGS.extractor_input_size)!r}")
  return size


def run_config_kwargs() -> dict[str, Any]:
  """`pipeline` and `features` fields of `pipeline.RunConfig` from the flags (ValueError/KeyError)."""
  extractor_kwargs: dict[str, Any] = {}
  if FLAGS.extractor_layer is not None:
    if FLAGS.extractor not in ("alexnet", "vgg16"):
      raise ValueError(f"--extractor_layer applies to alexnet/vgg16, not {FLAGS.extractor!r}")
    extractor_kwargs["layer"] = FLAGS.extractor_layer
  if _input_size():
    extractor_kwargs["input_size"] = _input_size()
  head_kwargs = {name: getattr(FLAGS, f"head_{name}") for name in ("hidden", "pooling",
                                                                    "activation")
                 if getattr(FLAGS, f"head_{name}") is not None}
  if "pooling" in head_kwargs and not FLAGS.head.startswith(("linear", "mlp")):
    raise ValueError(f"--head_pooling applies to linear/mlp heads, not {FLAGS.head!r}")
  if "activation" in head_kwargs and FLAGS.head == "gru":
    raise ValueError("--head_activation does not apply to --head=gru")
  features = pipeline.FeatureConfig(
      extractor=FLAGS.extractor, extractor_kwargs=extractor_kwargs,
      extractor_weights=FLAGS.extractor_weights, extractor_dir=FLAGS.extractor_dir,
      head=FLAGS.head, head_kwargs=head_kwargs, attack=FLAGS.feature_attack,
      matching=feature_attack.StageConfig(optimizer=FLAGS.match_optimizer, lr=FLAGS.match_lr,
                                          steps=FLAGS.match_steps, metric=FLAGS.match_metric,
                                          restarts=FLAGS.match_restarts),
      inversion=feature_attack.StageConfig(
          optimizer=FLAGS.invert_optimizer, lr=FLAGS.invert_lr, schedule=FLAGS.invert_schedule,
          steps=FLAGS.invert_steps, tv_spatial=FLAGS.invert_tv_spatial,
          tv_temporal=FLAGS.invert_tv_temporal),
      pretrain=PretrainConfig(steps=FLAGS.pretrain_steps, batch_size=FLAGS.pretrain_batch,
                              lr=FLAGS.pretrain_lr,
                              checkpoint_every=FLAGS.pretrain_checkpoint_every),
      pretrain_data=FLAGS.pretrain_data, pretrain_clips=FLAGS.pretrain_clips)
  return {"pipeline": FLAGS.pipeline, "features": features}
