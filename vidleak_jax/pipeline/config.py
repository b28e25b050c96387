"""The settings of one run (`RunConfig`, `FeatureConfig`) and the stage list, validated in one place.

`experiments.main` fills these from flags; a library user builds them directly. Invalid values
raise ValueError / KeyError naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from vidleak_jax import models
from vidleak_jax.attack import AttackConfig
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.data import sources
from vidleak_jax.models import extractors, heads
from vidleak_jax.pretrain import PretrainConfig
from vidleak_jax.sr import SRConfig

STAGES = ("pretrain", "data", "attack", "sr", "eval")  # pretrain: feature pipeline only
# jax.default_matmul_precision values; "highest" keeps float32 products exact to float32 on GPUs
# (their "default" may use TF32 passes, which blurs the gradients an attack matches).
MATMUL_PRECISIONS = ("default", "high", "highest")
PIPELINES = ("frames", "features")
FEATURE_ATTACKS = ("analytic", "matching", "subspace", "end_to_end")
UPDATES = ("fedsgd", "fedavg")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
  """Settings of the feature pipeline (see `vidleak_jax.pipeline.features`)."""

  extractor: str = "resnet_small"
  extractor_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  extractor_weights: str | None = None  # PyTorch-layout .safetensors (resnet18)
  extractor_dir: str | None = None  # pretrain checkpoints; default <workdir>/extractor
  head: str = "linear"
  head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  attack: str = "matching"
  matching: feature_attack.StageConfig = feature_attack.StageConfig()
  inversion: feature_attack.StageConfig = feature_attack.StageConfig(
      optimizer="lbfgs", steps=200, tv_spatial=1e-2, tv_temporal=1e-2)
  pretrain: PretrainConfig = PretrainConfig()
  pretrain_data: str = "synthetic"
  pretrain_clips: int = 64

  def __post_init__(self):
    extractors.EXTRACTORS.get(self.extractor)
    heads.HEADS.get(self.head)
    if self.attack not in FEATURE_ATTACKS:
      raise KeyError(f"unknown feature attack {self.attack!r}; valid: {', '.join(FEATURE_ATTACKS)}")
    sources.parse_data_spec(self.pretrain_data)
    if self.pretrain_clips < 1:
      raise ValueError(f"--pretrain_clips must be >= 1, got {self.pretrain_clips}")
    if self.extractor_weights and self.extractor != "resnet18":
      raise ValueError(f"--extractor_weights loads a PyTorch resnet18, not --extractor="
                       f"{self.extractor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """All settings of one run; `experiments.main` fills it from flags."""

  workdir: str
  stages: Sequence[str] = STAGES
  seed: int = 0
  data: str = "synthetic"  # see `vidleak_jax.data.sources`
  clip_shape: tuple[int, int, int, int] = (4, 16, 16, 3)  # T, H, W, C
  frame_stride: int = 1
  references: int = 0
  tfds_dir: str | None = None
  data_split: str = "train"
  batch_size: int = 1
  num_classes: int = 4
  victim: str = "c3d"
  victim_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  update: str = "fedsgd"
  local_steps: int = 1
  local_lr: float = 0.1
  known_labels: bool = False
  gradients: str | None = None  # a captured update to attack instead of the client's
  attack: AttackConfig = AttackConfig()
  png_scale: int = 4
  gif_fps: float = 4.0
  quiet: bool = False
  checkpoint_every: int = 1  # dispatches (of attack.log_every steps) between checkpoints
  matmul_precision: str = "highest"  # float32 dots/convs: "default" allows TF32/bf16 passes on GPU
  pipeline: str = "frames"  # or "features": frozen extractor + trained head
  features: FeatureConfig = FeatureConfig()
  sr: SRConfig = SRConfig()  # the sr stage runs only when sr.method != "none"

  def __post_init__(self):
    unknown = [s for s in self.stages if s not in STAGES]
    if unknown or not self.stages:
      raise ValueError(f"--stages: unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    if len(self.clip_shape) != 4 or min(self.clip_shape) < 1:
      raise ValueError(f"--clip_shape expects T,H,W,C (4 positive integers), got {self.clip_shape}")
    models.VICTIMS.get(self.victim)
    sources.parse_data_spec(self.data)
    if self.frame_stride < 1 or self.references < 0:
      raise ValueError("--frame_stride must be >= 1 and --references >= 0")
    if self.checkpoint_every < 1:
      raise ValueError(f"--checkpoint_every must be >= 1 (dispatches), got {self.checkpoint_every}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"--matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got "
                       f"{self.matmul_precision!r}")
    if self.update not in UPDATES:
      raise ValueError(f"--update must be fedsgd or fedavg, got {self.update!r}")
    if self.sr.method not in ("none", "bicubic", "lanczos3") and self.clip_shape[3] != 3:
      raise ValueError(f"--sr={self.sr.method} networks are trained on RGB frames; clips have "
                       f"C={self.clip_shape[3]} channels (use --sr=bicubic or lanczos3)")
    if self.pipeline not in PIPELINES:
      raise ValueError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}")
    if self.pipeline == "features" and self.features.attack in ("analytic", "subspace") and (
        not self.features.head.startswith(("linear", "mlp"))):
      raise ValueError(f"--feature_attack={self.features.attack} needs a head that starts with a "
                       f"dense layer (linear, mlp1..3), got --head={self.features.head}")
