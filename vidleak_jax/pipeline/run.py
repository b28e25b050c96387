"""Runs the selected stages of one run in order (`run`), alone or across `jax.distributed`
processes."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental import multihost_utils

from vidleak_jax import io as vio
from vidleak_jax.fl import captured as captured_update
from vidleak_jax.pipeline import features, frames, rundir
from vidleak_jax.pipeline.config import STAGES, RunConfig
from vidleak_jax.pipeline.evaluate import stage_eval
from vidleak_jax.pipeline.feature_victim import stage_pretrain
from vidleak_jax.pipeline.sr import stage_sr
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.report import html as html_report
from vidleak_jax.settings import InvalidSetting


def init_distributed(coordinator_address: str, num_processes: int | None,
                     process_id: int | None) -> None:
  """Joins a multi-process JAX run (GPU/TPU pods, clusters; CPU processes talk over gloo)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
               jax.device_count())


def run(cfg: RunConfig, flag_values: dict[str, Any] | None = None, *,
        hidden_settings: frozenset[str] = frozenset()) -> dict[str, Any] | None:
  """Runs the selected stages in order; returns the metrics when `eval` ran.

  `flag_values` (default: the config's fields) is written to config.json; `hidden_settings` are
  left out of report.html's settings table. Under `jax.distributed` every process runs every
  stage (the attack is sharded over all devices), process 0 writes the files (the workdir must be
  on a shared filesystem), and the processes wait for each other between stages.
  """
  captured = None
  if cfg.gradients:  # validated before anything is written
    try:
      captured = captured_update.load_update(cfg.gradients, build_victim(cfg)[1])
    except ValueError as e:
      raise InvalidSetting("gradients", f"gradients={cfg.gradients!r}: {e}") from None
  if rundir.is_writer():
    os.makedirs(cfg.workdir, exist_ok=True)
    vio.write_json(rundir.path(cfg, "config.json"), flag_values or dataclasses.asdict(cfg))
  with jax.default_matmul_precision(cfg.matmul_precision):
    result = _run_stages(cfg, captured)
  if "eval" in cfg.stages and rundir.is_writer():
    logging.info("report: %s", html_report.write_run_report(cfg.workdir, hidden=hidden_settings))
  return result


def _stage(cfg: RunConfig, name: str) -> Callable[..., Any]:
  attack = features.stage_attack if cfg.pipeline == "features" else frames.stage_attack
  return {"pretrain": stage_pretrain, "data": frames.stage_data, "attack": attack,
          "sr": stage_sr, "eval": stage_eval}[name]


def _run_stages(cfg: RunConfig, captured) -> dict[str, Any] | None:
  result = None
  for stage in STAGES:
    if stage not in cfg.stages:
      continue
    if stage not in ("sr", "eval") or rundir.is_writer():  # host-side work on the written files
      start = time.perf_counter()
      if stage == "attack":
        result = _stage(cfg, stage)(cfg, captured)
      else:
        result = _stage(cfg, stage)(cfg)
      logging.info("stage %s done in %.1fs", stage, time.perf_counter() - start)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vidleak_jax stage {stage}")
  return result
