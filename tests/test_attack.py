"""The attack engine: restarts, batching strategies, label recovery, recovery quality, compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from tests.conftest import tiny_batch, tiny_victim
from vidleak_jax import pipeline, report
from vidleak_jax.attack import driver
from vidleak_jax.attack.labels import counts_from_bias_grad
from vidleak_jax.data import sources


def _target(name="frame_cnn", batch_size=1):
  apply_fn, params = tiny_victim(name)
  clips, labels = tiny_batch(batch_size)
  return apply_fn, params, vl.fl.client_update(apply_fn, params, clips, labels), clips, labels


def _run(attack, state, steps):
  run = jax.jit(attack.run)
  for _ in range(steps // 2):
    state, _ = run(state, jnp.int32(2))
  return state


@pytest.mark.parametrize("batching, map_batch_size", [("vmap", 2), ("map", 1), ("map", 2)])
def test_batched_restarts_equal_independent_runs(batching, map_batch_size):
  apply_fn, params, target, clips, labels = _target()  # R = 3: map/2 has a partial last group
  config = vl.attack.AttackConfig(restarts=3, steps=6, log_every=2, batching=batching,
                                  map_batch_size=map_batch_size)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  state = _run(attack, attack.init(jax.random.key(0)), 6)

  single_config = vl.attack.AttackConfig(restarts=1, steps=6, log_every=2)
  single = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, single_config)
  start = attack.init(jax.random.key(0))
  for r in range(3):
    state_r = jax.tree.map(lambda x: x[r:r + 1] if x.ndim else x, start)
    state_r = _run(single, state_r, 6)
    np.testing.assert_allclose(state.candidates[r], state_r.candidates[0], atol=1e-5)
    np.testing.assert_allclose(state.best_loss[r], state_r.best_loss[0], rtol=1e-4)


def test_lbfgs_runs_per_restart():
  apply_fn, params, target, clips, labels = _target()
  config = vl.attack.AttackConfig(restarts=2, steps=4, log_every=2, optimizer="lbfgs",
                                  metric="l2", schedule="constant", priors={})
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  state = attack.init(jax.random.key(0))
  first = float(jnp.min(attack.objective(state.candidates[0])[0]))
  state = _run(attack, state, 4)
  assert np.all(np.isfinite(state.best_loss))
  assert float(jnp.min(state.best_loss)) < first


def test_idlg_recovers_the_label_on_every_victim(victim_name):
  apply_fn, params = tiny_victim(victim_name)
  for label in range(4):
    clips, _ = tiny_batch(1, seed=label)
    target = vl.fl.client_update(apply_fn, params, clips, jnp.asarray([label]))
    got = vl.attack.recover_labels(jax.random.key(0), apply_fn, params, target, clips.shape)
    assert got.tolist() == [label]


def test_batch_label_counts_are_recovered():
  apply_fn, params = tiny_victim("frame_cnn")
  clips, _ = tiny_batch(6, seed=3)
  labels = jnp.asarray([0, 0, 1, 3, 3, 3], jnp.int32)
  target = vl.fl.client_update(apply_fn, params, clips, labels)
  got = vl.attack.recover_labels(jax.random.key(0), apply_fn, params, target, clips.shape)
  assert got.tolist() == [0, 0, 1, 3, 3, 3]


def test_reference_frames_recover_batch_labels_through_a_frozen_extractor(tmp_path):
  """Noise probes mispredict the batch's mean softmax through ImageNet features; the camera's
  frames do not (experiments/label_probes.py measures more seeds)."""
  right = {"noise": [], "references": []}
  for seed in range(4):
    cfg = pipeline.RunConfig(
        workdir=str(tmp_path / str(seed)), stages=("data",), seed=seed, pipeline="features",
        clip_shape=(4, 32, 32, 3), batch_size=4, num_classes=8, references=8,
        features=pipeline.FeatureConfig(extractor="alexnet", head="mlp2"))
    pipeline.frames.stage_data(cfg)
    batch = report.load_npz(str(tmp_path / str(seed) / "data.npz"))
    refs = report.load_npz(str(tmp_path / str(seed) / "references.npz"))["frames"]
    apply_fn, params = pipeline.build_victim(cfg)
    clips, labels = jnp.asarray(batch["clips"]), jnp.asarray(batch["labels"])
    target = pipeline.clients.client_side(cfg, apply_fn, params, clips, labels)
    for name, given in (("noise", None), ("references", refs)):
      got = vl.attack.recover_labels(jax.random.key(seed), apply_fn, params, target, clips.shape,
                                     references=given)
      right[name].append(got.tolist() == sorted(labels.tolist()))
  assert all(right["references"]) and not all(right["noise"]), right
  with pytest.raises(ValueError, match=r"references must be \[k, 32, 32, 3\]"):
    vl.attack.recover_labels(jax.random.key(0), apply_fn, params, target, clips.shape,
                             references=refs[:, :16])


def _pure_function_model(num_classes=5, hidden=16, output_bias=True, frame=(2, 8, 8, 3)):
  """A plain `jax.numpy` classifier whose leaves carry no layer names: w1, b1, wd, bd."""
  keys = jax.random.split(jax.random.key(7), 2)
  params = {"w1": jax.random.normal(keys[0], (int(np.prod(frame)), hidden)) * 0.05,
            "b1": jnp.zeros((hidden,)),
            "wd": jax.random.normal(keys[1], (hidden, num_classes)) * 0.3}
  if output_bias:
    params["bd"] = jnp.zeros((num_classes,))

  def apply_fn(params, clips):
    hidden_units = jnp.tanh(clips.reshape(clips.shape[0], -1) @ params["w1"] + params["b1"])
    logits = hidden_units @ params["wd"]
    return logits + params["bd"] if "bd" in params else logits

  return apply_fn, params


@pytest.mark.parametrize("labels", [[3], [0, 2, 2, 4]])
def test_reconstruct_recovers_labels_of_a_model_with_arbitrary_leaf_names(labels):
  apply_fn, params = _pure_function_model()
  clips = jax.random.uniform(jax.random.key(1), (len(labels), 2, 8, 8, 3))
  target = vl.fl.client_update(apply_fn, params, clips, jnp.asarray(labels))
  assert vl.attack.labels.output_bias_path(apply_fn, params, clips.shape) == "bd"
  config = vl.attack.AttackConfig(restarts=1, steps=2, log_every=2)
  rec = vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                              clip_shape=clips.shape, config=config)
  assert rec.labels.tolist() == labels


def test_label_recovery_without_an_output_bias_names_the_argument():
  apply_fn, params = _pure_function_model(num_classes=4, hidden=4, output_bias=False)
  clips = jax.random.uniform(jax.random.key(1), (1, 2, 8, 8, 3))
  target = vl.fl.client_update(apply_fn, params, clips, jnp.asarray([1]))
  # b1 has the logits' shape (4,) but moves them through tanh and wd: not an output bias.
  with pytest.raises(ValueError, match=r"no parameter of shape \(4,\) moves the logits.*"
                                       r"\['b1'\].*layer=<path>"):
    vl.attack.recover_labels(jax.random.key(0), apply_fn, params, target, clips.shape)


def test_label_recovery_asks_for_layer_when_several_leaves_act_as_the_output_bias():
  apply_fn, params = _pure_function_model()
  params = {**params, "shift": jnp.zeros((5,))}
  two_biases = lambda p, x: apply_fn(p, x) + p["shift"]
  clips = jax.random.uniform(jax.random.key(1), (1, 2, 8, 8, 3))
  target = vl.fl.client_update(two_biases, params, clips, jnp.asarray([2]))
  with pytest.raises(ValueError, match=r"several .*\['bd', 'shift'\]; pass layer="):
    vl.attack.recover_labels(jax.random.key(0), two_biases, params, target, clips.shape)
  got = vl.attack.recover_labels(jax.random.key(0), two_biases, params, target, clips.shape,
                                 layer="shift")
  assert got.tolist() == [2]
  with pytest.raises(ValueError, match=r"layer='wd' must name .* shape \(5,\)"):
    vl.attack.recover_labels(jax.random.key(0), two_biases, params, target, clips.shape,
                             layer="wd")


def test_counts_from_bias_grad_formula():
  mean_probs = np.array([0.25, 0.25, 0.25, 0.25])
  counts = np.array([2, 0, 1, 1])
  bias_grad = mean_probs - counts / 4
  np.testing.assert_array_equal(counts_from_bias_grad(bias_grad, 4, mean_probs), counts)


def test_tiny_attack_recovers_the_clip():
  apply_fn, params, target, clips, labels = _target("c3d")
  config = vl.attack.AttackConfig(steps=300, optimizer="lbfgs", metric="l2",
                                  schedule="constant", priors={}, log_every=50)
  rec = vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                              clip_shape=clips.shape, config=config)
  init = jax.random.uniform(jax.random.split(jax.random.key(0))[1], clips.shape)
  psnr, psnr_init = float(vl.metrics.psnr(rec.clips, clips)[0]), float(
      vl.metrics.psnr(init, clips)[0])
  assert rec.labels.tolist() == labels.tolist()
  assert psnr > 20.0 and psnr > psnr_init + 10.0, (psnr, psnr_init)
  assert rec.history["loss"].shape == (300, 1)


def test_attack_step_compiles_once():
  apply_fn, params, target, clips, labels = _target()
  config = vl.attack.AttackConfig(restarts=2, steps=9, log_every=4)
  attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
  run = jax.jit(attack.run)
  state = attack.init(jax.random.key(0))
  for remaining in (9, 5, 1):  # the last dispatch is partial: same executable, masked steps
    state, metrics = run(state, jnp.int32(remaining))
  assert run._cache_size() == 1
  assert int(state.step) == 9
  assert np.isnan(metrics["loss"][1:]).all() and np.isfinite(metrics["loss"][0]).all()


def test_reconstruct_compiles_a_fixed_number_of_times(monkeypatch):
  apply_fn, params, target, clips, labels = _target()
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: events.append(name) if "backend_compile" in name else None)

  def compiles(steps):
    events.clear()
    config = vl.attack.AttackConfig(steps=steps, log_every=2)
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target, clip_shape=clips.shape,
                          labels=labels, config=config)
    return len(events)

  compiles(2)  # warm caches of helper ops shared by every run
  assert compiles(4) == compiles(16)


def test_runs_with_other_weights_and_data_compile_to_one_program():
  # The driver hoists the closed-over weights, target update and labels into arguments: two
  # victims of other seeds on other clips lower to the same program (so one executable and one
  # persistent-cache entry serve both), which computes what the closure computes.
  texts = []
  for seed in (0, 1):
    apply_fn, params = tiny_victim("c3d", seed=seed + 1)
    clips, labels = tiny_batch(1, seed=seed)
    target = vl.fl.client_update(apply_fn, params, clips, labels)
    config = vl.attack.AttackConfig(restarts=2, steps=4, log_every=2)
    attack = vl.attack.make_attack(apply_fn, params, target, labels, clips.shape, config)
    state, n = attack.init(jax.random.key(seed)), jnp.int32(2)
    call, consts = driver.hoist_constants(attack.run, state, n)
    assert sum(np.size(c) for c in consts) >= 2 * sum(x.size for x in jax.tree.leaves(params))
    texts.append(jax.jit(call).lower(consts, state, n).as_text())
    hoisted, closure = jax.jit(call)(consts, state, n), jax.jit(attack.run)(state, n)
    for a, b in zip(jax.tree.leaves(hoisted), jax.tree.leaves(closure)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  assert texts[0] == texts[1]


def test_bad_inputs_are_rejected_with_clear_errors():
  apply_fn, params, target, clips, labels = _target()
  nan_target = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), target)
  with pytest.raises(ValueError, match="NaN"):
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, nan_target,
                          clip_shape=clips.shape, labels=labels)
  bad = dict(target, head={"bias": target["head"]["bias"], "kernel": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="head/kernel"):
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, bad, clip_shape=clips.shape)
  with pytest.raises(ValueError, match="T=4"):
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                          clip_shape=(1, 5, 16, 16, 3))
  with pytest.raises(ValueError, match="clip_shape"):
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target, clip_shape=(1, 4, 16))
  with pytest.raises(KeyError, match="signed_adam"):
    vl.attack.AttackConfig(optimizer="adamw")
  with pytest.raises(ValueError, match="steps"):
    vl.attack.AttackConfig(steps=-1)
  with pytest.raises(ValueError, match="map_batch_size must be >= 0"):
    vl.attack.AttackConfig(map_batch_size=-1)


def test_reference_frames_of_the_camera_improve_the_reconstruction():
  spec = sources.ClipSpec(frames=4, height=16, width=16, channels=3)
  batch = sources.load_client_batch(jax.random.key(0), "synthetic", batch_size=1,
                                            spec=spec, num_classes=4, num_references=3)
  apply_fn, params = tiny_victim("c3d")
  target = vl.fl.client_update(apply_fn, params, batch.clips, batch.labels)
  psnr = {}
  for init in ("uniform", "reference"):
    config = vl.attack.AttackConfig(steps=30, optimizer="lbfgs", metric="l2", schedule="constant",
                                    priors={}, log_every=10, init=init)
    rec = vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                                clip_shape=batch.clips.shape, config=config,
                                references=batch.references)
    psnr[init] = float(vl.metrics.psnr(rec.clips, batch.clips)[0])
  assert psnr["reference"] > psnr["uniform"] + 5.0, psnr
  with pytest.raises(ValueError, match="references"):
    vl.attack.reconstruct(jax.random.key(0), apply_fn, params, target,
                          clip_shape=batch.clips.shape,
                          config=vl.attack.AttackConfig(init="reference"))


def test_the_core_minimises_any_objective_per_restart_within_its_projection():
  target = jnp.asarray([0.3, 2.0])
  objective = lambda x: (jnp.sum(jnp.square(x - target)), {"norm": jnp.sum(jnp.square(x))})
  starts = lambda key: jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2))  # [R=3, 2]
  config = vl.attack.AttackConfig(optimizer="sgd", lr=0.1, schedule="constant", steps=100,
                                  restarts=3, log_every=40, priors={})
  attack = vl.attack.make_optimisation(objective, starts, config,
                                       project=lambda x: jnp.clip(x, 0.0, 1.0))
  infos = []
  done = vl.attack.driver.drive(attack, attack.init(jax.random.key(0)), config,
                                progress=lambda step, total, info: infos.append((step, info)))
  assert [step for step, _ in infos] == [0, 40, 80, 100]  # the last dispatch: 20 steps, 20 idle
  assert set(done.history) == {"loss", "norm"} and done.history["loss"].shape == (100, 3)
  assert not np.isnan(done.history["loss"]).any()
  np.testing.assert_allclose(done.history["loss"][0], [4.09, 1.49, 2.89], rtol=1e-6)  # starts
  np.testing.assert_allclose(done.restart_losses, [1.0] * 3, rtol=1e-4)  # best in the box
  np.testing.assert_allclose(done.best_candidate, [0.3, 1.0], atol=1e-3)
  last = infos[-1][1]
  assert np.isnan(last["grad_match"]) and last["norm"] == pytest.approx(1.09, abs=1e-3)
