"""Memory estimated before a run, checked against the machine, and XLA's plan of the step."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import pytest

import vidleak_jax as vl
from tests.conftest import ROOT, tiny_batch, tiny_victim
from vidleak_jax import resources
from vidleak_jax.attack import driver
from vidleak_jax.attack.config import resolve_batching, resolve_map_batch_size
from vidleak_jax.attack.optimizers import OPTIMIZERS, make_optimizer
from vidleak_jax.settings import InvalidSetting

GIB = resources.GiB
AVAILABLE = int(21.3 * GIB)  # a fixed machine, so the figures do not depend on this one


def _target(name="c3d", batch_size=1):
  apply_fn, params = tiny_victim(name)
  clips, labels = tiny_batch(batch_size)
  return apply_fn, params, vl.fl.client_update(apply_fn, params, clips, labels), clips, labels


def test_machine_figures():
  available = resources.available_host_bytes()
  assert isinstance(available, int) and 0 < available
  limit = resources.device_bytes_limit()
  assert limit is None if jax.default_backend() == "cpu" else limit > 0


def test_host_bytes_fall_back_without_proc_meminfo(monkeypatch):
  monkeypatch.setattr(resources, "_meminfo_available", lambda: None)
  monkeypatch.setattr(resources, "_cgroup_available", lambda: None)
  expected = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert abs(resources.available_host_bytes() - expected) < 256 << 20


def test_device_limit_from_memory_stats_or_none():
  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      if isinstance(self.stats, Exception):
        raise self.stats
      return self.stats

  assert resources.device_bytes_limit(Device({"bytes_limit": 80 * GIB})) == 80 * GIB
  for stats in (None, {}, {"bytes_in_use": 3}, NotImplementedError("no stats")):
    assert resources.device_bytes_limit(Device(stats)) is None


@pytest.mark.parametrize("name", OPTIMIZERS.names())
@pytest.mark.parametrize("memory", [10, 100])
def test_optimizer_slots_match_optax_state(name, memory):
  x = jax.ShapeDtypeStruct((2, 4, 16, 16, 3), jnp.float32)
  state = jax.eval_shape(make_optimizer(name, 0.1, "constant", 10, lbfgs_memory=memory).init, x)
  slots = resources.tree_bytes(state) / (math.prod(x.shape) * 4)
  # (L-BFGS also keeps a few scalars per memory slot: a small fraction of a slot)
  assert resources.optimizer_slots(name, memory) == pytest.approx(slots, abs=0.05), name


def test_estimate_counts_named_parts():
  est = resources.estimate(clip_shape=(1, 4, 16, 16, 3), restarts=8, num_params=1000,
                           optimizer="lbfgs", steps=100, log_every=10)
  clip = 4 * 16 * 16 * 3 * 4
  assert est.part("candidates and optimizer state").bytes == 8 * clip * 24
  assert est.part("best-so-far candidates").bytes == 8 * (clip + 4)
  assert est.part("snapshots").bytes == 10 * clip
  assert est.part("parameters and gradients").bytes == 4 * 1000 * 4
  assert est.part("client clips").bytes == clip
  assert est.total == sum(p.bytes for p in est.parts)
  assert {p.where for p in est.parts} == {"device", "host"}


# (victim, B, R, batching, optimizer): the estimate's device part vs XLA's plan of the step.
SMALL_RUNS = [("c3d", 1, 4, "map", "signed_adam"), ("frame_cnn", 2, 1, "vmap", "signed_adam"),
              ("cnn_rnn", 1, 4, "vmap", "lbfgs")]


@pytest.mark.parametrize("victim, batch_size, restarts, batching, optimizer", SMALL_RUNS)
def test_estimate_is_a_lower_bound_within_the_documented_factor(victim, batch_size, restarts,
                                                                batching, optimizer):
  apply_fn, params, target, clips, labels = _target(victim, batch_size)
  config = vl.attack.AttackConfig(restarts=restarts, steps=4, log_every=2, batching=batching,
                                  optimizer=optimizer)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  state = jax.eval_shape(attack.init, jax.random.key(0))
  footprint = resources.compiled_footprint(
      jax.jit(attack.run).lower(state, jnp.int32(0)).compile())
  assert footprint is not None  # arguments: the state and the int32 step count
  assert footprint.arguments == resources.tree_bytes(state) + 4
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  concurrent = (restarts if resolve_batching(batching) == "vmap"
                else resolve_map_batch_size(0, clips.shape))
  activations = resources.backward_bytes(lambda x: apply_fn(params, x),
                                         jax.ShapeDtypeStruct(clips.shape, jnp.float32))
  est = resources.estimate(clip_shape=clips.shape, restarts=restarts, num_params=num_params,
                           optimizer=optimizer, steps=4, log_every=2, concurrent=concurrent,
                           activation_bytes=activations).only("device")
  # memory_analysis leaves out the executable's constants: the victim's parameters and the
  # target update the step closes over.
  planned = footprint.total + 2 * num_params * 4
  print(f"{victim} B={batch_size} R={restarts} {batching} {optimizer}: estimate "
        f"{est.total} B, XLA {planned} B ({planned / est.total:.2f}x)")
  assert est.total <= planned <= resources.ESTIMATE_FACTOR * est.total


def test_estimate_state_is_exact():
  apply_fn, params, target, clips, labels = _target()
  config = vl.attack.AttackConfig(restarts=5, optimizer="sgd")
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  state = jax.eval_shape(attack.init, jax.random.key(0))
  est = resources.estimate(clip_shape=clips.shape, restarts=5, optimizer="sgd")
  counted = (est.part("candidates and optimizer state").bytes
             + est.part("best-so-far candidates").bytes)
  assert abs(resources.tree_bytes(state) - counted) < 64  # optax's step counters


def _refusal(fn, *args, **kwargs) -> tuple[InvalidSetting, float]:
  start = time.perf_counter()
  with pytest.raises(resources.InsufficientMemory) as info:
    fn(*args, **kwargs)
  elapsed = time.perf_counter() - start
  assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)
  return info.value, elapsed


def test_a_512_cube_clip_is_refused_in_milliseconds(monkeypatch):
  # The tiny preset's settings (lbfgs, 20 steps, log every 10) with --clip_shape=512,512,512,3.
  monkeypatch.setattr(resources, "available_host_bytes", lambda: AVAILABLE)
  error, elapsed = _refusal(resources.check_run, clip_shape=(512, 512, 512, 3), batch_size=1,
                            restarts=1, optimizer="lbfgs", steps=20, log_every=10)
  print(f"refused in {elapsed * 1e3:.2f} ms: {error}")
  assert elapsed < 5 and error.field == "clip_shape"
  assert str(error).startswith("clip_shape=512,512,512,3 needs ~36 GiB for the candidates and "
                               "optimizer state")
  assert "more than the 21.3 GiB" in str(error)
  # With adam the snapshots alone (8 clips of 1.5 GiB, host) outgrow the machine.
  est = resources.estimate_run(clip_shape=(512, 512, 512, 3), batch_size=1, restarts=1,
                               optimizer="signed_adam", steps=200, log_every=25)
  error, _ = _refusal(resources.check, est, AVAILABLE)
  assert error.field == "clip_shape" and "for the snapshots" in str(error)


def test_ten_million_restarts_are_refused_in_milliseconds(monkeypatch):
  monkeypatch.setattr(resources, "available_host_bytes", lambda: AVAILABLE)
  error, elapsed = _refusal(resources.check_run, clip_shape=(4, 8, 8, 3), batch_size=1,
                            restarts=10**7, optimizer="lbfgs", steps=2, log_every=10)
  print(f"refused in {elapsed * 1e3:.2f} ms: {error}")
  assert elapsed < 5 and error.field == "attack.restarts"
  assert str(error).startswith("restarts=10000000 needs ~6.9e+02 GiB for the candidates and "
                               "optimizer state")
  assert "more than the 21.3 GiB of host memory available" in str(error)


def test_the_setting_to_lower_is_named():
  est = resources.estimate_run(clip_shape=(4, 16, 16, 3), batch_size=4, restarts=8,
                               optimizer="adam", steps=10**9)
  error, _ = _refusal(resources.check, est, AVAILABLE)
  assert error.field == "attack.steps" and "for the history" in str(error)
  est = resources.estimate_run(clip_shape=(64, 256, 256, 3), batch_size=64, restarts=1,
                               optimizer="adam", steps=10)
  error, _ = _refusal(resources.check, est, AVAILABLE)
  assert error.field == "batch_size" and str(error).startswith("batch_size=64 needs")
  assert error.within("run").field == "run.batch_size"
  resources.check(est, None)  # unknown limit: passes
  resources.check(est, est.total)


def test_check_fits_splits_device_and_host_on_accelerators(monkeypatch):
  monkeypatch.setattr(resources, "is_host_memory", lambda device=None: False)
  monkeypatch.setattr(resources, "_memory_stats",
                      lambda device: {"bytes_limit": 2 * GIB, "bytes_in_use": GIB // 2})
  monkeypatch.setattr(resources, "available_host_bytes", lambda: 100 * GIB)
  est = resources.estimate(clip_shape=(1, 16, 128, 128, 3), restarts=512, steps=10)
  assert est.only("device").total > 1.5 * GIB and est.only("host").total < 100 * GIB
  error, _ = _refusal(resources.check_fits, est, "the attack")
  assert "1.5 GiB of device memory" in str(error) and error.field == "attack.restarts"


def test_backward_bytes_traces_shapes_only():
  start = time.perf_counter()
  cube = jax.ShapeDtypeStruct((1, 512, 512, 512, 3), jnp.float32)
  residuals = resources.backward_bytes(lambda x: jnp.sum(jax.nn.sigmoid(x) ** 2), cube)
  assert residuals == 2 * 512**3 * 3 * 4  # two clip-sized residuals (1.5 GiB each)
  assert time.perf_counter() - start < 5
  weights = jnp.ones((64, 64))  # held by the closure: exists anyway, not a residual
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
  assert resources.backward_bytes(lambda v: jnp.tanh(v @ weights), x) == 2 * 8 * 64 * 4


def test_compiled_footprint_handles_missing_analyses():
  class Compiled:
    def __init__(self, stats):
      self.stats = stats

    def memory_analysis(self):
      if isinstance(self.stats, Exception):
        raise self.stats
      return self.stats

  assert resources.compiled_footprint(Compiled(None)) is None
  assert resources.compiled_footprint(Compiled(NotImplementedError())) is None
  assert resources.compiled_footprint(Compiled(types.SimpleNamespace())) is None
  partial = resources.compiled_footprint(Compiled(types.SimpleNamespace(temp_size_in_bytes=7)))
  assert partial.total == 7 and partial.arguments == 0
  resources.check_compiled(None, "attack", field="restarts", value=3)


def test_driver_refuses_a_step_that_cannot_fit_before_the_first_dispatch(monkeypatch):
  apply_fn, params, target, clips, labels = _target()
  config = vl.attack.AttackConfig(restarts=3, steps=2, log_every=2)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  calls = []
  progress = lambda done, total, info: calls.append(done)
  done = driver.drive(attack, attack.init(jax.random.key(0)), config, progress=progress)
  assert done.footprint is not None and done.footprint.temporaries > 0
  assert calls == [0, 2]
  # A machine with less memory than XLA plans for one dispatch (beyond the resident state).
  monkeypatch.setattr(resources, "available_host_bytes", lambda: done.footprint.new - 1)
  calls.clear()
  error, _ = _refusal(driver.drive, attack, attack.init(jax.random.key(0)), config,
                      progress=progress)
  assert calls == [0] and error.field == "restarts"
  assert str(error).startswith("restarts=3 needs ~") and "compiled step (XLA: ~" in str(error)


def test_driver_state_check_allocates_nothing():
  apply_fn, params, target, clips, labels = _target()
  config = vl.attack.AttackConfig(restarts=10**7, steps=2)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  error, elapsed = _refusal(driver.check_state_fits, attack.init, jax.random.key(0), config)
  assert elapsed < 5 and error.field == "restarts"
  assert str(error).startswith("restarts=10000000 needs ~3.4e+02 GiB for the candidates and "
                               "optimizer state")
  small = vl.attack.AttackConfig(restarts=2, steps=2)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, small)
  assert driver.check_state_fits(attack.init, jax.random.key(0), small).total < 1 << 20


# The library entry point, in a process that cannot map more than 8 GiB: today it crashes on the
# failed allocation; it must refuse with the figures before allocating the candidates.
RECONSTRUCT_10M = textwrap.dedent("""
    import resource, time
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    import jax
    import vidleak_jax as vl
    from tests.conftest import tiny_batch, tiny_victim
    from vidleak_jax import resources
    apply_fn, params = tiny_victim("c3d")
    clips, labels = tiny_batch(1)
    target = vl.fl.client_update(apply_fn, params, clips, labels)
    config = vl.attack.AttackConfig(restarts=10**7, steps=2)
    start = time.perf_counter()
    try:
      vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target, clip_shape=clips.shape,
                            labels=labels, config=config)
    except resources.InsufficientMemory as e:
      print(f"REFUSED {time.perf_counter() - start:.3f}s {e}")
""")


@pytest.mark.slow
def test_reconstruct_refuses_ten_million_restarts_before_allocating():
  proc = subprocess.run([sys.executable, "-c", RECONSTRUCT_10M], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
  assert proc.returncode == 0 and refused, proc.stderr[-2000:]
  seconds, message = refused[0].split(" ", 2)[1:]
  assert float(seconds.rstrip("s")) < 5 and "restarts=10000000 needs ~" in message
