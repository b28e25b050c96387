"""Memory a run needs, estimated before anything is allocated, and what the machine has.

Three figures, cheapest first:
  * `estimate` / `estimate_run`: arithmetic on a run's settings (clip shape, restarts, optimizer,
    steps, parameter count), in microseconds, allocating nothing. It counts the buffers the
    attack certainly keeps (see `estimate` for the list) and is a LOWER BOUND on the memory a
    run's step works in: the victim's activations enter only when the caller measures them
    (`backward_bytes`), XLA's temporaries and copies are not modelled. Measured on CPU for the
    tiny victims of the tests (c3d, frame_cnn, cnn_rnn; B 1–2, R 1–16, vmap and map batching,
    adam, sgd, lbfgs), XLA's plan for one dispatch of the step (`compiled_footprint`, plus the
    parameters and target update it holds as constants) is 1.5–6x the estimate's device part;
    `ESTIMATE_FACTOR` bounds it in the tests.
  * `backward_bytes(fn, *args)`: the residuals the reverse pass of `fn` keeps (the activations
    one gradient stores), from a shape-only trace.
  * `compiled_footprint(compiled)`: what XLA planned for a compiled executable (arguments,
    outputs, temporaries), when the backend reports it.

`check` / `check_fits` / `check_compiled` raise `InsufficientMemory`, an `InvalidSetting` (naming
the setting to lower, e.g. "attack.restarts" or "clip_shape") that is also a `MemoryError`, with
the figure and the limit in GiB.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jax_core
import numpy as np

from vidleak_jax.settings import InvalidSetting

GiB = 1 << 30
# The estimate's device part is a lower bound on XLA's plan for the attack step; the tiny victims
# of the tests (with `backward_bytes` activations) stay within this factor of it (1.5–6x seen).
ESTIMATE_FACTOR = 8
# Candidate-sized slots of optimizer state per candidate (float32, optax's own state; checked
# against `jax.eval_shape(opt.init, x)` in the tests): adam and signed_adam keep mu and nu, sgd
# (momentum 0.9) one trace, L-BFGS with memory m keeps m parameter and m gradient differences
# plus the last parameters, updates and the line search's gradient (2m + 3).
LBFGS_MEMORY = 10  # optax.lbfgs default (attack.optimizers.LBFGS_MEMORY)
OPTIMIZER_SLOTS: dict[str, int] = {"adam": 2, "signed_adam": 2, "sgd": 1,
                                   "lbfgs": 2 * LBFGS_MEMORY + 3}
UNKNOWN_OPTIMIZER_SLOTS = 2  # an optimizer not listed is counted like adam
MAX_SNAPSHOTS = 32  # the driver's curve keeps at most this many best clips on the host
# Config fields (RunConfig paths) blamed when a run does not fit, by `estimate` input.
RUN_FIELDS: dict[str, str] = {"restarts": "attack.restarts", "steps": "attack.steps",
                              "batch_size": "batch_size", "clip_shape": "clip_shape"}
DEVICE, HOST = "device", "host"


class InsufficientMemory(InvalidSetting, MemoryError):
  """A run needs more memory than there is. `field`: the setting to lower (a config path such as
  "attack.restarts" or "clip_shape"); the message has the figure and the limit in GiB."""


# ---- what the machine has ------------------------------------------------------------------------


def _meminfo_available() -> int | None:
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    pass
  return None


def _cgroup_available() -> int | None:
  """limit - usage of this process's memory cgroup (v2, else v1), if it sets a limit."""
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file, encoding="ascii") as f:
        limit = f.read().strip()
      with open(usage_file, encoding="ascii") as f:
        usage = int(f.read().strip())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 number: no limit
      return max(int(limit) - usage, 0)
  return None


def available_host_bytes() -> int | None:
  """Host memory that can still be allocated without swapping: MemAvailable (/proc/meminfo),
  capped by the memory cgroup's remaining limit; elsewhere the free physical pages
  (`os.sysconf`); None if the system tells nothing."""
  found = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
  if not found:
    try:
      found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    except (AttributeError, OSError, ValueError):
      return None
  return min(found)


def _default_device(device: Any = None) -> Any:
  return jax.local_devices()[0] if device is None else device


def _memory_stats(device: Any) -> Mapping[str, Any]:
  try:
    return _default_device(device).memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without stats raise or return None
    return {}


def device_bytes_limit(device: Any = None) -> int | None:
  """The memory an accelerator lets this process allocate (`memory_stats()["bytes_limit"]`) on
  `device` (default: the first local device); None where the backend does not report it (CPU)."""
  limit = _memory_stats(device).get("bytes_limit")
  return int(limit) if limit else None


def is_host_memory(device: Any = None) -> bool:
  """Whether `device` (default: the first local device) computes in host memory (CPU)."""
  return _default_device(device).platform == "cpu"


def available_bytes(where: str = DEVICE, device: Any = None) -> tuple[int | None, str]:
  """(bytes, what they are) that the buffers of `where` ("device" | "host") can still take: the
  device's limit less what it holds, or the host's available memory (also for "device" on CPU)."""
  if where == DEVICE and not is_host_memory(device):
    stats = _memory_stats(device)
    limit = stats.get("bytes_limit")
    if not limit:
      return None, "device memory"
    return int(limit) - int(stats.get("bytes_in_use", 0)), "device memory"
  return available_host_bytes(), "host memory"


# ---- estimates -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
  """`bytes` of `name` ("candidates and optimizer state", ...) kept in `where` memory."""

  name: str
  bytes: int
  where: str  # DEVICE | HOST


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Named parts and their total. `inputs`: the `estimate` arguments it was made from (so a check
  can tell which setting to lower), or None for parts measured elsewhere, blamed on `field`."""

  parts: tuple[Part, ...]
  inputs: Mapping[str, Any] | None = None
  field: str = "clip_shape"
  value: Any = None

  @property
  def total(self) -> int:
    return sum(p.bytes for p in self.parts)

  def part(self, name: str) -> Part:
    return next(p for p in self.parts if p.name == name)

  def only(self, where: str) -> Estimate:
    """The parts kept in `where` memory."""
    return dataclasses.replace(self, parts=tuple(p for p in self.parts if p.where == where))

  def describe(self) -> str:
    """'name ~x MiB (where), ...; total ~y GiB' for logs."""
    parts = ", ".join(f"{p.name} ~{format_bytes(p.bytes)} ({p.where})" for p in self.parts)
    return f"{parts}; total ~{format_bytes(self.total)}"


def optimizer_slots(optimizer: str, lbfgs_memory: int = LBFGS_MEMORY) -> int:
  """Candidate-sized slots of optimizer state per candidate (`OPTIMIZER_SLOTS`; L-BFGS with
  memory m: 2m + 3)."""
  if optimizer == "lbfgs":
    return 2 * lbfgs_memory + 3
  return OPTIMIZER_SLOTS.get(optimizer, UNKNOWN_OPTIMIZER_SLOTS)


def estimate(*, clip_shape: Sequence[int], restarts: int, num_params: int = 0,
             optimizer: str = "signed_adam", lbfgs_memory: int = LBFGS_MEMORY, steps: int = 1,
             log_every: int | None = None,
             attack_scale: int = 1, concurrent: int = 1, activation_bytes: int = 0,
             metrics: int = 2, itemsize: int = 4) -> Estimate:
  """The memory of an attack on clips `clip_shape` (B,T,H,W,C) with R = `restarts`, before it
  starts: arithmetic only, nothing allocated. Parts (float32 unless `itemsize`):

  device (where the step runs; the same memory as the host's on CPU):
    * "candidates and optimizer state": R · latent · (1 + `optimizer_slots`), latent = B·T·(H/s)·
      (W/s)·C for `attack_scale` s;
    * "best-so-far candidates": R · latent, plus the best objective per restart;
    * "parameters and gradients": the victim's P = `num_params` parameters and the target update
      (2P), plus per candidate computed at once (`concurrent`: R with vmap batching, the group
      size with map) its parameter gradient and their cotangents (2P);
    * "per-candidate working memory": `concurrent` · (3 clips: decoded clip, its gradient, the
      optimizer's update + `activation_bytes`, the victim's residuals for one gradient, see
      `backward_bytes`; 0 = unknown);
    * "metrics of a dispatch": `log_every` (default `steps`) · R · `metrics`.
  host:
    * "client clips": B·T·H·W·C;
    * "initial candidates (host copy)": R · latent (kept as the baseline of the evaluation);
    * "snapshots": min(32, dispatches) clips of the curve;
    * "history": `steps` · R · `metrics` per-step values.

  Not counted: XLA's temporaries beyond these, the second copy of the state while a dispatch runs
  where buffers are not donated (CPU), the victim's activations when `activation_bytes` is 0, the
  model and data stages. It is a lower bound: a run that fails the check cannot fit; one that
  passes may still not (the driver checks XLA's plan once the step is compiled).
  """
  shape = tuple(int(s) for s in clip_shape)
  if len(shape) != 5 or min(shape) < 1:
    raise ValueError(f"clip_shape must be 5 positive integers (B, T, H, W, C), got {clip_shape}")
  batch, frames, height, width, channels = shape
  scale = max(int(attack_scale), 1)
  clip = math.prod(shape) * itemsize
  latent = batch * frames * -(-height // scale) * -(-width // scale) * channels * itemsize
  r, per_step = int(restarts), int(metrics) * itemsize
  log_every = int(steps) if log_every is None else int(log_every)
  dispatches = -(-int(steps) // max(log_every, 1))
  concurrent = max(1, min(int(concurrent), r))
  params = int(num_params) * itemsize
  parts = (
      Part("candidates and optimizer state",
           r * latent * (1 + optimizer_slots(optimizer, lbfgs_memory)),
           DEVICE),
      Part("best-so-far candidates", r * (latent + itemsize), DEVICE),
      Part("parameters and gradients", 2 * params + concurrent * 2 * params, DEVICE),
      Part("per-candidate working memory", concurrent * (3 * clip + int(activation_bytes)),
           DEVICE),
      Part("metrics of a dispatch", log_every * r * per_step, DEVICE),  # a scan of log_every
      Part("client clips", clip, HOST),
      Part("initial candidates (host copy)", r * latent, HOST),
      Part("snapshots", min(MAX_SNAPSHOTS, dispatches) * clip, HOST),
      Part("history", int(steps) * r * per_step, HOST),
  )
  inputs = dict(clip_shape=shape, restarts=r, num_params=num_params, optimizer=optimizer,
                lbfgs_memory=lbfgs_memory, steps=steps, log_every=log_every, attack_scale=attack_scale,
                concurrent=concurrent, activation_bytes=activation_bytes, metrics=metrics,
                itemsize=itemsize)
  return Estimate(parts, inputs)


def estimate_run(*, clip_shape: Sequence[int], batch_size: int, restarts: int,
                 optimizer: str, steps: int, log_every: int = 25, num_params: int = 0,
                 attack_scale: int = 1, concurrent: int = 1,
                 activation_bytes: int = 0, lbfgs_memory: int = LBFGS_MEMORY) -> Estimate:
  """`estimate` from a RunConfig's values: `clip_shape` is its (T,H,W,C), B = `batch_size`."""
  return estimate(clip_shape=(batch_size, *clip_shape), restarts=restarts, num_params=num_params,
                  optimizer=optimizer, lbfgs_memory=lbfgs_memory, steps=steps,
                  log_every=log_every, attack_scale=attack_scale, concurrent=concurrent,
                  activation_bytes=activation_bytes)


def backward_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes of the residuals `jax.vjp(fn, *args)` keeps for the reverse pass (the activations one
  gradient of `fn` stores), from a shape-only trace: `args` may be `jax.ShapeDtypeStruct`s and
  nothing is allocated. Residuals that are `fn`'s inputs or constants (e.g. the weights a
  closure holds) are buffers that exist anyway and are not counted; each residual counts once."""
  closed = jax.make_jaxpr(lambda *a: jax.tree.leaves(jax.vjp(fn, *a)[1]))(*args)
  jaxpr = closed.jaxpr
  existing = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}
  kept: dict[int, Any] = {}
  for var in jaxpr.outvars:
    if isinstance(var, jax_core.Var) and id(var) not in existing:  # not a Literal
      kept[id(var)] = var.aval
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in kept.values())


def _tree_bytes(tree: Any) -> int:
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`) of a pytree."""
  return _tree_bytes(tree)


# ---- checks --------------------------------------------------------------------------------------


def _gib(nbytes: float) -> str:
  return f"{nbytes / GiB:.2g}"


def format_bytes(nbytes: float) -> str:
  """'1.5 GiB', '340 MiB', '12 KiB' (3 significant digits at most)."""
  for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if abs(nbytes) >= size:
      return f"{nbytes / size:.3g} {unit}"
  return f"{int(nbytes)} B"


def _show(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)


def _blame(est: Estimate, available: int) -> tuple[str, Any, Part]:
  """(field, value, part quoted) of the setting to lower: of restarts, steps (their per-step
  history) and batch size, the one saving most among those whose reduction to 1 alone makes `est`
  fit, else among all when lowering all of them fits; else the clip's shape."""
  biggest = max(est.parts, key=lambda p: p.bytes)
  if est.inputs is None:
    return est.field, est.value, biggest
  inputs = dict(est.inputs)
  batch, *clip = inputs["clip_shape"]
  where = {p.where for p in est.parts}
  dispatches = -(-inputs["steps"] // inputs["log_every"])

  def reduced(**changes: Any) -> Estimate:
    full = estimate(**{**inputs, **changes})
    return dataclasses.replace(full, parts=tuple(p for p in full.parts if p.where in where))

  knobs = {"restarts": ({"restarts": 1}, inputs["restarts"]),  # one step per dispatch: the
           "steps": ({"steps": dispatches, "log_every": 1}, inputs["steps"]),  # same snapshots
           "batch_size": ({"clip_shape": (1, *clip)}, batch)}
  knobs = {k: v for k, v in knobs.items() if v[1] > 1}
  smaller = {k: reduced(**changes) for k, (changes, _) in knobs.items()}
  fitting = [k for k, e in smaller.items() if e.total <= available]
  everything = {c: v for changes, _ in knobs.values() for c, v in changes.items()}
  if not fitting and knobs and reduced(**everything).total <= available:
    fitting = list(smaller)
  if not fitting:
    return RUN_FIELDS["clip_shape"], tuple(clip), biggest
  chosen = min(fitting, key=lambda k: smaller[k].total)
  growth = [(p.bytes - q.bytes, p) for p, q in zip(est.parts, smaller[chosen].parts)]
  return RUN_FIELDS[chosen], knobs[chosen][1], max(growth, key=lambda g: g[0])[1]


def check(est: Estimate, available: int | None, what: str = "the run",
          memory: str = "memory") -> None:
  """InsufficientMemory unless `est.total` fits in `available` bytes (None: unknown, passes).

  The error names the setting to lower (its config path as `field`), the part it inflates and
  the figures, e.g. "restarts=10000000 needs ~3.4e+02 GiB for the candidates and optimizer state
  (the run: ~7.2e+02 GiB in all, a lower bound), more than the 21 GiB of host memory available".
  """
  if available is None or est.total <= available:
    return
  field, value, part = _blame(est, available)
  name = field.rsplit(".", 1)[-1]
  in_all = (f" ({what}: ~{_gib(est.total)} GiB in all, a lower bound)" if part.bytes < est.total
            else f" ({what}; a lower bound)")
  raise InsufficientMemory(field, f"{name}={_show(value)} needs ~{_gib(part.bytes)} GiB for "
                                  f"the {part.name}{in_all}, more than the "
                                  f"{available / GiB:.1f} GiB of {memory} available")


def check_fits(est: Estimate, what: str = "the run", device: Any = None) -> None:
  """`check` against this machine: on CPU all parts against the host's available memory; on an
  accelerator the device parts against `device`'s free memory and the host parts against the
  host's (unknown limits pass)."""
  if is_host_memory(device):
    check(est, available_host_bytes(), what, "host memory")
    return
  for where in (DEVICE, HOST):
    available, memory = available_bytes(where, device)
    check(est.only(where), available, what, memory)


def check_run(*, clip_shape: Sequence[int], batch_size: int, restarts: int, optimizer: str,
              steps: int, log_every: int = 25, num_params: int = 0, attack_scale: int = 1,
              concurrent: int = 1, activation_bytes: int = 0, what: str = "the run",
              device: Any = None, lbfgs_memory: int = LBFGS_MEMORY) -> Estimate:
  """`check_fits(estimate_run(...))` for a RunConfig's values; returns the estimate."""
  est = estimate_run(clip_shape=clip_shape, batch_size=batch_size, restarts=restarts,
                     optimizer=optimizer, steps=steps, log_every=log_every,
                     num_params=num_params, attack_scale=attack_scale, concurrent=concurrent,
                     activation_bytes=activation_bytes, lbfgs_memory=lbfgs_memory)
  check_fits(est, what, device)
  return est


# ---- compiled executables ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Footprint:
  """XLA's plan for one call of a compiled executable (bytes per device): `total` = arguments +
  outputs + temporaries - aliased (donated arguments reused as outputs)."""

  arguments: int
  outputs: int
  temporaries: int
  aliased: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @property
  def new(self) -> int:
    """What a call allocates beyond its (already resident) arguments."""
    return self.total - self.arguments

  def describe(self) -> str:
    return (f"~{format_bytes(self.total)} per call (arguments {format_bytes(self.arguments)}, "
            f"outputs {format_bytes(self.outputs)}, temporaries {format_bytes(self.temporaries)})")


def compiled_footprint(compiled: Any) -> Footprint | None:
  """The `Footprint` of `jax.jit(...).lower(...).compile()`'s result from its
  `memory_analysis()`; None where the backend reports none (or no sizes)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # unimplemented on some backends
    return None
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return None
  sizes = [getattr(stats, f"{name}_size_in_bytes", None)
           for name in ("argument", "output", "temp", "alias")]
  if all(s is None for s in sizes[:3]):
    return None
  return Footprint(*(int(s or 0) for s in sizes))


def check_compiled(footprint: Footprint | None, what: str, *, field: str, value: Any,
                   device: Any = None, devices: int = 1) -> None:
  """InsufficientMemory naming `field`=`value` unless a call of the executable fits: its total
  (per device) within the device's limit on an accelerator; on CPU, what it allocates beyond its
  resident arguments, times the `devices` it runs on (they share the host's memory), within the
  host's available memory. Unknown figures pass."""
  if footprint is None:
    return
  if is_host_memory(device):
    need, available = footprint.new * devices, available_host_bytes()
    memory = "host memory available"
  else:
    need, available, memory = footprint.total, device_bytes_limit(device), "device memory"
  if available is None or need <= available:
    return
  name = field.rsplit(".", 1)[-1]
  raise InsufficientMemory(field, f"{name}={_show(value)} needs ~{_gib(need)} GiB for "
                                  f"{what}'s compiled step (XLA: {footprint.describe()}), more "
                                  f"than the {available / GiB:.1f} GiB of {memory}")
