"""The settings of one run (`RunConfig`, `FeatureConfig`) and the stage list, validated once.

`experiments.main` fills these from flags (generated from the fields' `setting` declarations); a
library user builds them directly. Invalid values raise `settings.InvalidSetting` (a ValueError;
`InvalidChoice` for unknown names, also a KeyError) naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from vidleak_jax import models
from vidleak_jax.attack import AttackConfig
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.data import sources
from vidleak_jax.fl import LocalTraining
from vidleak_jax.fl import defenses as fl_defenses
from vidleak_jax.models import extractors, heads
from vidleak_jax.pretrain import PretrainConfig
from vidleak_jax.settings import (InvalidChoice, InvalidSetting, check, setting,
                                  validate_fields)
from vidleak_jax.sr import SRConfig

# pretrain: the feature pipeline's extractor; train: FedAvg rounds before the attacked round
STAGES = ("pretrain", "train", "data", "attack", "sr", "eval")
# jax.default_matmul_precision values; "highest" keeps float32 products exact to float32 on GPUs
# (their "default" may use TF32 passes, which blurs the gradients an attack matches).
MATMUL_PRECISIONS = ("default", "high", "highest")
PIPELINES = ("frames", "features")
FEATURE_ATTACKS = ("analytic", "matching", "subspace", "end_to_end")
UPDATES = ("fedsgd", "fedavg")
# Client options in `defenses` besides the update transforms of `fl.DEFENSES`, with their
# settings: DP-SGD (per-example clipping + Gaussian noise in every step the client takes:
# `fl.dp_client_update` under FedSGD, `fl.dp_fedavg_update` under FedAvg; first in the chain)
# and Soteria's pruning of the classifier's representation (`fl.soteria`; it reads the client's
# clips and model, so it comes before the update transforms).
DP_SGD = "dp_sgd"
SOTERIA = "soteria"
CLIENT_OPTIONS = {DP_SGD: ("clip_norm", "noise_multiplier"), SOTERIA: ("percent",)}
Defenses = tuple[tuple[str, dict[str, Any]], ...]


def defense_names() -> tuple[str, ...]:
  """The names a `defenses` spec may start with: the registered defences and the client
  options."""
  return tuple(sorted((*fl_defenses.DEFENSES.names(), *CLIENT_OPTIONS)))


def _check_client_option(name: str, settings: dict[str, Any]) -> None:
  expected = CLIENT_OPTIONS[name]
  unknown = sorted(set(settings) - set(expected))
  missing = [k for k in expected if k not in settings]
  if unknown or missing:
    raise ValueError(f"{name} takes exactly the settings {', '.join(expected)}"
                     + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                     + (f"; missing: {', '.join(missing)}" if missing else ""))
  if name == DP_SGD:
    check(settings["clip_norm"] > 0, "clip_norm", f"must be > 0, got {settings['clip_norm']}")
    check(settings["noise_multiplier"] >= 0, "noise_multiplier",
          f"must be >= 0, got {settings['noise_multiplier']}")
  else:
    check(0 <= settings["percent"] < 100, "percent",
          f"(pruned share of the features, %) must be in [0, 100), got {settings['percent']}")


def parse_defenses(specs: Sequence[str]) -> Defenses:
  """The defences `specs` name, in order, as (name, settings) pairs: each spec is "name" or
  "name:key=value:key=value" (`fl.defenses.parse_spec`), checked by building it. InvalidChoice
  naming `defenses` (and listing the valid names) for an unknown name, InvalidSetting for a
  malformed spec, a bad setting, dp_sgd anywhere but first, or soteria after an update
  transform."""
  if isinstance(specs, str):
    raise InvalidSetting("defenses", f"defenses must be a sequence of specs, got the string "
                         f"{specs!r} (split it at its commas)")
  out = []
  for i, spec in enumerate(specs):
    try:
      name, settings = fl_defenses.parse_spec(spec)
    except ValueError as e:
      raise InvalidSetting("defenses", f"defenses: {e}") from None
    if name not in defense_names():
      raise InvalidChoice("defenses", f"defenses: unknown defense {name!r} in {spec!r}; valid: "
                                      f"{', '.join(defense_names())}")
    try:
      if name in CLIENT_OPTIONS:
        _check_client_option(name, settings)
      else:
        fl_defenses.build(name, **settings)
    except ValueError as e:
      raise InvalidSetting("defenses", f"defenses: {spec!r}: {e}") from None
    if name == DP_SGD and i:
      raise InvalidSetting("defenses", f"defenses: {spec!r} must come first: DP-SGD computes the "
                           "update that the other defences transform")
    if name == SOTERIA and any(n not in CLIENT_OPTIONS for n, _ in out):
      raise InvalidSetting("defenses", f"defenses: {spec!r} must come before the update "
                           "transforms: it prunes the update the client computed")
    out.append((name, settings))
  return tuple(out)


def _check_data_spec(field: str, spec: str) -> None:
  try:
    sources.parse_data_spec(spec)
  except ValueError as e:
    raise InvalidSetting(field, str(e)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
  """Settings of the feature pipeline (see `vidleak_jax.pipeline.features`)."""

  extractor: str = setting("resnet_small", help="Frozen feature extractor (feature pipeline).",
                           choices=extractors.EXTRACTORS.names)
  extractor_kwargs: dict[str, Any] = setting(
      help="Extractor options (flags --extractor_layer, --extractor_input_size).",
      default_factory=dict)
  extractor_weights: str | None = setting(
      None, help="resnet18: local .safetensors with a PyTorch (torchvision layout) state dict.")
  extractor_dir: str | None = setting(
      None, help="Checkpoints of the locally pre-trained extractor (default <workdir>/extractor); "
      "shared between runs.")
  head: str = setting("linear", help="Classifier on the features.", choices=heads.HEADS.names)
  head_kwargs: dict[str, Any] = setting(
      help="Head options (flags --head_hidden, --head_pooling, --head_activation).",
      default_factory=dict)
  attack: str = setting("matching", help="analytic | matching | subspace (stage 1, then feature "
                        "inversion) | end_to_end (pixels).", choices=FEATURE_ATTACKS)
  matching: feature_attack.StageConfig = setting(
      feature_attack.StageConfig(), help="Stage 1 (feature matching) settings.")
  inversion: feature_attack.StageConfig = setting(
      feature_attack.StageConfig(optimizer="lbfgs", steps=200, tv_spatial=1e-2, tv_temporal=1e-2),
      help="Stage 2 (feature inversion) settings.")
  pretrain: PretrainConfig = setting(PretrainConfig(), help="Extractor pre-training settings.")
  pretrain_data: str = setting("synthetic", help="Extractor pre-training clips (a --data spec: "
                               "synthetic, folder:DIR, ...).")
  pretrain_clips: int = setting(64, help="Clips in the pre-training set.")

  def __post_init__(self):
    validate_fields(self)
    _check_data_spec("pretrain_data", self.pretrain_data)
    check(self.pretrain_clips >= 1, "pretrain_clips", f"must be >= 1, got {self.pretrain_clips}")
    check(not self.extractor_weights or self.extractor == "resnet18", "extractor_weights",
          f"loads a PyTorch resnet18, not extractor={self.extractor!r}")
    check("layer" not in self.extractor_kwargs or self.extractor in ("alexnet", "vgg16"),
          "extractor_kwargs.layer", f"applies to alexnet/vgg16, not extractor={self.extractor!r}")
    check("pooling" not in self.head_kwargs or self.head.startswith(("linear", "mlp")),
          "head_kwargs.pooling", f"applies to linear/mlp heads, not head={self.head!r}")
    check("activation" not in self.head_kwargs or self.head != "gru", "head_kwargs.activation",
          "does not apply to head='gru'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The `train` stage: FedAvg rounds of a client population (the `local` settings) that train
  the global model before the attacked round (see `vidleak_jax.pipeline.train`)."""

  rounds: int = setting(0, help="FedAvg rounds that train the global model before the attacked "
                        "round (0: the attack sees a freshly initialised model).")
  clients: int = setting(4, help="Clients per training round (all take part every round).")
  client_clips: int = setting(8, help="Clips each training client holds.")
  test_clips: int = setting(64, help="Held-out clips on which test accuracy (utility) is "
                            "reported after every round.")
  data: str = setting("synthetic", help="The training population's clips (a --data spec); "
                      "synthetic clips come from other cameras than the attacked client's.")

  def __post_init__(self):
    validate_fields(self)
    _check_data_spec("data", self.data)
    check(self.rounds >= 0, "rounds", f"must be >= 0, got {self.rounds}")
    for field in ("clients", "client_clips", "test_clips"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """All settings of one run; `experiments.main` fills it from flags."""

  workdir: str = setting(help="Output directory of the run.")
  stages: Sequence[str] = setting(STAGES, help=f"Stages to run, of {', '.join(STAGES)}.")
  seed: int = setting(0, help="One seed for data, victim initialisation and attack.")
  data: str = setting("synthetic", help="Client data: synthetic | video:PATH | shipped:NAME | "
                      "folder:DIR | tfds:BUILDER:MANUAL_DIR (builders video_folder, ucf_crime, "
                      "ucf101).")
  clip_shape: tuple[int, int, int, int] = setting((4, 16, 16, 3), help="Clip shape T,H,W,C.")
  frame_stride: int = setting(1, help="Take every n-th frame of real video.")
  references: int = setting(0, help="Reference frames of the same camera given to the attacker "
                            "(0, 1 or many).")
  tfds_dir: str | None = setting(None, help="Where tfds builds datasets (default "
                                 "~/tensorflow_datasets).")
  data_split: str = setting("train", help="Split of a tfds dataset.")
  batch_size: int = setting(1, help="Clips in the client's batch (B).")
  num_classes: int = setting(4, help="Number of classes.")
  victim: str = setting("c3d", help="Victim video classifier.", choices=models.VICTIMS.names)
  victim_kwargs: dict[str, Any] = setting(
      help="Victim options (flags --victim_features, --activation, --pooling, --input_size).",
      default_factory=dict)
  update: str = setting("fedsgd", help="What the client shares: its gradient (fedsgd) or its "
                        "weight delta after local training (fedavg, see the local settings).",
                        choices=UPDATES)
  local: LocalTraining = setting(LocalTraining(), help="FedAvg clients' local training.")
  clients: int = setting(1, help="Clients N in the attacked round, B clips each: the attacker "
                         "sees only the example-weighted mean of their updates (what secure "
                         "aggregation reveals) and attacks it as one batch of N*B clips.")
  defenses: Sequence[str] = setting(
      (), help="Defences every attacked client applies to its update before aggregation, in "
      "order, comma-separated: name or name:key=value:key=value (e.g. "
      "top_k:fraction=0.1,int8 or clip_and_noise:clip_norm=1:noise_multiplier=0.01); names: "
      f"{', '.join(defense_names())} (dp_sgd:clip_norm=C:noise_multiplier=s: DP-SGD in "
      "every step the client takes, first only). The attacker knows them and adapts (README: Defences).")
  train: TrainConfig = setting(TrainConfig(), help="The train stage.")
  victim_weights: str | None = setting(
      None, help="Attack a model trained elsewhere: a .safetensors or .npz file of the victim's "
      "parameters (keys = parameter paths); replaces the train stage.")
  known_labels: bool = setting(False, help="Give the attacker the true labels (else recovered).")
  gradients: str | None = setting(None, help="Attack this captured update (.npz or .safetensors, "
                                  "keys = parameter paths, see README) instead of the client's; "
                                  "use --stages=attack.")
  attack: AttackConfig = setting(AttackConfig(), help="The gradient-inversion attack.")
  png_scale: int = setting(4, help="Integer upscaling of frames in PNG/GIF outputs.")
  gif_fps: float = setting(4.0, help="Frames per second of comparison.gif.")
  quiet: bool = setting(False, help="No progress bar (batch jobs).")
  checkpoint_every: int = setting(1, help="Save the attack's progress in <workdir>/checkpoints "
                                  "every n dispatches (of --log_every steps); rerunning resumes.")
  matmul_precision: str = setting("highest", help="Precision of float32 matmuls/convolutions "
                                  "(jax.default_matmul_precision); 'default' lets GPUs use faster "
                                  "TF32 passes.", choices=MATMUL_PRECISIONS)
  pipeline: str = setting("frames", help="frames: the victim classifies raw frames; features: a "
                          "frozen extractor turns each clip into features [T,D] and only a "
                          "classifier head is trained/shared.", choices=PIPELINES)
  features: FeatureConfig = setting(FeatureConfig(), help="The feature pipeline.")
  sr: SRConfig = setting(SRConfig(), help="The sr stage (runs only when sr.method != 'none').")

  def __post_init__(self):
    validate_fields(self)
    unknown = [s for s in self.stages if s not in STAGES]
    if unknown or not self.stages:
      raise InvalidChoice("stages", f"stages: unknown stage(s) {unknown}; valid: "
                                    f"{', '.join(STAGES)}")
    check(len(self.clip_shape) == 4 and min(self.clip_shape) >= 1, "clip_shape",
          f"expects T,H,W,C (4 positive integers), got {self.clip_shape}")
    _check_data_spec("data", self.data)
    check("pooling" not in self.victim_kwargs or self.victim == "frame_cnn",
          "victim_kwargs.pooling", f"applies to victim='frame_cnn', not {self.victim!r}")
    for field in ("frame_stride", "batch_size", "clients", "png_scale", "checkpoint_every"):
      check(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
    check(self.num_classes >= 2, "num_classes", f"must be >= 2, got {self.num_classes}")
    check(self.references >= 0, "references", f"must be >= 0, got {self.references}")
    fits = ([self.batch_size] if self.update == "fedavg" else []) + (
        [self.train.client_clips] if self.train.rounds and not self.victim_weights else [])
    for clips in fits:  # the attacked clients' B clips, the training clients' clips
      try:
        self.local.minibatch(clips)
      except ValueError as e:
        raise InvalidSetting("local.batch_size", str(e)) from None
    parse_defenses(self.defenses)
    check(self.gif_fps >= 0.1, "gif_fps", f"must be >= 0.1, got {self.gif_fps}")
    check(self.sr.method in ("none", "bicubic", "lanczos3") or self.clip_shape[3] == 3, "sr",
          f"method {self.sr.method!r}: its networks are trained on RGB frames; clips have "
          f"C={self.clip_shape[3]} channels (use bicubic or lanczos3)")
    if self.pipeline == "features" and self.features.attack in ("analytic", "subspace"):
      check(self.features.head.startswith(("linear", "mlp")), "features.attack",
            f"{self.features.attack!r} needs a head that starts with a dense layer (linear, "
            f"mlp1..3), got head={self.features.head!r}")

