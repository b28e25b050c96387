"""The feature pipeline's attack (`pipeline="features"`, `FeatureConfig.attack`) and its metrics.

  analytic     stage 1 in closed form from the first dense layer's gradient (linear/MLP heads;
               at B > 1 the clips that some unit sees alone), stage 2
  matching     stage 1 by gradient matching in feature space, stage 2
  subspace     stage 1 by gradient matching over B × B coefficients of the span of the first dense
               layer's kernel gradient (linear/MLP heads), stage 2
  end_to_end   pixels optimised through extractor + head (`attack.reconstruct`)
Stage 2 inverts the extractor: clips whose features match the recovered ones. reconstruction.npz
also holds the recovered features; metrics.json adds feature_rel_error / feature_cosine (vs the
true features, computed only in eval).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vidleak_jax import attack
from vidleak_jax.attack import analytic
from vidleak_jax.attack import features as feature_attack
from vidleak_jax.attack.engine import init_candidates
from vidleak_jax.pipeline import clients, rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.feature_victim import FeatureVictim, build_feature_victim
from vidleak_jax.types import Grads


def init_clips(key: jax.Array, references: np.ndarray | None, clip_shape) -> np.ndarray:
  """Stage-1/2 start [B,T,H,W,C]: the references' median frame (attack.init "reference"), else
  mid-gray, plus small noise of each clip's own, so clips with the same label do not stay
  identical under identical gradients."""
  kind, refs = ("gray", None) if references is None else ("reference", jnp.asarray(references))
  return np.asarray(init_candidates(key, (1, *clip_shape), kind, refs)[0])


def _stage_one(cfg: RunConfig, victim: FeatureVictim, shared, labels, init_clips,
               key: jax.Array, support: Grads | None) -> tuple[Any, Any]:
  """Recovered features [B,T,D] and their stage-1 objective history. Gradient matching replays
  the client's update on the candidate features as the frame attack does on clips (its FedAvg
  training, its defences' noise-free part) and matches on the defended update's `support`."""
  fc, head = cfg.features, victim.head
  start = jax.jit(victim.extract)(jnp.asarray(init_clips))
  if fc.attack == "analytic":  # an MLPHead (RunConfig checks)
    found, count = analytic.closed_form_features(shared, head, start)
    logging.info("stage 1 (analytic): %d of %d clip(s) recovered in closed form", count,
                 len(start))
    return found, np.zeros((0,))
  if getattr(head, "depth", None) == 0 and clients.attacked_clips(cfg) >= cfg.num_classes:
    logging.warning("stage 1: a linear head's gradient does not identify its inputs at B = %d >= "
                    "K = %d classes (`invisible_input_shifts`); the feature error then measures "
                    "the attack's starting point as much as the leak", clients.attacked_clips(cfg),
                    cfg.num_classes)
  decode = None
  if fc.attack == "subspace":  # an MLPHead (RunConfig checks)
    start, decode = analytic.span_code(shared, head, start)
  with rundir.tracked(cfg, "stage1") as tracking:
    found = feature_attack.match_features(
        victim.head_apply, victim.params, shared, labels, start, fc.matching, key=key,
        decode=decode, update_fn=clients.attacker_update_fn(cfg, support=support), mask=support,
        **tracking)
  logging.info("stage 1 (feature matching): objective %.4g", found.loss)
  return found.value, found.history


def stage_attack(cfg: RunConfig, captured: Grads | None = None) -> None:
  """Client update on the head (or `captured`), then the configured feature attack."""
  victim = build_feature_victim(cfg)
  shared, known = clients.shared_update(cfg, victim.apply_fn, victim.params, captured)
  # --- attacker side: the head's params, the frozen extractor, the shared update ---
  clip_shape = (clients.attacked_clips(cfg), *cfg.clip_shape)
  keys = jax.random.split(rundir.keys(cfg.seed)["attack"])
  refs = rundir.attack_references(cfg)
  support = clients.match_support(cfg, shared)  # the defences are public: the attack adapts
  update_fn = clients.attacker_update_fn(cfg, support=support)
  labels = known if known is not None else attack.recover_labels(
      keys[0], victim.apply_fn, victim.params, shared, clip_shape, references=refs,
      trajectory=clients.label_trajectory(cfg), update_fn=update_fn)
  if (cfg.update == "fedavg" or cfg.defenses) and cfg.features.attack == "analytic":
    logging.warning("stage 1 (analytic) reads the head's update as one undefended gradient; "
                    "feature_attack='matching' replays the client's local training and defences")
  init = init_clips(jax.random.fold_in(keys[1], 0),
                     refs if cfg.attack.init == "reference" else None, clip_shape)
  if cfg.features.attack == "end_to_end":
    with rundir.tracked(cfg, "end_to_end") as tracking:
      rec = attack.reconstruct(keys[1], victim.apply_fn, victim.params, shared,
                               clip_shape=clip_shape, labels=labels,
                               config=clients.attack_config(cfg),
                               references=refs, update_fn=update_fn, mask=support,
                               **tracking)
    clips_hat, loss, history = np.asarray(rec.clips), rec.loss, rec.history["loss"].min(axis=1)
    init = np.asarray(rec.init_clips)
    features_hat, feature_history = jax.jit(victim.extract)(rec.clips), np.zeros((0,))
  else:
    features_hat, feature_history = _stage_one(cfg, victim, shared, labels, init,
                                               jax.random.fold_in(keys[1], 1), support)
    with rundir.tracked(cfg, "stage2") as tracking:
      found = feature_attack.invert_features(victim.extract, features_hat, init,
                                             cfg.features.inversion, **tracking)
    clips_hat, loss, history = np.asarray(found.value), found.loss, found.history
    logging.info("stage 2 (feature inversion): objective %.4g", found.loss)
  history = np.asarray(history, np.float32).reshape(-1, 1)  # [steps, R=1] as the frame pipeline
  rundir.save(
      cfg, "reconstruction.npz", clips=clips_hat, labels=np.asarray(labels),
      loss=np.asarray(loss), restart_losses=np.asarray([loss]), init_clips=init,
      compile_s=np.asarray(0.0), history_loss=history,  # the last stage's objective
      snapshot_steps=np.asarray([0, len(history)]),  # the curve: start and result
      snapshot_objectives=np.asarray([history[0, 0], loss], np.float32),
      snapshots=np.stack([init, clips_hat]), features=np.asarray(features_hat),
      history_features=np.asarray(feature_history))
  rundir.drop_checkpoints(cfg)



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


def feature_metrics(cfg: RunConfig, rec: dict[str, np.ndarray], truth: dict[str, np.ndarray]
                    ) -> dict[str, Any]:
  """Eval side: feature-space error of the recovered features [B,T,D], each matched to the true
  clip whose features it is closest to (Hungarian on relative error); `feature_assignment` [B]
  says which (recovered clip feature_assignment[i] ~ true clip i). Heads that start with a dense
  layer add `first_layer_sv_ratio` (`analytic.singular_value_ratio` on the true batch)."""
  if "features" not in rec:
    raise ValueError("reconstruction.npz holds no recovered features: rerun the 'attack' stage "
                     "with pipeline='features'")
  victim = build_feature_victim(cfg)
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
