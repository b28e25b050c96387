"""Soteria's representation pruning (`fl.soteria`) against a model whose representation is known,
and defences in the FL simulation's training clients (the utility side)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax import pipeline, settings
from vidleak_jax.fl import soteria as sot
from vidleak_jax.pipeline import clients, train
from vidleak_jax.pipeline.config import TrainConfig

D, F, K = 12, 10, 3  # input entries, features, classes of the known model


def _known_model():
  """logits = tanh(x A) W + b with x [B, D]: the representation tanh(x A) is known exactly."""
  ka, kw, kb = jax.random.split(jax.random.key(0), 3)
  params = {"body": {"a": jax.random.normal(ka, (D, F))},
            "head": {"kernel": jax.random.normal(kw, (F, K)), "bias": jax.random.normal(kb, (K,))}}

  def apply_fn(p, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ p["body"]["a"]) @ p["head"]["kernel"] + \
        p["head"]["bias"]

  x = jax.random.normal(jax.random.key(1), (4, D))
  return apply_fn, params, x


def test_representation_and_ratios_equal_the_known_model_s():
  apply_fn, params, x = _known_model()
  index = sot.kernel_index(params, "head/kernel")
  r = np.tanh(np.asarray(x, np.float64) @ np.asarray(params["body"]["a"], np.float64))
  np.testing.assert_allclose(sot.representation(apply_fn, params, x, index), r, rtol=1e-5,
                             atol=1e-6)
  # d r_bf / d x_b = (1 - r_bf²) a_f: the ratio formula from the Jacobian in closed form.
  a = np.asarray(params["body"]["a"], np.float64)
  sensitivity = np.sqrt(((1 - r ** 2) ** 2).sum(0) * (a ** 2).sum(0))
  expected = np.linalg.norm(r, axis=0) / sensitivity
  np.testing.assert_allclose(sot.revealing_ratios(apply_fn, params, x, index, chunk=3),
                             expected, rtol=1e-4)


@pytest.mark.parametrize("percent", [0, 30, 80])
def test_soteria_zeros_the_kernel_rows_of_the_most_revealing_features_only(percent):
  apply_fn, params, x = _known_model()
  labels = jnp.array([0, 1, 2, 0])
  update = jax.grad(lambda p: vl.fl.cross_entropy(apply_fn(p, x), labels))(params)
  defended = sot.soteria(apply_fn, params, x, update, kernel="head/kernel", percent=percent)
  ratios = np.asarray(sot.revealing_ratios(apply_fn, params, x,
                                           sot.kernel_index(params, "head/kernel")))
  pruned = ratios < np.percentile(ratios, percent)
  assert pruned.sum() == (0 if percent == 0 else int(np.ceil(percent / 100 * (F - 1))))
  rows = np.asarray(defended["head"]["kernel"])
  assert np.all(rows[pruned] == 0)
  np.testing.assert_array_equal(rows[~pruned], np.asarray(update["head"]["kernel"])[~pruned])
  for path in (("body", "a"), ("head", "bias")):
    np.testing.assert_array_equal(defended[path[0]][path[1]], update[path[0]][path[1]])


def test_soteria_refuses_what_is_not_a_dense_kernel():
  apply_fn, params, x = _known_model()
  with pytest.raises(ValueError, match="kernel='head/bias' must be the path of a dense"):
    sot.kernel_index(params, "head/bias")
  squared = lambda p, x: jnp.tanh(x @ p["body"]["a"]) @ p["head"]["kernel"] ** 2
  with pytest.raises(ValueError, match="kernel='head/kernel' does not act as a dense"):
    sot.check_dense(squared, params, x, 2, "head/kernel")
  with pytest.raises(ValueError, match=r"percent must be in \[0, 100\)"):
    sot.soteria(apply_fn, params, x, params, kernel="head/kernel", percent=100)


def test_a_soteria_run_shares_pruned_classifier_rows_and_matches_on_their_support():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  cfg = pipeline.RunConfig(workdir="w", clip_shape=(4, 16, 16, 3),
                           defenses=("soteria:percent=50",))
  assert clients.classifier_kernel(cfg, apply_fn, params) == "head/kernel"
  shared = clients.client_side(cfg, apply_fn, params, clips, labels)
  plain = vl.fl.client_update(apply_fn, params, clips, labels)
  rows = np.abs(np.asarray(shared["head"]["kernel"])).sum(1)
  assert (rows == 0).mean() == pytest.approx(0.5, abs=0.01)
  np.testing.assert_array_equal(shared["conv1"]["kernel"], plain["conv1"]["kernel"])
  support = clients.match_support(cfg, shared)
  assert support is not None and not np.asarray(support["head"]["kernel"]).all()


@pytest.mark.parametrize("specs, message", [
    (("soteria:percent=100",), r"percent \(pruned share of the features, %\) must be in"),
    (("soteria",), "soteria takes exactly the settings percent; missing: percent"),
    (("int8", "soteria:percent=50"), "must come before the update transforms"),
])
def test_bad_soteria_specs_name_defenses(specs, message):
  with pytest.raises(settings.InvalidSetting, match=message) as e:
    pipeline.RunConfig(workdir="w", defenses=specs)
  assert e.value.field == "defenses"


def _population(n_clients=2, n=2):
  clips, labels = tiny_batch(n_clients * n, seed=5)
  return (np.asarray(clips).reshape(n_clients, n, *clips.shape[1:]),
          np.asarray(labels).reshape(n_clients, n))


def test_training_clients_share_their_defended_update():
  """train_global with a client_fn: a round's new params are the old minus the mean of what
  the clients' client_fn returned (here a pruned FedAvg delta), checked by hand."""
  apply_fn, params = tiny_victim("c3d")
  clips, labels = _population()
  local = vl.fl.LocalTraining(epochs=1, batch_size=1)
  prune = vl.fl.defenses.prune(0.9)

  def client_fn(p, c, l, order, key):
    del key
    delta = vl.fl.fedavg_update(apply_fn, p, c, l, local=local, order=order)
    return vl.fl.defend(None, delta, [prune])

  key = jax.random.key(4)
  trained, _ = vl.fl.train_global(key, apply_fn, params, clips, labels, clips[0], labels[0],
                                  rounds=1, local=local, client_fn=client_fn)
  orders = [vl.fl.minibatch_order(k, 2, local) for k in vl.fl.client_keys(key, 0, 2)]
  deltas = [vl.fl.defend(None, vl.fl.fedavg_update(apply_fn, params, jnp.asarray(clips[i]),
                                                   jnp.asarray(labels[i]),
                                                   local=local, order=orders[i]), [prune])
            for i in range(2)]
  expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, params, *deltas)
  for got, want in zip(jax.tree.leaves(trained), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  moved = [np.count_nonzero(np.asarray(a) != np.asarray(b)) for a, b in
           zip(jax.tree.leaves(trained), jax.tree.leaves(params))]
  total = sum(np.size(x) for x in jax.tree.leaves(params))
  assert 0 < sum(moved) <= 2 * (total - int(0.9 * total))  # at most both clients' supports


def test_the_train_stage_s_dp_clients_take_noised_steps_and_report_epsilon():
  apply_fn, params = tiny_victim("c3d")
  cfg = pipeline.RunConfig(workdir="w", clip_shape=(4, 16, 16, 3), batch_size=2,
                           defenses=("dp_sgd:clip_norm=0.1:noise_multiplier=1.5",),
                           train=TrainConfig(rounds=7))
  client = train.defended_client(cfg, apply_fn, params)
  clips, labels = tiny_batch(2)
  order = jnp.arange(2, dtype=jnp.int32)[None]  # the default local setting: one full-batch step
  key = jax.random.key(9)
  delta = client(params, clips, labels, order, key)
  expected = vl.fl.dp_client_update(apply_fn, params, clips, labels,
                                    key=jax.random.fold_in(jax.random.fold_in(key, 1), 0),
                                    clip_norm=0.1, noise_multiplier=1.5)
  for got, want in zip(jax.tree.leaves(delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, cfg.local.lr * np.asarray(want), rtol=1e-3, atol=1e-7)
  assert train.training_epsilon(cfg) == vl.fl.epsilon(1.5, 1.0, 7, train.DP_DELTA)
  # FedAvg clients: 2 epochs of b = 2 over 8 clips = 8 noised steps per round at rate 2/8.
  fedavg = dataclasses.replace(cfg, local=vl.fl.LocalTraining(epochs=2, batch_size=2),
                               train=TrainConfig(rounds=7, client_clips=8))
  assert train.training_epsilon(fedavg) == vl.fl.epsilon(1.5, 0.25, 56, train.DP_DELTA)
  assert train.defended_client(dataclasses.replace(cfg, defenses=()), apply_fn, params) is None
