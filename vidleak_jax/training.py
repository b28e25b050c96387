"""The resumable training loop behind the extractor pre-training and the SR networks.

`run_steps(step_fn, state, steps=...)` is the loop (FedAvg rounds run on it); `train(loss_fn,
params, optimizer, steps=...)` runs `optimizer` on `loss_fn(params, step)`, whose
minibatch the caller draws from (key, step), so a run resumed from a checkpoint ends exactly as an
uninterrupted one. With a `directory`, orbax checkpoints there hold {"params", "opt_state"} and
JSON metadata: the caller's `identity` (what was trained, on what) and the loss of every step so
far. The identity is compared before any array is restored, so a directory of another model is
refused with a message naming both.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging as std_logging
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging


class _WithoutOrbaxInfo(std_logging.Filter):
  """Drops orbax's INFO chatter (several lines per checkpoint); its warnings still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def without_orbax_info() -> Iterator[None]:
  """While open, orbax's INFO log lines are dropped (its warnings still show)."""
  logger, orbax_filter = logging.get_absl_logger(), _WithoutOrbaxInfo()
  logger.addFilter(orbax_filter)
  try:
    yield
  finally:
    logger.removeFilter(orbax_filter)


LossFn = Callable[[Any, jax.Array], jax.Array]  # (params, step int32[]) -> loss []


def _manager(directory: str, *, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create,
                                         enable_async_checkpointing=False)
  with without_orbax_info():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _close(manager: ocp.CheckpointManager) -> None:
  with without_orbax_info():
    manager.close()


def _open(directory: str) -> tuple[ocp.CheckpointManager, int] | None:
  """(a manager on the checkpoints under `directory`, the newest step), or None when there are
  none."""
  if not os.path.isdir(directory):
    return None
  manager = _manager(directory, create=False)
  with without_orbax_info():
    step = manager.latest_step()
  if step is None:
    _close(manager)
    return None
  return manager, step


def _newest_metadata(manager: ocp.CheckpointManager, step: int, directory: str) -> dict[str, Any]:
  try:
    with without_orbax_info():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # orbax raises many types for unreadable or foreign directories
    raise ValueError(f"checkpoint directory {directory!r} is unreadable or was not written by "
                     f"vidleak_jax ({type(e).__name__}: {e})") from None
  return {**dict(meta), "step": int(step)}


def read_metadata(directory: str) -> dict[str, Any] | None:
  """The newest checkpoint's JSON metadata (plus "step"), or None when there is none."""
  opened = _open(directory)
  if opened is None:
    return None
  manager, step = opened
  try:
    return _newest_metadata(manager, step, directory)
  finally:
    _close(manager)


def check_identity(meta: dict[str, Any], identity: dict[str, Any], directory: str) -> None:
  """ValueError unless the checkpoint's metadata holds exactly `identity`."""
  stored = {k: meta.get(k) for k in identity}
  if stored != identity:
    differ = sorted(k for k in identity if stored[k] != identity[k])
    raise ValueError(f"checkpoint directory {directory!r} holds another model (differs in "
                     f"{', '.join(differ)}: {stored} vs expected {identity}); use another "
                     f"directory or delete it")


def restore(directory: str, like: dict[str, Any], identity: dict[str, Any], steps: int | None
            ) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """(state shaped like `like`, metadata with "step") of the newest checkpoint, its identity
  checked before any array is read; None when `directory` holds no checkpoint.

  With `steps`, a checkpoint beyond it is refused (it would hand back a longer-trained model).
  """
  opened = _open(directory)
  if opened is None:
    return None
  manager, step = opened
  try:
    meta = _newest_metadata(manager, step, directory)
    check_identity(meta, identity, directory)
    if steps is not None and step > steps:
      raise ValueError(f"checkpoint directory {directory!r} holds a model trained for {step} "
                       f"steps, more than the {steps} asked for; ask for >= {step} steps or use "
                       f"another directory")
    try:
      with without_orbax_info():
        state = manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(like)))["train"]
    except Exception as e:
      raise ValueError(f"checkpoint directory {directory!r} does not fit this model "
                       f"({type(e).__name__}: {e})") from None
  finally:
    _close(manager)
  return state, meta


def save(manager: ocp.CheckpointManager, step: int, state: dict[str, Any],
         meta: dict[str, Any]) -> None:
  """One checkpoint: `state` arrays and `meta` JSON at `step`."""
  with without_orbax_info():
    manager.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))


@contextlib.contextmanager
def exclusive(directory: str | None) -> Iterator[None]:
  """Holds an exclusive lock on `directory` (a sibling file DIR.lock) while open, so processes
  sharing a checkpoint directory train it one after the other (the later ones resume)."""
  if directory is None:
    yield
    return
  path = os.path.abspath(directory).rstrip(os.sep)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "a", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


StepFn = Callable[[Any, jax.Array], tuple[Any, jax.Array]]  # (state, step) -> (state, value)


def run_steps(step_fn: StepFn, state: Any, *, steps: int, directory: str | None = None,
              identity: dict[str, Any] | None = None, save_every: int = 100,
              progress: Callable[[int, int, float], None] | None = None,
              key: str = "losses") -> tuple[Any, np.ndarray]:
  """`steps` calls of `step_fn` (jitted once) from `state`; returns (state, float32 values[steps]).

  `step_fn(state, step int32[])` returns the next state and one scalar to record (a loss, an
  accuracy). With `directory`: resumes from its newest checkpoint (same `identity` required),
  saves every `save_every` steps and at the end (the state's arrays, and `identity` plus the
  values so far under `key` as JSON), holding `exclusive(directory)` throughout; the caller
  draws any randomness from (key, step), so a resumed run ends exactly as an uninterrupted one.
  `progress(done, steps, value)` is called after every step.
  """
  if steps < 1 or save_every < 1:
    raise ValueError(f"steps and save_every must be >= 1, got {steps} and {save_every}")
  identity = dict(identity or {})
  with exclusive(directory):
    values: list[float] = []
    found = None if directory is None else restore(directory, state, identity, steps)
    if found is not None:
      state, meta = found
      values = [float(v) for v in meta.get(key, [])][:meta["step"]]
    jitted = jax.jit(step_fn)
    manager = None if directory is None else _manager(directory, create=True)
    try:
      for i in range(len(values), steps):
        state, value = jitted(state, jnp.int32(i))
        values.append(float(value))
        done = i + 1
        if manager is not None and (done % save_every == 0 or done == steps):
          save(manager, done, state, {**identity, key: values})
        if progress is not None:
          progress(done, steps, values[-1])
    finally:
      if manager is not None:
        _close(manager)
  return state, np.asarray(values, np.float32)


def train(loss_fn: LossFn, params: Any, optimizer: optax.GradientTransformation, *, steps: int,
          directory: str | None = None, identity: dict[str, Any] | None = None,
          save_every: int = 100,
          progress: Callable[[int, int, float], None] | None = None) -> tuple[Any, np.ndarray]:
  """`steps` optimizer steps on `loss_fn`; returns (params, float32 losses[steps]).

  With `directory`: resumes from its newest checkpoint (same `identity` required), saves every
  `save_every` steps and at the end, holding `exclusive(directory)` throughout (`run_steps`).
  `progress(done, steps, loss)` is called after every step.
  """

  def step_fn(state, step):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], step)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
      updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  state, losses = run_steps(step_fn, {"params": params, "opt_state": optimizer.init(params)},
                            steps=steps, directory=directory, identity=identity,
                            save_every=save_every, progress=progress)
  return state["params"], losses
