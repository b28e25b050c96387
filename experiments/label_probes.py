r"""Label recovery at B > 1: how well each set of probe clips predicts the batch's mean softmax.

  python -m experiments.label_probes --pipeline=features --extractor=alexnet --head=linear \
      --num_classes=4 --batch_size=4 --seeds=30

For every seed: the synthetic client batch and 8 reference frames of its camera (the `data`
stage), the victim and its FedSGD update; then the labels from `attack.recover_labels` without
references (`uniform`: 16 noise clips as probes) and with them (`references`: the camera's frames
held still), and from `counts_from_bias_grad` with the mean softmax of one mid-gray clip (`gray`),
of none (`none`: 1/K, the bias gradient alone) and of the batch itself (`truth`, the bound).
Prints per probe set the mean fraction of labels right (multisets compared) and the fraction of
seeds with all right, as a markdown table on stdout.
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vidleak_jax import pipeline, report
from vidleak_jax.attack import labels as label_recovery
from vidleak_jax.models import extractors, heads

_PIPELINE = flags.DEFINE_enum("pipeline", "features", list(pipeline.PIPELINES),
                              "frames (raw-frame victim) or features (frozen extractor + head).")
_VICTIM = flags.DEFINE_string("victim", "c3d", "Raw-frame victim (--pipeline=frames).")
_EXTRACTOR = flags.DEFINE_enum(
    "extractor", "alexnet",
    [name for name in extractors.EXTRACTORS.names() if name not in extractors.TRAINED_LOCALLY],
    "Frozen extractor (--pipeline=features); those trained by the pretrain stage are left out.")
_HEAD = flags.DEFINE_enum("head", "linear", heads.HEADS.names(), "Head (--pipeline=features).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 4, "Classes K.", lower_bound=2)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Clips per client batch B.", lower_bound=2)
_CLIP = flags.DEFINE_list("clip_shape", ["4", "32", "32", "3"], "T,H,W,C of the clips.")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Seeds 0..N-1.", lower_bound=1)
_REFERENCES = 8
PROBE_SETS = ("uniform", "gray", "references", "none", "truth")


def multiset_accuracy(counts: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of the B labels right when only the multiset counts: Σ_k min(ĉ_k, c_k) / B."""
  truth = np.bincount(labels, minlength=len(counts))
  return float(np.minimum(counts, truth).sum() / len(labels))


def one_seed(seed: int) -> dict[str, float]:
  """{probe set: multiset accuracy} for one seed's batch."""
  with tempfile.TemporaryDirectory() as workdir:
    features = {} if _PIPELINE.value == "frames" else {
        "features": pipeline.FeatureConfig(extractor=_EXTRACTOR.value, head=_HEAD.value)}
    cfg = pipeline.RunConfig(workdir=workdir, stages=("data",), seed=seed, pipeline=_PIPELINE.value,
                           victim=_VICTIM.value, clip_shape=tuple(int(v) for v in _CLIP.value),
                           batch_size=_BATCH_SIZE.value, num_classes=_NUM_CLASSES.value,
                           references=_REFERENCES, **features)
    pipeline.frames.stage_data(cfg)
    batch = report.load_npz(os.path.join(workdir, "data.npz"))
    refs = report.load_npz(os.path.join(workdir, "references.npz"))["frames"]
  apply_fn, params = pipeline.build_victim(cfg)
  clips, labels = jnp.asarray(batch["clips"]), np.asarray(batch["labels"])
  grads = pipeline.clients.client_side(cfg, apply_fn, params, clips, jnp.asarray(labels))
  k, (t, *frame) = cfg.num_classes, cfg.clip_shape
  recover = lambda given: np.asarray(label_recovery.recover_labels(
      jax.random.key(seed), apply_fn, params, grads, clips.shape, references=given))
  counts = {"uniform": np.bincount(recover(None), minlength=k),
            "references": np.bincount(recover(refs), minlength=k)}
  bias_grad = np.asarray(label_recovery.last_layer_bias_grad(grads, k))
  for name, probes in (("gray", jnp.full((1, t, *frame), 0.5, jnp.float32)), ("truth", clips)):
    mean_probs = np.asarray(jax.nn.softmax(apply_fn(params, probes)).mean(axis=0))
    counts[name] = label_recovery.counts_from_bias_grad(bias_grad, len(labels), mean_probs)
  counts["none"] = label_recovery.counts_from_bias_grad(bias_grad, len(labels), np.full(k, 1 / k))
  return {name: multiset_accuracy(counts[name], labels) for name in PROBE_SETS}


def main(argv):
  del argv
  rows = []
  for seed in range(_SEEDS.value):
    rows.append(one_seed(seed))
    print(f"seed {seed}: " + ", ".join(f"{n} {rows[-1][n]:.2f}" for n in PROBE_SETS),
          file=sys.stderr, flush=True)
  model = (_VICTIM.value if _PIPELINE.value == "frames"
           else f"{_EXTRACTOR.value} → {_HEAD.value}")
  print(f"Label recovery, {model}, K = {_NUM_CLASSES.value}, B = {_BATCH_SIZE.value}, "
        f"clips {'×'.join(_CLIP.value)}, seeds 0–{_SEEDS.value - 1}\n")
  print("| probes | labels right (mean) | all B right (seeds) |\n|---|---|---|")
  for name in PROBE_SETS:
    right = np.array([row[name] for row in rows])
    print(f"| {name} | {right.mean():.3f} | {np.mean(right == 1.0):.2f} |")


if __name__ == "__main__":
  app.run(main)
