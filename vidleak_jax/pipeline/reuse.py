"""Run, or reuse a finished run with identical settings: what sweeps and studies call per run.

Every `run` ends by writing `run.json` (atomically, after every other output) with its
settings. A later call with the same settings returns that run's metrics without
touching a file; one with other settings is refused, naming what differs, so results of other
settings are never passed off as this run's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from vidleak_jax.pipeline import rundir
from vidleak_jax.pipeline.config import RunConfig
from vidleak_jax.pipeline.run import RUN_FILE, changed_since, run

def changed_settings(cfg: RunConfig) -> list[str] | None:
  """None if cfg.workdir holds no finished run; else the dotted names of the settings in which
  it differs from `cfg` ([] = identical)."""
  path = rundir.path(cfg, RUN_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    done = json.load(f)["settings"]
  return changed_since(done, cfg)


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
  return run(cfg, flag_values, hidden_settings=hidden_settings)
