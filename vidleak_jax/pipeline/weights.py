"""The victim's weights for the attacked round: freshly initialised, trained by the `train` stage
(the final FedAvg round's orbax checkpoint in <workdir>/global_model), or loaded from a file
trained elsewhere (`victim_weights`, .safetensors / .npz keyed by parameter path, never pickle)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vidleak_jax import training
from vidleak_jax.fl import captured
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.settings import InvalidSetting
from vidleak_jax.types import Params

GLOBAL_MODEL = "global_model"  # the train stage's checkpoints, one per round


def global_model_dir(cfg: RunConfig) -> str:
  return rundir.path(cfg, GLOBAL_MODEL)


def training_identity(cfg: RunConfig) -> dict[str, Any]:
  """What decides the trained global model (as JSON values), stored with its checkpoints."""
  model = ({"extractor": cfg.features.extractor, "head": cfg.features.head,
            "head_kwargs": dict(cfg.features.head_kwargs)} if cfg.pipeline == "features" else
           {"victim": cfg.victim, "victim_kwargs": dict(cfg.victim_kwargs)})
  train = dataclasses.asdict(cfg.train)
  train.pop("rounds")  # a longer run resumes from a shorter one's rounds
  defended = {"defenses": list(cfg.defenses)} if cfg.defenses else {}  # the clients' defences
  return json.loads(json.dumps({**defended,
      **model, "pipeline": cfg.pipeline, "clip_shape": cfg.clip_shape,
      "num_classes": cfg.num_classes, "frame_stride": cfg.frame_stride, "seed": cfg.seed,
      "train": train}))  # train_global adds the local settings


def attacked_weights(cfg: RunConfig, initial: Params) -> Params:
  """The params the attacked round starts from, shaped like `initial` (the fresh model):
  `victim_weights` when given, else the train stage's model after `train.rounds` rounds, else
  `initial`. InvalidSetting naming `victim_weights` if the file does not fit the victim;
  FileNotFoundError naming the train stage if its model is missing or unfinished."""
  if cfg.victim_weights:
    try:
      return captured.load_update(cfg.victim_weights, initial)
    except (ValueError, OSError) as e:
      raise InvalidSetting("victim_weights", f"victim_weights={cfg.victim_weights!r}: {e}"
                           ) from None
  if cfg.train.rounds == 0:
    return initial
  found = training.restore(global_model_dir(cfg), {"params": initial}, training_identity(cfg),
                           steps=cfg.train.rounds)
  if found is None or found[1]["step"] < cfg.train.rounds:
    done = 0 if found is None else found[1]["step"]
    raise FileNotFoundError(f"{global_model_dir(cfg)} holds {done} of train.rounds="
                            f"{cfg.train.rounds} rounds: run the 'train' stage first (stages)")
  return found[0]["params"]
