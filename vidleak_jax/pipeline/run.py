"""Runs the selected stages of one run in order (`run`), alone or across `jax.distributed`
processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental import multihost_utils

from vidleak_jax import io as vio
from vidleak_jax import resources
from vidleak_jax.fl import captured as captured_update
from vidleak_jax.pipeline import clients, features, frames, rundir
from vidleak_jax.pipeline.config import STAGES, RunConfig
from vidleak_jax.pipeline.evaluate import stage_eval
from vidleak_jax.pipeline.feature_victim import stage_pretrain
from vidleak_jax.pipeline.sr import stage_sr
from vidleak_jax.pipeline.train import stage_train
from vidleak_jax.pipeline.victim import build_victim
from vidleak_jax.report import html as html_report
from vidleak_jax.settings import InvalidSetting


SETTINGS_FILE = "settings.json"  # the run's settings, written before its first stage
RUN_FILE = "run.json"  # the same, written after its last stage: the run is finished
# Settings that change how a run reports, not what it computes.
OUTPUT_ONLY = ("workdir", "quiet", "checkpoint_every")


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
  _check_resources(cfg)
  if cfg.victim_weights:  # validated before anything is written
    build_victim(cfg)
  captured = None
  if cfg.gradients:  # validated before anything is written
    try:
      captured = captured_update.load_update(cfg.gradients, build_victim(cfg)[1])
    except ValueError as e:
      raise InvalidSetting("gradients", f"gradients={cfg.gradients!r}: {e}") from None
  if rundir.is_writer():
    _refuse_other_settings_while_in_progress(cfg)  # before the lock: a refusal writes nothing
  with rundir.exclusive(cfg.workdir) if rundir.is_writer() else contextlib.nullcontext():
    if rundir.is_writer():
      _refuse_other_settings_while_in_progress(cfg)  # again, now that no one else writes
      vio.write_json(rundir.path(cfg, "config.json"), flag_values or dataclasses.asdict(cfg))
      vio.write_json(rundir.path(cfg, SETTINGS_FILE), run_settings(cfg))
    with jax.default_matmul_precision(cfg.matmul_precision):
      result = _run_stages(cfg, captured)
    if _evaluates(cfg) and rundir.is_writer():
      logging.info("report: %s", html_report.write_run_report(cfg.workdir,
                                                               hidden=hidden_settings))
    if rundir.is_writer():  # last: the run is finished (what `reuse` looks for)
      vio.write_json(rundir.path(cfg, RUN_FILE), {"settings": run_settings(cfg)})
  return result


def _check_resources(cfg: RunConfig) -> None:
  """`resources.InsufficientMemory` (naming the setting to lower) before anything is written when
  the run's clips, candidates and optimizer state cannot fit in this machine's memory."""
  if not {"data", "attack"} & set(cfg.stages):
    return
  resources.check_run(clip_shape=cfg.clip_shape, batch_size=clients.attacked_clips(cfg),
                      restarts=cfg.attack.restarts if "attack" in cfg.stages else 1,
                      optimizer=cfg.attack.optimizer, lbfgs_memory=cfg.attack.lbfgs_memory,
                      steps=cfg.attack.steps,
                      log_every=cfg.attack.log_every, attack_scale=cfg.attack.attack_scale,
                      what=f"the run in {cfg.workdir}")


def run_settings(cfg: RunConfig) -> dict[str, Any]:
  """What decides a run's results: its config as JSON values, without output-only settings."""
  settings = vio.to_jsonable(dataclasses.asdict(cfg))
  return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in OUTPUT_ONLY}


def differences(done: Any, now: Any, prefix: str = "") -> list[str]:
  """Dotted names of the settings in which two `run_settings` differ (sorted)."""
  if isinstance(done, dict) and isinstance(now, dict):
    return [d for k in sorted(set(done) | set(now))
            for d in differences(done.get(k), now.get(k), f"{prefix}{k}.")]
  return [] if done == now else [prefix.rstrip(".")]


_ABSENT = object()


def _lookup(settings: Any, dotted: str) -> Any:
  for name in dotted.split("."):
    if not isinstance(settings, dict) or name not in settings:
      return _ABSENT
    settings = settings[name]
  return settings


def changed_since(done: dict[str, Any], cfg: RunConfig) -> list[str]:
  """Dotted names of the settings in which a recorded run (`done`: its `run_settings`) differs
  from `cfg`. A setting the record lacks (added to RunConfig after that run) is unchanged while
  `cfg` leaves it at its default: a new setting's default keeps the behaviour the run had."""
  now = run_settings(cfg)
  default = run_settings(RunConfig(workdir=cfg.workdir))
  return [d for d in differences(done, now)
          if not (_lookup(done, d) is _ABSENT and _lookup(now, d) == _lookup(default, d))]


def _refuse_other_settings_while_in_progress(cfg: RunConfig) -> None:
  """ValueError, before anything is written, if cfg.workdir holds an unfinished run (its
  checkpoints) of other settings: resuming it would mix two runs."""
  settings_path = rundir.path(cfg, SETTINGS_FILE)
  if not (os.path.isdir(rundir.path(cfg, "checkpoints")) and os.path.isfile(settings_path)):
    return
  with open(settings_path, encoding="utf-8") as f:
    changed = [c for c in changed_since(json.load(f), cfg) if c != "stages"]
  if changed:
    raise InvalidSetting(changed[0], f"{cfg.workdir} holds an unfinished run with other settings "
                         f"({', '.join(changed[:5])}); rerun it with its settings to resume, or "
                         f"delete {rundir.path(cfg, 'checkpoints')} to start afresh")


def _evaluates(cfg: RunConfig) -> bool:
  """Whether the eval stage runs: selected, and the truth is the client's (not a captured update,
  whose clips the run does not have)."""
  return "eval" in cfg.stages and not cfg.gradients


def _stage(cfg: RunConfig, name: str) -> Callable[..., Any]:
  attack = features.stage_attack if cfg.pipeline == "features" else frames.stage_attack
  return {"pretrain": stage_pretrain, "train": stage_train, "data": frames.stage_data,
          "attack": attack, "sr": stage_sr, "eval": stage_eval}[name]


def _run_stages(cfg: RunConfig, captured) -> dict[str, Any] | None:
  result = None
  for stage in STAGES:
    if stage not in cfg.stages:
      continue
    if stage == "eval" and not _evaluates(cfg):
      logging.warning("eval skipped: the update comes from gradients=%r, whose clips this run "
                      "does not have (data.npz holds other clips)", cfg.gradients)
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
