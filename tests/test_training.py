"""The resumable training loop: optimisation, exact resume, identity and step checks."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vidleak_jax import training

TARGET = jnp.array([1.0, -2.0, 3.0])


def _loss(params, step):
  noise = 0.01 * jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (3,))
  return jnp.sum(jnp.square(params["w"] - TARGET - noise))


def _train(directory=None, steps=60, identity=None, **kwargs):
  return training.train(_loss, {"w": jnp.zeros(3)}, optax.adam(0.1), steps=steps,
                        directory=directory, identity=identity or {"model": "quadratic"},
                        save_every=10, **kwargs)


def test_training_minimises_the_loss_and_reports_progress():
  seen = []
  params, losses = _train(steps=300,
                          progress=lambda done, total, loss: seen.append((done, total)))
  assert losses.shape == (300,) and losses[-10:].mean() < 1e-2 * losses[0]
  np.testing.assert_allclose(params["w"], TARGET, atol=0.05)
  assert seen[0] == (1, 300) and seen[-1] == (300, 300)


def test_interrupted_training_resumes_exactly(tmp_path):
  whole, whole_losses = _train(str(tmp_path / "whole"))
  _train(str(tmp_path / "split"), steps=30)  # stopped after 30 steps ...
  resumed, resumed_losses = _train(str(tmp_path / "split"))  # ... continued to 60
  np.testing.assert_array_equal(resumed_losses, whole_losses)
  np.testing.assert_array_equal(resumed["w"], whole["w"])
  meta = training.read_metadata(str(tmp_path / "split"))
  assert meta["step"] == 60 and meta["model"] == "quadratic" and len(meta["losses"]) == 60


def test_checkpoints_of_another_model_or_longer_runs_are_refused(tmp_path):
  directory = str(tmp_path / "run")
  _train(directory, steps=20)
  with pytest.raises(ValueError, match=r"holds another model \(differs in model"):
    _train(directory, identity={"model": "other"})
  with pytest.raises(ValueError, match="trained for 20 steps, more than the 10 asked for"):
    _train(directory, steps=10)
  # The identity is compared before any array is read: another shape gives the same message.
  with pytest.raises(ValueError, match="holds another model"):
    training.train(_loss, {"w": jnp.zeros(5)}, optax.adam(0.1), steps=30, directory=directory,
                   identity={"model": "wider"})
  assert training.read_metadata(str(tmp_path / "missing")) is None


def test_concurrent_trainings_of_one_directory_take_turns(tmp_path):
  directory, results, trained = str(tmp_path / "shared"), {}, {"first": 0, "second": 0}
  started = threading.Event()

  def run(name):
    def progress(done, total, loss):
      started.set()
      trained[name] += 1
      time.sleep(0.01)
    results[name] = _train(directory, steps=30, progress=progress)

  first = threading.Thread(target=run, args=("first",))
  first.start()
  started.wait(timeout=60)
  second = threading.Thread(target=run, args=("second",))  # waits, then finds the finished run
  second.start()
  first.join(timeout=120)
  second.join(timeout=120)
  assert trained == {"first": 30, "second": 0}
  np.testing.assert_array_equal(results["first"][1], results["second"][1])
  np.testing.assert_array_equal(results["first"][0]["w"], results["second"][0]["w"])
