"""FedAvg: local epochs over mini-batches against an explicit loop, the attacker's replay,
aggregation over clients, and the resumable training of the global model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim


def _explicit_sgd(apply_fn, params, clips, labels, order, lr, momentum):
  """Plain-Python SGD (torch semantics: v = m v + g; w -= lr v) over the rows of `order`."""
  loss = lambda p, x, y: vl.fl.cross_entropy(apply_fn(p, x), y)
  grad = jax.jit(jax.grad(loss))  # one step's gradient; the loop stays in Python
  velocity = jax.tree.map(jnp.zeros_like, params)
  p = params
  for idx in np.asarray(order):
    g = grad(p, clips[idx], labels[idx])
    velocity = jax.tree.map(lambda v, d: momentum * v + d, velocity, g)
    p = jax.tree.map(lambda w, v: w - lr * v, p, velocity)
  return jax.tree.map(jnp.subtract, params, p)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_client_update_equals_an_explicit_loop_over_its_minibatches(momentum):
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(4)
  local = vl.fl.LocalTraining(epochs=3, batch_size=2, lr=0.3, momentum=momentum)
  key = jax.random.key(7)
  order = vl.fl.minibatch_order(key, 4, local)
  assert order.shape == (6, 2)  # 3 epochs × 2 mini-batches of 2
  for epoch in np.asarray(order).reshape(3, 4):  # every epoch visits every clip once
    assert sorted(epoch.tolist()) == [0, 1, 2, 3]
  assert len({tuple(e) for e in np.asarray(order).reshape(3, 4).tolist()}) > 1  # reshuffled
  delta = jax.jit(vl.fl.fedavg_update, static_argnums=0, static_argnames="local")(
      apply_fn, params, clips, labels, local=local, key=key)
  expected = _explicit_sgd(apply_fn, params, clips, labels, order, 0.3, momentum)
  for d, e in zip(jax.tree.leaves(delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(d, e, rtol=2e-4, atol=1e-6)


def test_fedsgd_is_one_full_batch_step():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  delta = jax.jit(vl.fl.fedavg_update, static_argnums=0, static_argnames="local")(
      apply_fn, params, clips, labels, local=vl.fl.LocalTraining(epochs=1, batch_size=0, lr=0.5))
  grads = jax.jit(vl.fl.client_update, static_argnums=0)(apply_fn, params, clips, labels)
  for d, g in zip(jax.tree.leaves(delta), jax.tree.leaves(grads)):
    np.testing.assert_allclose(d, 0.5 * g, rtol=1e-4, atol=1e-7)


def test_local_settings_that_do_not_fit_the_clients_data_are_refused():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(4)
  with pytest.raises(ValueError, match="local batch_size=3 does not fit the client's 4 clip"):
    vl.fl.fedavg_update(apply_fn, params, clips, labels,
                        local=vl.fl.LocalTraining(batch_size=3))
  with pytest.raises(vl.settings.InvalidSetting, match="momentum"):
    vl.fl.LocalTraining(momentum=1.0)
  with pytest.raises(vl.settings.InvalidSetting, match="lr"):
    vl.fl.LocalTraining(lr=float("nan"))


def test_replay_objective_is_zero_at_the_truth_and_its_gradient_matches_finite_differences():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  local = vl.fl.LocalTraining(epochs=2, batch_size=1, lr=0.2)
  order = vl.fl.minibatch_order(jax.random.key(3), 2, local)
  target = vl.fl.fedavg_update(apply_fn, params, clips, labels, local=local, order=order)
  replay = vl.fl.replay(local, order=order)
  loss = lambda x: vl.attack.gradient_matching_loss(apply_fn, params, target, x, labels, "l2",
                                                    update_fn=replay, conv="xla")
  assert float(jax.jit(loss)(clips)) < 1e-12
  x = jax.random.uniform(jax.random.key(5), clips.shape, jnp.float32, 0.2, 0.8)
  grad = np.asarray(jax.jit(jax.grad(loss))(x))
  f64 = lambda v: float(loss(jnp.asarray(v, jnp.float32)))
  rng = np.random.default_rng(0)
  for _ in range(3):  # directional derivatives along random directions, central differences
    v = rng.standard_normal(clips.shape).astype(np.float32)
    v /= np.linalg.norm(v)
    eps = 1e-2
    numeric = (f64(np.asarray(x) + eps * v) - f64(np.asarray(x) - eps * v)) / (2 * eps)
    np.testing.assert_allclose(np.vdot(grad, v), numeric, rtol=2e-2, atol=1e-9)


def test_replay_is_differentiable_under_vmap_with_remat():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  local = vl.fl.LocalTraining(epochs=2, batch_size=1, lr=0.2, shuffle=False)
  target = vl.fl.fedavg_update(apply_fn, params, clips, labels, local=local)
  grads = {}
  for remat in (False, True):
    replay = vl.fl.replay(local, remat=remat)
    loss = lambda x: vl.attack.gradient_matching_loss(apply_fn, params, target, x, labels,
                                                      update_fn=replay)
    candidates = jax.random.uniform(jax.random.key(1), (3, *clips.shape))
    grads[remat] = np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(candidates))
  np.testing.assert_allclose(grads[True], grads[False], rtol=1e-4, atol=1e-7)


def test_aggregate_is_the_example_weighted_mean():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(6)
  sizes = [1, 2, 3]
  starts = np.cumsum([0, *sizes])
  client_update = jax.jit(vl.fl.client_update, static_argnums=0)
  updates = [client_update(apply_fn, params, clips[a:b], labels[a:b])
             for a, b in zip(starts[:-1], starts[1:])]
  mean = vl.fl.aggregate(updates, weights=sizes)
  for i, leaf in enumerate(jax.tree.leaves(mean)):
    expected = sum(n * np.asarray(jax.tree.leaves(u)[i], np.float64)
                   for n, u in zip(sizes, updates)) / sum(sizes)
    np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=1e-8)
  # FedSGD gradients of clients weighted by their sizes = the gradient of the pooled batch.
  pooled = client_update(apply_fn, params, clips, labels)
  for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(pooled)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="N >= 1"):
    vl.fl.aggregate([])
  with pytest.raises(ValueError, match="weights must be 3 positive numbers"):
    vl.fl.aggregate(updates, weights=[1, 0, 2])


def test_aggregated_replay_equals_the_servers_round():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(4)
  local = vl.fl.LocalTraining(epochs=2, batch_size=1, lr=0.2)
  keys = vl.fl.client_keys(jax.random.key(0), 0, 2)
  orders = jnp.stack([vl.fl.minibatch_order(k, 2, local) for k in keys])
  new, mean_delta = vl.fl.fedavg_round(apply_fn, params, clips.reshape(2, 2, *clips.shape[1:]),
                                       labels.reshape(2, 2), orders, local=local)
  replay = vl.fl.aggregated([vl.fl.replay(local, order=o) for o in orders])
  seen = replay(apply_fn, params, clips, labels)
  for a, b, p, n in zip(jax.tree.leaves(seen), jax.tree.leaves(mean_delta),
                        jax.tree.leaves(params), jax.tree.leaves(new)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(p - n, b, rtol=1e-4, atol=1e-6)


def _population(num_clients=2, n=4):
  clips, labels = tiny_batch(num_clients * n + 8, seed=3)
  return (clips[:-8].reshape(num_clients, n, *clips.shape[1:]),
          labels[:-8].reshape(num_clients, n), clips[-8:], labels[-8:])


def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path):
  apply_fn, params = tiny_victim("c3d")
  clips, labels, test_clips, test_labels = _population()
  local = vl.fl.LocalTraining(epochs=1, batch_size=2, lr=0.5)
  run = lambda rounds, directory: vl.fl.train_global(
      jax.random.key(0), apply_fn, params, clips, labels, test_clips, test_labels, rounds=rounds,
      local=local, directory=directory, identity={"model": "tiny c3d"})
  whole, whole_acc = run(3, None)
  run(1, str(tmp_path / "ckpt"))  # "killed" after one round
  resumed, resumed_acc = run(3, str(tmp_path / "ckpt"))
  np.testing.assert_array_equal(resumed_acc, whole_acc)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(whole),
                                                       jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="local batch_size=3 does not fit"):
    vl.fl.train_global(jax.random.key(0), apply_fn, params, clips, labels, test_clips,
                       test_labels, rounds=1, local=vl.fl.LocalTraining(batch_size=3))


@pytest.mark.slow
def test_the_fedavg_aware_attack_beats_the_fedsgd_approximation():
  """4×16×16 clips, B = 2 clips, 2 epochs of mini-batches of 1 (4 local steps), lr 0.1, labels
  known: replaying the local training beats matching one scaled gradient by >= 5 dB on average
  over 3 seeds (measured: 17.4 vs 7.9 dB at 300 steps)."""
  local = vl.fl.LocalTraining(epochs=2, batch_size=1, lr=0.1, shuffle=False)
  config = vl.attack.AttackConfig(optimizer="adam", metric="cosine", lr=0.1, steps=200,
                                  log_every=200)
  gaps = []
  for seed in range(3):
    apply_fn, params = tiny_victim("c3d", seed=seed)
    clips, labels = tiny_batch(2, seed)
    delta = vl.fl.fedavg_update(apply_fn, params, clips, labels, local=local)
    psnr = {}
    for approximation in ("order", "fedsgd"):
      rec = vl.attack.reconstruct(jax.random.key(seed), apply_fn, params, delta,
                                  clip_shape=clips.shape, labels=labels, config=config,
                                  update_fn=vl.fl.replay(local, approximation=approximation),
                                  mesh=None)
      psnr[approximation] = vl.metrics.evaluate(np.asarray(rec.clips), np.asarray(clips))[
          "psnr_mean"]
    gaps.append(psnr["order"] - psnr["fedsgd"])
  assert np.mean(gaps) >= 5.0, gaps


def test_labels_of_a_fedavg_round_are_found_per_slot_by_replay():
  """Targets made from the probe clips themselves: the search must return the true labels of
  every mini-batch (score 0; slots that always train together are interchangeable, which the
  attack absorbs by swapping their clips), also from a multiset estimate with wrong counts, and
  the coordinate descent (used beyond `max_enumerated` assignments) must reach it too."""
  apply_fn, params = tiny_victim("c3d")
  frames = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3))
  clips = jnp.repeat(frames[:, None], 4, axis=1)  # the references held still: the probes
  truth = jnp.asarray([3, 1, 1, 0], jnp.int32)
  local = vl.fl.LocalTraining(epochs=2, batch_size=2, lr=0.5)
  order = vl.fl.minibatch_order(jax.random.key(1), 4, local)
  target = vl.fl.fedavg_update(apply_fn, params, clips, truth, local=local, order=order)
  replay = vl.fl.replay(local, order=order)
  per_step = lambda labels: [sorted(np.asarray(labels)[row].tolist()) for row in np.asarray(order)]
  for max_enumerated in (4096, 1):
    found = vl.attack.labels.assign_labels_by_replay(
        jax.random.key(0), apply_fn, params, target, clips.shape, replay,
        jnp.asarray([0, 0, 1, 2], jnp.int32), references=frames, max_enumerated=max_enumerated)
    assert per_step(found) == per_step(truth)
  recovered = vl.attack.recover_labels(jax.random.key(0), apply_fn, params, target, clips.shape,
                                       references=frames, trajectory=(4, 0.5), update_fn=replay)
  assert per_step(recovered) == per_step(truth)
