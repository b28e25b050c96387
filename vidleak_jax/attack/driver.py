"""`drive`: the host loop of every optimisation (`engine.Attack`): jit once, dispatch
`log_every` steps per call, report progress, checkpoint and resume, stop on request, shard the
restarts over a mesh, and keep curve snapshots. `reconstruct` and the feature stages use it."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.extend import core as jex_core

from vidleak_jax import resources
from vidleak_jax.attack import checkpoint
from vidleak_jax.attack.engine import Attack, AttackState, Settings
from vidleak_jax.attack.sharding import candidate_mesh, place_state, shard_candidates

# progress(step_done, total_steps, info) once before the first dispatch (step_done: the step the
# run starts or resumes from) and after every dispatch. info: "loss" (best objective so far),
# "objective_mean" (mean over restarts at step_done), "grad_match" (gradient-matching term of the
# restart best at step_done; NaN for objectives without one), any other metric of the objective
# (of that restart), "resumed_from" (the step this call started at), "compile_s" (after
# dispatches: the seconds spent compiling before the first one).
ProgressFn = Callable[[int, int, dict[str, float]], None]
MAX_SNAPSHOTS = resources.MAX_SNAPSHOTS


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A finished run (host arrays): per-restart best objectives [R] (the last candidates scored
  too), the best restart and its best candidate [...], per-step metrics {name: [steps, R]}, the
  compile time, and the curve's snapshots before the end (steps, best objective, snapshot)."""

  restart_losses: np.ndarray
  best_restart: int
  best_candidate: np.ndarray
  history: dict[str, np.ndarray]
  compile_s: float
  snapshot_steps: list[int]
  snapshot_objectives: list[float]
  snapshots: list[np.ndarray]
  footprint: resources.Footprint | None = None  # XLA's plan for one dispatch (None: unreported)


def fetch(tree):
  """Host copies of arrays; arrays spread over several processes are gathered first."""
  def fetch_one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(jax.device_get(a))
  return jax.tree.map(fetch_one, tree)


def _stop_requested(should_stop: Callable[[], bool] | None) -> bool:
  """Whether any process was asked to stop (all processes stop at the same dispatch).

  Every process passes the same kind of `should_stop`; None (nothing can ask) needs no collective,
  so runs on one process only (e.g. the sr stage's simulations) never wait on others.
  """
  if should_stop is None:
    return False
  stop = bool(should_stop())
  if jax.process_count() > 1:
    stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
  return stop


def _snapshot_dispatches(num_dispatches: int) -> set[int]:
  """Evenly spaced dispatch indices (first and last included) whose best points form the curve."""
  count = min(MAX_SNAPSHOTS, num_dispatches)
  return set(np.round(np.linspace(0, num_dispatches - 1, count)).astype(int).tolist())


def _state_device(state: AttackState):
  """A device holding (a shard of) the state: whose memory limit the step must fit."""
  leaf = jax.tree.leaves(state)[0]
  return min(leaf.devices(), key=lambda d: d.id) if isinstance(leaf, jax.Array) else None


def check_state_fits(init: Callable[[jax.Array], AttackState], key: jax.Array, settings: Settings,
                     *, name: str = "attack", host_copy: bool = True) -> resources.Estimate:
  """Before `init(key)` allocates anything: the state's size from a shape-only trace (candidates,
  optimizer state, best-so-far copies; plus a host copy of the initial candidates when
  `host_copy`) against this machine's memory (`resources.check_fits`). Raises
  `resources.InsufficientMemory` (field "restarts", relative to `settings`) with the figures;
  returns the estimate. Milliseconds for any R."""
  state = jax.eval_shape(init, key)
  start = resources.tree_bytes(state.candidates)
  parts = [resources.Part("candidates and optimizer state",
                          start + resources.tree_bytes(state.opt_state), resources.DEVICE),
           resources.Part("best-so-far candidates", resources.tree_bytes(
               (state.best_loss, state.best_candidates, state.step)), resources.DEVICE)]
  if host_copy:
    parts.append(resources.Part("initial candidates (host copy)", start, resources.HOST))
  est = resources.Estimate(tuple(parts), field="restarts", value=settings.restarts)
  resources.check_fits(est, name)
  return est


def _best(state: AttackState) -> tuple[float, np.ndarray]:
  """(best objective so far, best candidate so far [...]) over all restarts."""
  losses, candidates = fetch((state.best_loss, state.best_candidates))
  best = int(np.argmin(losses))
  return float(losses[best]), candidates[best]


def _log_point(chunk: dict[str, np.ndarray], rows: int, best_seen: float, start: int):
  """The progress info of a dispatch whose metrics `chunk` are [log_every, R] ([:rows] ran)."""
  last = {name: values[rows - 1] for name, values in chunk.items()}  # [R] at its last step
  best = int(np.argmin(np.nan_to_num(last["loss"], nan=np.inf)))
  metrics = {name: float(values[best]) for name, values in last.items() if name != "loss"}
  return {"grad_match": float("nan"), **metrics, "loss": best_seen,
          "objective_mean": float(np.mean(last["loss"])), "resumed_from": start}


def hoist_constants(fn: Callable, *example_args) -> tuple[Callable, list]:
  """`fn` as `(consts, *args) -> out`, the arrays it closes over (model params, the target update,
  ...) taken as the leading argument instead of being baked into the program, and those arrays.
  Compiled, the program depends only on shapes and settings: runs with other weights, data or
  seeds reuse one executable (and its entry in the persistent compilation cache)."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  out_tree = jax.tree.structure(out_shape)

  def call(consts, *args):
    fun = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, consts))
    return jax.tree.unflatten(out_tree, fun(*jax.tree.leaves(args)))

  return call, list(closed.consts)


def compile_hoisted(fn: Callable, state: Any, *args,
                    donate_state: bool = False) -> tuple[Callable, Any]:
  """(`fn(state, *args)` compiled ahead of time with its closed-over arrays as arguments
  (`hoist_constants`), the `jax.stages.Compiled` behind it); `donate_state` donates the state."""
  call, consts = hoist_constants(fn, state, *args)
  compiled = jax.jit(call, donate_argnums=(1,) if donate_state else ()).lower(
      consts, state, *args).compile()
  return (lambda state, *args: compiled(consts, state, *args)), compiled


def drive(attack: Attack, state: AttackState, settings: Settings, *,
          identity: dict[str, Any] | None = None, name: str = "attack",
          progress: ProgressFn | None = None, mesh: jax.sharding.Mesh | None | str = None,
          checkpoint_dir: str | None = None, checkpoint_every: int = 1,
          should_stop: Callable[[], bool] | None = None,
          snapshot: Callable[[np.ndarray], np.ndarray] | None = None) -> Outcome:
  """Runs `attack` from `state` for `settings.steps` steps, `settings.log_every` per dispatch of
  its jitted `run`, then `finalize`.

  `mesh`: restarts are split over its devices; "auto" uses all devices when R divides evenly
  (`candidate_mesh`), None keeps everything on the default device. `checkpoint_dir`: resumes from
  the latest checkpoint there if its description equals `identity` (`checkpoint.describe` /
  `describe_objective`; a ValueError names what differs) and saves one after every
  `checkpoint_every`-th dispatch except the last; a resumed run returns exactly what an
  uninterrupted one returns. `should_stop` is asked after every dispatch; when it returns True (on
  any process) a checkpoint is saved and `checkpoint.AttackInterrupted` raised. `snapshot(best
  candidate)`: what the curve keeps at up to `MAX_SNAPSHOTS` - 1 dispatches (None: no curve).
  `name` names the run in logs and messages.
  """
  if checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1 (dispatches), got {checkpoint_every}")
  steps, log_every = settings.steps, settings.log_every
  record, checkpointer = checkpoint.LoopRecord(), None
  if checkpoint_dir is not None:
    if identity is None:
      raise ValueError("a checkpoint_dir needs the run's identity (checkpoint.describe...)")
    checkpointer = checkpoint.Checkpointer(checkpoint_dir, identity, type(settings)())
    restored = checkpointer.restore(state)
    if restored is not None:
      state, record = jax.tree.map(jnp.asarray, restored[0]), restored[1]
      logging.info("%s resumed at step %d from %s", name, record.done, checkpoint_dir)
  start_step, best_seen = record.done, record.best_objective()
  if progress is not None:
    progress(start_step, steps, {"loss": best_seen, "resumed_from": start_step})
  if mesh == "auto":
    mesh = candidate_mesh(settings.restarts)
  if mesh is not None:
    attack, state = shard_candidates(attack, mesh), place_state(state, mesh)
  donate = () if jax.default_backend() == "cpu" else (0,)
  start = time.perf_counter()
  run, compiled = compile_hoisted(attack.run, state, jnp.int32(0), donate_state=bool(donate))
  compile_s = time.perf_counter() - start  # ahead of time: one executable for the whole loop
  footprint = resources.compiled_footprint(compiled)
  logging.info("%s step compiled in %.1fs; memory: %s", name, compile_s,
               "not reported by the backend" if footprint is None else footprint.describe())
  # Before the first dispatch: a step that cannot fit fails here, with its figures.
  resources.check_compiled(footprint, name, field="restarts", value=settings.restarts,
                           device=_state_device(state), devices=1 if mesh is None else mesh.size)
  snapshot_at = _snapshot_dispatches(-(-steps // log_every)) if snapshot else set()
  try:
    while record.done < steps:
      dispatch, rows = record.done // log_every, min(log_every, steps - record.done)
      state, metrics = run(state, jnp.int32(steps - record.done))
      record.chunks.append(fetch(metrics))
      record.done += rows
      best_seen = min(best_seen, float(np.nanmin(record.chunks[-1]["loss"])))
      if dispatch in snapshot_at and record.done < steps:  # the last one: the result
        objective, candidate = _best(state)
        record.snapshot_steps.append(record.done)
        record.snapshot_objectives.append(objective)
        record.snapshots.append(np.asarray(snapshot(candidate)))
      if progress is not None:  # before saving: a checkpoint never runs ahead of the log
        progress(record.done, steps, {**_log_point(record.chunks[-1], rows, best_seen, start_step),
                                      "compile_s": compile_s})
      stop = record.done < steps and _stop_requested(should_stop)  # done: keep the result
      if checkpointer is not None and (stop or (
          (dispatch + 1) % checkpoint_every == 0 and record.done < steps)):
        checkpointer.save(fetch(state), record)
      if stop:
        where = (f"progress saved in {checkpoint_dir}: run it again to resume" if checkpointer
                 else "no checkpoint_dir, progress lost")
        raise checkpoint.AttackInterrupted(f"{name} stopped at step {record.done}/{steps}; {where}")
  finally:
    if checkpointer is not None:
      checkpointer.close()
  state = jax.jit(attack.finalize)(state)
  losses, candidates = fetch((state.best_loss, state.best_candidates))
  best = int(np.argmin(losses))
  return Outcome(restart_losses=losses, best_restart=best, best_candidate=candidates[best],
                 history={k: v[:steps] for k, v in record.history().items()},
                 compile_s=compile_s, snapshot_steps=list(record.snapshot_steps),
                 snapshot_objectives=list(record.snapshot_objectives),
                 snapshots=list(record.snapshots), footprint=footprint)
