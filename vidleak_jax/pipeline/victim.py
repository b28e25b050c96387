"""The run's victim model as (apply_fn, params), whichever pipeline builds it."""

from __future__ import annotations

from vidleak_jax import models
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.feature_victim import build_feature_victim
from vidleak_jax.pipeline.weights import attacked_weights
from vidleak_jax.types import ApplyFn, Params


def build_victim(cfg: RunConfig, *, trained: bool = True) -> tuple[ApplyFn, Params]:
  """(apply_fn, params) of the victim (clips [B,T,H,W,C] -> logits [B,K]); the feature
  pipeline's is frozen extractor + head. `trained`: the attacked round's weights
  (`weights.attacked_weights`), else the fresh initialisation from the run's seed."""
  if cfg.pipeline == "features":
    return build_feature_victim(cfg, trained=trained)[:2]
  t, h, w, c = cfg.clip_shape
  module = models.create(cfg.victim, rundir.keys(cfg.seed)["victim"], frames=t, height=h, width=w,
                         channels=c, num_classes=cfg.num_classes, **cfg.victim_kwargs)
  apply_fn, params = models.pure(module)
  return apply_fn, attacked_weights(cfg, params) if trained else params
