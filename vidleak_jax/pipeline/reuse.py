"""Run, or reuse a finished run with identical settings: what sweeps and studies call per run.

A run made by `run_or_reuse` ends by writing `run.json` (atomically, after every other output)
with its settings. A later call with the same settings returns that run's metrics without
touching a file; one with other settings is refused, naming what differs, so results of other
settings are never passed off as this run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging

from vidleak_jax import io as vio
from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.run import run

RUN_FILE = "run.json"
# Settings that change how a run reports, not what it computes.
OUTPUT_ONLY = ("workdir", "quiet", "checkpoint_every")


def run_settings(cfg: RunConfig) -> dict[str, Any]:
  """What decides a run's results: its config as JSON values, without output-only settings."""
  settings = vio.to_jsonable(dataclasses.asdict(cfg))
  return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in OUTPUT_ONLY}


def _differences(done: Any, now: Any, prefix: str = "") -> list[str]:
  if isinstance(done, dict) and isinstance(now, dict):
    return [d for k in sorted(set(done) | set(now))
            for d in _differences(done.get(k), now.get(k), f"{prefix}{k}.")]
  return [] if done == now else [prefix.rstrip(".")]


def changed_settings(cfg: RunConfig) -> list[str] | None:
  """None if cfg.workdir holds no finished run; else the dotted names of the settings in which
  it differs from `cfg` ([] = identical)."""
  path = rundir.path(cfg, RUN_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    done = json.load(f)["settings"]
  return _differences(done, run_settings(cfg))


def run_or_reuse(cfg: RunConfig, flag_values: dict[str, Any] | None = None, *,
                 hidden_settings: frozenset[str] = frozenset()) -> dict[str, Any] | None:
  """`run(cfg)`, or the metrics.json of the finished run of identical settings in cfg.workdir
  (None when its stages had no eval); ValueError if cfg.workdir holds a finished run of other
  settings."""
  changed = changed_settings(cfg)
  if changed == []:
    logging.info("run: %s is done, reusing its metrics.json", cfg.workdir)
    metrics = rundir.path(cfg, "metrics.json")
    if "eval" not in cfg.stages:
      return None
    with open(metrics, encoding="utf-8") as f:
      return json.load(f)
  if changed:
    raise ValueError(f"{cfg.workdir} holds a finished run with other settings "
                     f"({', '.join(changed[:5])}); delete it or use another workdir")
  result = run(cfg, flag_values, hidden_settings=hidden_settings)
  if rundir.is_writer():
    vio.write_json(rundir.path(cfg, RUN_FILE), {"settings": run_settings(cfg)})
  return result
