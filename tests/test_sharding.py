"""Restarts sharded over 4 fake CPU devices give the single-device result for the same seed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import vidleak_jax as vl
    from tests.conftest import tiny_batch, tiny_victim
    assert jax.device_count() == 4, jax.devices()
    apply_fn, params = tiny_victim("frame_cnn")
    clips, labels = tiny_batch(1)
    target = vl.fl.client_update(apply_fn, params, clips, labels)
    for batching in ("map", "vmap"):
      config = vl.attack.AttackConfig(restarts=4, steps=6, log_every=3, batching=batching)
      run = lambda mesh: vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                                               clip_shape=clips.shape, config=config, mesh=mesh)
      single, sharded = run(None), run("auto")
      assert vl.attack.sharding.candidate_mesh(4) is not None
      np.testing.assert_allclose(sharded.restart_losses, single.restart_losses, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(sharded.history["loss"], single.history["loss"], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(sharded.clips, single.clips, atol=1e-4)
      assert sharded.best_restart == single.best_restart
    print("OK")
""")


@pytest.mark.slow
def test_sharded_restarts_equal_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
