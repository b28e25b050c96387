"""Client defences in a run (`--defenses`): the shared update they produce, the attack's
support-restricted objective and defence-aware replay, and the refusal of bad specs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags

import vidleak_jax as vl
from experiments import config_flags
from tests.conftest import ROOT, run_main, tiny_batch, tiny_victim
from vidleak_jax import io as vio
from vidleak_jax import pipeline
from vidleak_jax.pipeline import clients
from vidleak_jax.tree_io import flatten_tree


def _config(*args: str) -> pipeline.RunConfig:
  values = flags.FlagValues()
  config_flags.define_flags(values)
  values(["prog", "--workdir=w", *args])
  return config_flags.config_from_flags(values)


def _target_and_guess(metric_seed: int = 7):
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  guess = jax.random.uniform(jax.random.key(metric_seed), clips.shape)
  return apply_fn, params, target, guess, labels


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_masked_objective_ignores_target_entries_outside_the_mask_only(metric):
  apply_fn, params, target, guess, labels = _target_and_guess()
  sparse = vl.fl.defend(None, target, [vl.fl.defenses.top_k(fraction=0.2)])
  mask = vl.fl.support(sparse)
  loss = lambda t: float(vl.attack.gradient_matching_loss(apply_fn, params, t, guess, labels,
                                                          metric, mask=mask))
  base = loss(sparse)
  # Outside the support: anything (here the dense update, or noise) leaves the objective as is.
  noise = vl.fl.defenses.gaussian_like(jax.random.key(3), target)
  outside = jax.tree.map(lambda t, m, z: jnp.where(m, t, z), sparse, mask, noise)
  assert loss(target) == base and loss(outside) == base
  # Inside: changing kept entries changes it.
  inside = jax.tree.map(lambda t, m: jnp.where(m, 2 * t + 0.1, t), sparse, mask)
  assert abs(loss(inside) - base) > 1e-4 * max(abs(base), 1e-6)
  # The golden formula: the metric on the kept entries only.
  grads = vl.fl.client_update(apply_fn, params, guess, labels)
  g = np.concatenate([np.asarray(x, np.float64)[np.asarray(m)] for x, m in
                      zip(jax.tree.leaves(grads), jax.tree.leaves(mask))])
  t = np.concatenate([np.asarray(x, np.float64)[np.asarray(m)] for x, m in
                      zip(jax.tree.leaves(sparse), jax.tree.leaves(mask))])
  expected = {"cosine": 1 - g @ t / np.sqrt((g @ g) * (t @ t)), "l2": np.sum((g - t) ** 2),
              "l1": np.sum(np.abs(g - t))}[metric]
  np.testing.assert_allclose(base, expected, rtol=1e-3)


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_no_mask_or_a_full_mask_gives_exactly_the_unmasked_objective(metric):
  apply_fn, params, target, guess, labels = _target_and_guess()
  loss = lambda **kw: float(vl.attack.gradient_matching_loss(apply_fn, params, target, guess,
                                                             labels, metric, **kw))
  plain = loss()
  assert loss(mask=None) == plain
  assert loss(mask=jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)) == plain
  with pytest.raises(ValueError, match="mask"):
    loss(mask={"head": {"bias": jnp.ones(4, bool)}})


def test_a_defended_run_shares_the_defence_applied_to_its_undefended_update(tmp_path):
  """The entry point with --defenses writes shared_update.npz = the defences, applied by hand
  with the key fold_in(fold_in(key(seed), 3), client), to the undefended update."""
  specs = ("clip_and_noise:clip_norm=0.5:noise_multiplier=0.01", "top_k:fraction=0.1")
  workdir = tmp_path / "run"
  proc = run_main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}", "--quiet",
                  "--stages=data,attack", f"--defenses={','.join(specs)}", "--seed=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg = _config(f"--flagfile={ROOT}/experiments/flags/tiny.flags", "--seed=3",
                f"--workdir={workdir}")
  assert cfg.defenses == ()
  apply_fn, params = pipeline.build_victim(cfg)
  clips, labels = clients.client_batch(cfg)
  undefended = clients.client_side(cfg, apply_fn, params, clips, labels)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 3), 0)
  assert (jax.random.key_data(key) == jax.random.key_data(
      clients.defense_key(dataclasses.replace(cfg, defenses=specs), 0))).all()
  by_hand = flatten_tree(vl.fl.defend(key, undefended,
                                      [vl.fl.defenses.from_spec(s) for s in specs]))
  shared = vio.load_npz(str(workdir / "shared_update.npz"))
  assert set(shared) == set(by_hand)
  for name, value in by_hand.items():
    np.testing.assert_array_equal(shared[name], np.asarray(value), err_msg=name)
  size = sum(v.size for v in shared.values())
  assert sum(np.count_nonzero(v) for v in shared.values()) == int(np.ceil(0.1 * size))
  rec = vio.load_npz(str(workdir / "reconstruction.npz"))
  assert np.isfinite(rec["loss"]) and rec["clips"].shape == (1, 4, 8, 8, 3)


def test_each_client_of_an_aggregated_round_is_defended_with_its_own_key():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  cfg = pipeline.RunConfig(workdir="w", clients=2, clip_shape=(4, 16, 16, 3),
                           defenses=("random_mask:q=0.5",))
  shared = clients.client_side(cfg, apply_fn, params, clips, labels)
  per_client = [vl.fl.defend(clients.defense_key(cfg, i), vl.fl.client_update(
      apply_fn, params, clips[i:i + 1], labels[i:i + 1]), [vl.fl.defenses.random_mask(0.5)])
      for i in range(2)]
  expected = vl.fl.aggregate(per_client)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)  # jit(vmap) vs eager: rounding
  assert clients.match_support(cfg, shared) is not None
  assert clients.match_support(dataclasses.replace(cfg, defenses=("int8",)), shared) is None


def test_attacker_replays_the_clip_and_dp_sgd_without_their_noise():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(2)
  grads = vl.fl.client_update(apply_fn, params, clips, labels)
  norm = float(vl.fl.defenses.global_norm(grads))
  base = dict(workdir="w", batch_size=2, clip_shape=(4, 16, 16, 3))
  clip = pipeline.RunConfig(**base, defenses=(f"clip_and_noise:clip_norm={norm / 4}:"
                                              "noise_multiplier=0.3",))
  replay = lambda cfg: clients.attacker_update_fn(cfg)(apply_fn, params, clips, labels)
  replayed = replay(clip)
  for a, b in zip(jax.tree.leaves(replayed), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b / 4, rtol=1e-5, atol=1e-10)
  dp = pipeline.RunConfig(**base, defenses=("dp_sgd:clip_norm=0.01:noise_multiplier=2",))
  replayed = replay(dp)
  noiseless = vl.fl.dp_client_update(apply_fn, params, clips, labels, key=jax.random.key(0),
                                     clip_norm=0.01, noise_multiplier=0.0)
  for a, b in zip(jax.tree.leaves(replayed), jax.tree.leaves(noiseless)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)
  # No defence: the attacker's model is the plain client update, unchanged.
  assert clients.attacker_update_fn(pipeline.RunConfig(**base)) is vl.fl.client_update


def test_the_defenses_flag_is_parsed_in_order_and_off_by_default():
  assert _config().defenses == () == pipeline.RunConfig(workdir="w").defenses
  cfg = _config("--defenses=top_k:fraction=0.1,int8,clip_and_noise:clip_norm=1:"
                "noise_multiplier=0.01")
  assert pipeline.config.parse_defenses(cfg.defenses) == (
      ("top_k", {"fraction": 0.1}), ("int8", {}),
      ("clip_and_noise", {"clip_norm": 1, "noise_multiplier": 0.01}))


@pytest.mark.parametrize("spec, message", [
    ("dropout", "--defenses: unknown defense 'dropout' in 'dropout'; valid: clip_and_noise, "
                "dp_sgd, fp16"),
    ("clip_and_noise:clip_norm=1:noise_multiplier=-0.5", "noise_multiplier must be >= 0"),
    ("dp_sgd:clip_norm=1:noise_multiplier=-1", "noise_multiplier must be >= 0"),
    ("top_k:k=0", "k must be an integer >= 1"),
    ("top_k:fraction=1.5", "fraction must be in (0, 1]"),
    ("prune:p=1", "p (pruned fraction) must be in [0, 1)"),
    ("random_mask:q=0", "q (keep probability) must be in (0, 1]"),
    ("prune:fraction=0.3", "takes no setting fraction"),
    ("top_k:fraction", "is not one key=value"),
    ("int8,dp_sgd:clip_norm=1:noise_multiplier=1", "must come first"),
])
def test_bad_defense_specs_name_the_flag(spec, message):
  with pytest.raises(app.UsageError) as error:
    _config(f"--defenses={spec}")
  assert str(error.value).startswith("--defenses") and message in str(error.value)


def test_the_entry_point_refuses_a_bad_defense_before_writing(tmp_path):
  workdir = tmp_path / "run"
  proc = run_main("--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}",
                  "--defenses=int8,clip_and_noise:clip_norm=1:noise_multiplier=-1")
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and errors[0].startswith("error: --defenses"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not workdir.exists()


def test_reconstruct_matches_on_the_mask_it_is_given():
  apply_fn, params = tiny_victim("c3d")
  clips, labels = tiny_batch(1)
  shared = vl.fl.defend(None, vl.fl.client_update(apply_fn, params, clips, labels),
                        [vl.fl.defenses.prune(0.5)])
  mask = vl.fl.support(shared)
  config = vl.attack.AttackConfig(steps=1, log_every=1, optimizer="adam", metric="l2",
                                  priors={}, init="gray")
  run = lambda mask: vl.attack.reconstruct(jax.random.key(0), apply_fn, params, shared,
                                           clip_shape=clips.shape, labels=labels,
                                           config=config, mask=mask, mesh=None)
  with pytest.raises(ValueError, match=r"mask\["):
    run(jax.tree.map(lambda m: m[..., None], mask))
  rec = run(mask)
  loss = lambda mask: float(vl.attack.gradient_matching_loss(
      apply_fn, params, shared, rec.init_clips, labels, "l2", mask=mask))
  np.testing.assert_allclose(rec.history["grad_match"][0, 0], loss(mask), rtol=1e-4)
  assert loss(mask) < 0.99 * loss(None)
