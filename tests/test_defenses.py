"""Client-side defences (vl.fl.defenses) and DP-SGD with its accountant (vl.fl.privacy), against
numpy references and dp-accounting computed here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_batch, tiny_victim

import vidleak_jax as vl
from vidleak_jax.fl import defenses as D
from vidleak_jax.fl import privacy


def _update(seed: int = 0) -> dict:
  """A small update pytree (35 entries, distinct magnitudes almost surely)."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"conv": {"kernel": jax.random.normal(k1, (2, 3, 4)), "bias": jax.random.normal(k2, (3,))},
          "head": 3.0 * jax.random.normal(k3, (8,))}


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def _apply(defense, update, key=None):
  out, _ = defense.update(update, defense.init(update), key=key)
  return out


def test_registry_names_the_defenses_and_refuses_unknown_ones():
  assert set(D.DEFENSES.names()) == {"top_k", "prune", "random_mask", "fp16", "int8", "qsgd",
                                     "sign", "clip_and_noise"}
  with pytest.raises(KeyError, match="unknown defense 'dropout'; valid: clip_and_noise, fp16"):
    D.build("dropout")
  with pytest.raises(ValueError, match="takes no setting k; valid: p, per_tensor"):
    D.build("prune", k=3)
  u = _update()
  np.testing.assert_array_equal(_flat(_apply(D.build("prune", p=0.5), u)),
                                _flat(_apply(D.prune(0.5), u)))


@pytest.mark.parametrize("k,fraction", [(1, None), (7, None), (35, None), (None, 0.2),
                                        (None, 0.7)])
def test_top_k_keeps_exactly_the_k_largest_magnitudes(k, fraction):
  u = _update()
  flat = _flat(u)
  kept = k if k is not None else math.ceil(round(fraction * flat.size, 9))
  out = _flat(_apply(D.top_k(k=k, fraction=fraction), u))
  expected = np.zeros_like(flat)
  largest = np.argsort(-np.abs(flat), kind="stable")[:kept]
  expected[largest] = flat[largest]
  np.testing.assert_array_equal(out, expected)
  assert int(sum(jnp.sum(m) for m in jax.tree.leaves(D.support(_apply(
      D.top_k(k=k, fraction=fraction), u))))) == kept


def test_top_k_refuses_k_outside_1_to_the_update_size():
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError, match="^k must be an integer >= 1"):
      D.top_k(k=bad)
  with pytest.raises(ValueError, match=r"^k must be <= the update's 35 entries, got 36"):
    _apply(D.top_k(k=36), _update())
  for bad in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\]"):
      D.top_k(fraction=bad)
  with pytest.raises(ValueError, match="give exactly one"):
    D.top_k()
  with pytest.raises(ValueError, match="give exactly one"):
    D.top_k(k=3, fraction=0.5)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_prune_zeroes_exactly_the_smallest_fraction(p):
  u = _update()
  flat = _flat(u)
  out = _flat(_apply(D.prune(p), u))
  expected = flat.copy()
  expected[np.argsort(np.abs(flat), kind="stable")[:math.floor(p * flat.size)]] = 0
  np.testing.assert_array_equal(out, expected)
  # per tensor: the same rule within each leaf
  per_leaf = _apply(D.prune(p, per_tensor=True), u)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(per_leaf)):
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    want = x.copy()
    want[np.argsort(np.abs(x), kind="stable")[:math.floor(p * x.size)]] = 0
    np.testing.assert_array_equal(y, want)


def test_prune_refuses_sparsity_outside_0_to_1():
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"^p \(pruned fraction\) must be in \[0, 1\)"):
      D.prune(bad)


def test_random_mask_keeps_each_entry_with_probability_q():
  u = {"a": jnp.ones((200, 100)), "b": jnp.ones((5000,))}
  out = _apply(D.random_mask(0.3), u, key=jax.random.key(0))
  flat = _flat(out)
  assert set(np.unique(flat)) <= {0.0, 1.0}
  assert abs(flat.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / flat.size)
  again = _apply(D.random_mask(0.3), u, key=jax.random.key(0))
  np.testing.assert_array_equal(_flat(again), flat)
  with pytest.raises(ValueError, match="^key: the random_mask defence draws random numbers"):
    _apply(D.random_mask(0.3), u)
  for bad in (0.0, 1.1, -0.5):
    with pytest.raises(ValueError, match=r"^q \(keep probability\) must be in \(0, 1\]"):
      D.random_mask(bad)


def test_fp16_round_trip_is_within_half_an_ulp():
  u = jax.tree.map(lambda x: x * 10.0, _update())  # well inside float16's normal range
  out = _apply(D.fp16(), u)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(out)):
    assert y.dtype == x.dtype
    rel = np.abs(np.asarray(y) - np.asarray(x)) / np.abs(np.asarray(x))
    assert rel.max() <= 2.0 ** -11
    assert rel.max() > 0  # it does quantise


def test_int8_round_trip_is_within_half_a_step_per_tensor():
  u = {**_update(), "zeros": jnp.zeros((4,))}
  out = _apply(D.int8(), u)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(out)):
    x, y = np.asarray(x), np.asarray(y)
    scale = np.abs(x).max() / 127
    assert np.all(np.abs(y - x) <= scale / 2 + 1e-6 * max(scale, 1e-30))
    if scale:
      steps = y / scale
      np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
      assert np.abs(np.round(steps)).max() <= 127
    else:
      np.testing.assert_array_equal(y, 0)


def test_qsgd_is_unbiased_and_within_one_level():
  s, draws = 4, 4000
  u = _update()
  keys = jax.random.split(jax.random.key(1), draws)
  out = jax.jit(jax.vmap(lambda k: _apply(D.qsgd(s), u, key=k)))(keys)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(out)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    level = np.linalg.norm(x) / s
    assert np.all(np.abs(y - x) <= level * (1 + 1e-5))
    levels = y / level  # on the grid of ±l·||x||/s
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    # unbiased: each entry's draw is within one level, so its std <= level / 2
    assert np.all(np.abs(y.mean(0) - x) <= 5 * (level / 2) / math.sqrt(draws))
  for bad in (0, -2, 1.5):
    with pytest.raises(ValueError, match=r"^s \(levels\) must be an integer >= 1"):
      D.qsgd(bad)


def test_sign_sends_the_sign_times_the_mean_magnitude_per_tensor():
  u = _update()
  out = _apply(D.sign(), u)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(out)):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(y, np.sign(x) * np.abs(x).mean(), rtol=1e-6)


def test_clip_and_noise_clips_the_global_norm():
  u = _update()
  norm = float(D.global_norm(u))
  clipped = _apply(D.clip_and_noise(norm / 4, 0.0), u, key=jax.random.key(0))
  assert float(D.global_norm(clipped)) == pytest.approx(norm / 4, rel=1e-5)
  np.testing.assert_allclose(_flat(clipped), _flat(u) / 4, rtol=1e-5)
  kept = _apply(D.clip_and_noise(2 * norm, 0.0), u, key=jax.random.key(0))
  np.testing.assert_allclose(_flat(kept), _flat(u), rtol=1e-6)


def test_clip_and_noise_adds_gaussian_noise_of_std_sigma_c():
  clip_norm, sigma = 0.5, 1.3
  zero = {"a": jnp.zeros((300, 300)), "b": jnp.zeros((1000,))}
  noise = _flat(_apply(D.clip_and_noise(clip_norm, sigma), zero, key=jax.random.key(7)))
  assert noise.std() == pytest.approx(sigma * clip_norm, rel=0.02)
  assert abs(noise.mean()) < 5 * sigma * clip_norm / math.sqrt(noise.size)
  with pytest.raises(ValueError, match="^noise_multiplier must be >= 0, got -1"):
    D.clip_and_noise(1.0, -1.0)
  with pytest.raises(ValueError, match="^clip_norm must be > 0, got 0"):
    D.clip_and_noise(0.0, 1.0)


def test_defences_chain_in_the_stated_order():
  u = _update()
  key = jax.random.key(3)
  topk, q8, mask, noise = D.top_k(k=5), D.int8(), D.random_mask(0.5), D.clip_and_noise(1.0, 0.1)
  # int8 first rounds 0.5 and 0.503 to the same level: top-k then keeps the lower index
  x = {"w": jnp.array([1.0, 0.5, 0.503, 0.1])}
  np.testing.assert_allclose(D.defend(None, x, [D.top_k(k=2), q8])["w"], [1, 0, 64 / 127, 0])
  np.testing.assert_allclose(D.defend(None, x, [q8, D.top_k(k=2)])["w"], [1, 64 / 127, 0, 0])
  for first, second in ((topk, q8), (q8, topk), (topk, D.sign()), (D.sign(), topk)):
    chained = D.defend(None, u, [first, second])
    np.testing.assert_array_equal(_flat(chained), _flat(_apply(second, _apply(first, u))))
    with_optax = optax.chain(first, second)  # optax.chain: the same order
    np.testing.assert_array_equal(_flat(with_optax.update(u, with_optax.init(u))[0]),
                                  _flat(chained))
  assert not np.array_equal(_flat(D.defend(None, u, [topk, D.sign()])),
                            _flat(D.defend(None, u, [D.sign(), topk])))
  # random links draw from fold_in(key, position)
  got = D.defend(key, u, [mask, topk, noise])
  by_hand = _apply(noise, _apply(topk, _apply(mask, u, key=jax.random.fold_in(key, 0))),
                   key=jax.random.fold_in(key, 2))
  np.testing.assert_array_equal(_flat(got), _flat(by_hand))
  jitted = jax.jit(lambda k, x: D.defend(k, x, [mask, topk, noise]))(key, u)
  np.testing.assert_allclose(_flat(jitted), _flat(got), rtol=1e-6, atol=1e-7)
  # plain optax transforms are links too
  np.testing.assert_allclose(
      _flat(D.defend(None, u, [optax.scale(2.0), q8])), _flat(_apply(q8, jax.tree.map(
          lambda x: 2.0 * x, u))), rtol=1e-6)


SETTINGS = {"top_k": dict(fraction=0.3), "prune": dict(p=0.4), "random_mask": dict(q=0.5),
            "fp16": {}, "int8": {}, "qsgd": dict(s=3), "sign": {},
            "clip_and_noise": dict(clip_norm=1.0, noise_multiplier=0.5)}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_defence_runs_under_jit_as_it_does_eagerly(name):
  assert set(SETTINGS) == set(D.DEFENSES.names())
  u, key = _update(), jax.random.key(5)
  defense = D.build(name, **SETTINGS[name])
  eager = _apply(defense, u, key=key)
  jitted = jax.jit(lambda k, x: _apply(defense, x, key=k))(key, u)
  assert jax.tree.structure(jitted) == jax.tree.structure(u)
  np.testing.assert_allclose(_flat(jitted), _flat(eager), rtol=1e-6, atol=1e-6)


def test_support_marks_the_nonzero_entries():
  u = {"a": jnp.array([0.0, 1.0, -2.0]), "b": jnp.array([[0.0], [3.0]])}
  mask = D.support(u)
  np.testing.assert_array_equal(mask["a"], [False, True, True])
  np.testing.assert_array_equal(mask["b"], [[False], [True]])
  assert mask["a"].dtype == jnp.bool_


SIGMA, BATCH = 2.0, 2


@pytest.fixture(scope="module")
def dp_outputs():
  """The tiny c3d victim's per-example grads (raw, clipped at their median norm C), FedSGD update,
  and DP-SGD updates (C = 1e6 and σ = 0; C and σ = SIGMA), all in one jitted call."""
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(BATCH)

  @jax.jit
  def run(clips, labels):
    raw = privacy.per_example_grads(apply_fn, params, clips, labels)
    clip_norm = jnp.median(jax.vmap(D.global_norm)(raw))
    return dict(
        raw=raw, clip_norm=clip_norm,
        clipped=privacy.clip_per_example(raw, clip_norm),
        fedsgd=vl.fl.client_update(apply_fn, params, clips, labels),
        plain=vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.key(0),
                                     clip_norm=1e6, noise_multiplier=0.0),
        noised=vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.key(1),
                                      clip_norm=clip_norm, noise_multiplier=SIGMA))

  return jax.block_until_ready(run(clips, labels))


def test_dp_clipping_bounds_every_examples_gradient_norm(dp_outputs):
  out = dp_outputs
  clip_norm = float(out["clip_norm"])  # the median: clips one example, leaves the other
  raw_norms = np.asarray(jax.vmap(D.global_norm)(out["raw"]))
  norms = np.asarray(jax.vmap(D.global_norm)(out["clipped"]))
  assert np.all(norms <= clip_norm + 1e-5)
  np.testing.assert_allclose(norms, np.minimum(raw_norms, clip_norm), rtol=1e-5)
  # no clipping and no noise: the plain FedSGD gradient (the mean of the per-example ones)
  np.testing.assert_allclose(_flat(out["plain"]), _flat(out["fedsgd"]), rtol=1e-4, atol=1e-7)
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(BATCH)
  with pytest.raises(ValueError, match="^clip_norm must be > 0"):
    privacy.clipped_per_example_grads(apply_fn, params, clips, labels, clip_norm=-1.0)


def test_dp_noise_on_the_mean_gradient_has_std_sigma_c_over_b(dp_outputs):
  out = dp_outputs
  mean_clipped = jax.tree.map(lambda g: g.mean(0), out["clipped"])
  noise = (_flat(out["noised"]) - _flat(mean_clipped)) * BATCH  # 10324 draws of N(0, (σC)²)
  assert noise.std() == pytest.approx(SIGMA * float(out["clip_norm"]), rel=0.05)
  assert abs(noise.mean()) < 5 * SIGMA * float(out["clip_norm"]) / math.sqrt(noise.size)
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(BATCH)
  with pytest.raises(ValueError, match="^noise_multiplier must be >= 0"):
    vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.key(0),
                           clip_norm=1.0, noise_multiplier=-0.1)
  with pytest.raises(ValueError, match="^clip_norm must be > 0"):
    vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.key(0),
                           clip_norm=0.0, noise_multiplier=1.0)


def test_epsilon_is_dp_accountings_rdp_epsilon_and_monotone():
  import dp_accounting  # pylint: disable=import-outside-toplevel
  q, sigma, steps, delta = 0.01, 1.1, 1000, 1e-5
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  assert vl.fl.epsilon(sigma, q, steps, delta) == pytest.approx(accountant.get_epsilon(delta),
                                                                rel=1e-12)
  eps = [vl.fl.epsilon(sigma, q, n, delta) for n in (10, 100, 1000)]
  assert eps[0] < eps[1] < eps[2]
  eps = [vl.fl.epsilon(s, q, steps, delta) for s in (0.7, 1.1, 2.0)]
  assert eps[0] > eps[1] > eps[2]
  assert vl.fl.epsilon(0.0, q, steps, delta) == math.inf
  for bad in (0.0, 1.0, -1e-5, 2.0):
    with pytest.raises(ValueError, match=r"^delta must be in \(0, 1\)"):
      vl.fl.epsilon(sigma, q, steps, bad)
  with pytest.raises(ValueError, match="^noise_multiplier must be >= 0"):
    vl.fl.epsilon(-1.0, q, steps, delta)
  with pytest.raises(ValueError, match=r"^sampling_rate must be in \[0, 1\]"):
    vl.fl.epsilon(sigma, 1.5, steps, delta)
  with pytest.raises(ValueError, match="^steps must be an integer >= 1"):
    vl.fl.epsilon(sigma, q, 0, delta)
