"""DP-SGD inside a FedAvg client's local training (`fl.dp_fedavg_update`) against an explicit loop,
and the attacked round's DP FedAvg clients and the attacker's noise-free replay of them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax import pipeline
from vidleak_jax.pipeline import clients

C, SIGMA, LR = 0.05, 0.7, 0.1


def _explicit_dp_training(apply_fn, params, clips, labels, order, key):
  """params − params after plain-Python DP-SGD steps: each example's gradient on its own, its
  norm clipped in numpy, summed, noised with std σC from fold_in(key, step), divided by b."""
  p = params
  for step, rows in enumerate(np.asarray(order)):
    total = None
    for i in rows:
      g = jax.grad(lambda q: vl.fl.cross_entropy(apply_fn(q, clips[i][None]), labels[i][None]))(p)
      norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                         for x in jax.tree.leaves(g)))
      g = jax.tree.map(lambda x: np.asarray(x) * min(1.0, C / norm), g)
      total = g if total is None else jax.tree.map(np.add, total, g)
    noise = vl.fl.defenses.gaussian_like(jax.random.fold_in(key, step), total)
    grad = jax.tree.map(lambda t, z: (t + SIGMA * C * np.asarray(z)) / len(rows), total, noise)
    p = jax.tree.map(lambda q, d: q - LR * d, p, grad)
  return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, p)


def test_dp_fedavg_update_equals_an_explicit_loop_of_clipped_noised_steps():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(4)
  local = vl.fl.LocalTraining(epochs=2, batch_size=2, lr=LR)
  order = vl.fl.minibatch_order(jax.random.key(3), 4, local)  # 4 steps of 2 clips
  key = jax.random.key(5)
  got = vl.fl.dp_fedavg_update(apply_fn, params, clips, labels, local=local, order=order,
                               key=key, clip_norm=C, noise_multiplier=SIGMA)
  want = _explicit_dp_training(apply_fn, params, clips, labels, order, key)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
  # Every step clipped below C: the noise-free delta's norm is at most steps × lr × C.
  clean = vl.fl.dp_fedavg_update(apply_fn, params, clips, labels, local=local, order=order,
                                 key=None, clip_norm=C, noise_multiplier=SIGMA)
  assert float(vl.fl.defenses.global_norm(clean)) <= 4 * LR * C * (1 + 1e-5)


def test_one_full_batch_step_is_lr_times_dp_sgd_s_fedsgd_update():
  apply_fn, params = tiny_victim("frame_cnn")
  clips, labels = tiny_batch(3)
  key = jax.random.key(2)
  got = vl.fl.dp_fedavg_update(apply_fn, params, clips, labels, local=vl.fl.LocalTraining(lr=LR),
                               order=jnp.arange(3)[None], key=key, clip_norm=C,
                               noise_multiplier=SIGMA)
  want = vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.fold_in(key, 0),
                                clip_norm=C, noise_multiplier=SIGMA)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, LR * np.asarray(b), rtol=1e-3, atol=1e-7)  # sum vs contraction


def test_the_attacked_dp_fedavg_round_and_its_noise_free_replay():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(4)
  local = vl.fl.LocalTraining(epochs=2, batch_size=2, lr=LR)
  cfg = pipeline.RunConfig(workdir="w", clip_shape=(4, 16, 16, 3), batch_size=4, update="fedavg",
                           local=local, defenses=(f"dp_sgd:clip_norm={C}:noise_multiplier=0",))
  shared = clients.client_side(cfg, apply_fn, params, clips, labels)
  order = clients.client_orders(cfg)[0]
  want = vl.fl.dp_fedavg_update(apply_fn, params, clips, labels, local=local, order=order,
                                key=None, clip_norm=C, noise_multiplier=0.0)
  replayed = clients.attacker_update_fn(cfg)(apply_fn, params, clips, labels)
  for s, w, r in zip(*(jax.tree.leaves(t) for t in (shared, want, replayed))):
    np.testing.assert_allclose(s, w, rtol=1e-5, atol=1e-9)  # σ = 0: the clipped training
    np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-9)  # what the attacker replays
  # With noise, the shared delta is the clipped training plus the client's noise.
  noisy_cfg = dataclasses.replace(cfg, defenses=(f"dp_sgd:clip_norm={C}:noise_multiplier=1",))
  noisy = clients.client_side(noisy_cfg, apply_fn, params, clips, labels)
  diff = vl.fl.defenses.global_norm(jax.tree.map(jnp.subtract, noisy, shared))
  assert float(diff) > 2 * float(vl.fl.defenses.global_norm(shared))
