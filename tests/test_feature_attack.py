"""Feature-pipeline attacks: feature matching, feature inversion, and the pipeline through the
entry point (closed-form stage 1: test_analytic.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidleak_jax as vl
from vidleak_jax import metrics, pipeline, pretrain, report
from vidleak_jax.attack import analytic as an
from vidleak_jax.attack import features as fa
from vidleak_jax.models import heads
from tests.conftest import ROOT


T, D = 4, 8
LABELS = jnp.asarray([2])


def _features(seed: int = 0) -> jax.Array:
  """Non-negative (post-ReLU, globally pooled) feature matrix [1,T,D] with temporal variation."""
  return jax.nn.relu(jax.random.normal(jax.random.key(seed), (1, T, D)))


def _shared(name: str, features: jax.Array, **kwargs):
  head = heads.create_head(name, jax.random.key(1), frames=T, dim=D, num_classes=4, **kwargs)
  _, head_apply, params = heads.feature_victim(lambda x: x, head)
  grads = jax.jit(vl.fl.client_update, static_argnums=0)(head_apply, params, features, LABELS)
  return head, head_apply, params, grads


def test_feature_matching_recovers_a_gru_heads_feature_matrix():
  features = _features(seed=3)
  _, head_apply, params, grads = _shared("gru", features, hidden=32)
  start = jnp.full_like(features, 0.5)
  found = fa.match_features(head_apply, params, grads, LABELS, start,
                            fa.StageConfig(optimizer="lbfgs", metric="l2", steps=100))
  errors = fa.feature_errors(found.value, features)
  assert errors["feature_rel_error"][0] < 1e-3, errors  # from ~0.6 at the start
  assert errors["feature_cosine"][0] > 0.9999
  assert fa.feature_errors(start, features)["feature_rel_error"][0] > 0.3
  assert found.history.shape == (100,) and found.loss <= float(found.history[0])


def test_matching_in_the_input_span_recovers_every_clip_of_a_batch():
  head = heads.create_head("mlp2", jax.random.key(0), frames=3, dim=16, num_classes=8)
  _, head_apply, params = heads.feature_victim(lambda x: x, head)
  features = jax.nn.relu(jax.random.normal(jax.random.key(100), (4, 3, 16))) + 0.2
  labels = jnp.asarray([2, 3, 0, 2])
  grads = jax.jit(vl.fl.client_update, static_argnums=0)(head_apply, params, features, labels)
  span = an.input_span(grads, "fc1", 4)
  start = jnp.full((4, 16), float(features.mean())) @ span
  found = fa.match_features(
      head_apply, params, grads, labels, start,
      fa.StageConfig(optimizer="lbfgs", metric="l2", steps=200, restarts=4),
      key=jax.random.key(0), decode=lambda a: an.features_from_input(a @ span.T, 3, 16, "mean"))
  assert found.value.shape == features.shape
  estimate = np.asarray(found.value)[fa.match_features_to_truth(np.asarray(found.value),
                                                                np.asarray(features))]
  errors = fa.feature_errors(estimate, features)["pooled_feature_rel_error"]
  assert max(errors) < 1e-3, errors


def test_restarts_escape_a_local_minimum_of_feature_matching():
  features = _features(seed=7)  # a batch where one start sticks (seeds 0-11 scanned: 7 only)
  _, head_apply, params, grads = _shared("conv1d", features)
  start = jnp.full_like(features, 0.5)
  one = fa.match_features(head_apply, params, grads, LABELS, start, fa.StageConfig(steps=100))
  many = fa.match_features(head_apply, params, grads, LABELS, start,
                           fa.StageConfig(steps=100, restarts=8), key=jax.random.key(0))
  assert fa.feature_errors(one.value, features)["feature_rel_error"][0] > 0.01  # stuck
  assert fa.feature_errors(many.value, features)["feature_rel_error"][0] < 1e-4
  assert many.value.shape == features.shape and many.history.shape == (100,)
  assert many.loss < one.loss
  with pytest.raises(ValueError, match="needs a key"):
    fa.match_features(head_apply, params, grads, LABELS, start, fa.StageConfig(restarts=2))


def test_feature_inversion_recovers_clips_through_an_injective_extractor():
  clips, _ = vl.data.synthetic_clips(jax.random.key(0), 1, frames=2, height=8, width=8,
                                     channels=3, num_classes=4)
  extract = lambda x: x.reshape(x.shape[0], x.shape[1], -1) * 2.0 - 0.3  # per-frame, invertible
  found = fa.invert_features(extract, extract(clips), jnp.full(clips.shape, 0.5),
                             fa.StageConfig(optimizer="lbfgs", steps=30))
  assert float(metrics.psnr(found.value, clips)[0]) > 40.0
  assert float(found.value.min()) >= 0.0 and float(found.value.max()) <= 1.0


def test_recovered_features_are_matched_to_the_closest_true_clip():
  truth = np.random.default_rng(0).normal(size=(4, 3, 5))
  order = np.array([2, 0, 3, 1])
  estimate = truth[order] + 0.01  # estimate[k] ~ truth[order[k]]
  perm = fa.match_features_to_truth(estimate, truth)
  np.testing.assert_array_equal(order[perm], np.arange(4))  # estimate[perm[i]] ~ truth[i]
  assert max(fa.feature_errors(estimate[perm], truth)["feature_rel_error"]) < 0.05
  estimate[1] = np.nan  # a diverged clip is matched last, not everywhere
  assert sorted(fa.match_features_to_truth(estimate, truth).tolist()) == [0, 1, 2, 3]


def test_evaluate_uses_a_given_assignment():
  truth = np.random.default_rng(1).uniform(size=(2, 2, 8, 8, 3)).astype(np.float32)
  scores = vl.metrics.evaluate(truth[::-1], truth, assignment=[1, 0])
  assert scores["assignment"] == [1, 0] and min(scores["psnr"]) >= 100  # identical: capped
  with pytest.raises(ValueError, match="permutation"):
    vl.metrics.evaluate(truth, truth, assignment=[0, 0])


def test_feature_errors_follow_the_formulas():
  truth = np.arange(1.0, 7.0).reshape(1, 2, 3)
  errors = fa.feature_errors(2.0 * truth, truth)
  assert errors["feature_rel_error"] == pytest.approx([1.0])
  assert errors["feature_cosine"] == pytest.approx([1.0])
  errors = fa.feature_errors(-truth, truth)
  assert errors["feature_rel_error"] == pytest.approx([2.0])
  assert errors["feature_cosine"] == pytest.approx([-1.0])
  # Frames that differ from the truth but keep its time mean: only the full-matrix error sees it.
  shifted = truth + np.array([1.0, -1.0]).reshape(1, 2, 1)
  errors = fa.feature_errors(shifted, truth)
  assert errors["pooled_feature_rel_error"] == pytest.approx([0.0], abs=1e-12)
  assert errors["feature_rel_error"] == pytest.approx([np.sqrt(6.0) / np.linalg.norm(truth)])
  means = truth.mean(axis=1)
  assert fa.feature_errors(truth + 1.0, truth)["pooled_feature_rel_error"] == pytest.approx(
      [np.sqrt(3.0) / np.linalg.norm(means)])


TINY = ["--pipeline=features", "--extractor=resnet_small", "--clip_shape=2,16,16,3",
        "--pretrain_steps=4", "--pretrain_clips=4", "--pretrain_batch=2", "--invert_steps=5",
        "--quiet"]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_feature_pipeline_runs_end_to_end_from_the_entry_point(tmp_path):
  workdir = tmp_path / "run"
  proc = _main(*TINY, "--head=linear", "--feature_attack=analytic", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / "metrics.json").read_text())
  for key in ("psnr_mean", "ssim_mean", "psnr", "label_accuracy", "feature_rel_error",
              "feature_cosine", "feature_rel_error_mean"):
    assert key in result, key
  assert result["label_accuracy"] == 1.0
  assert len(result["psnr_per_frame"][0]) == 2
  assert json.loads((workdir / "pretrain.json").read_text())["losses"].__len__() == 4

  # The analytic attack on a linear head recovers exactly the time-mean of the true features.
  cfg = pipeline.RunConfig(
      workdir=str(workdir), pipeline="features", clip_shape=(2, 16, 16, 3),
      features=pipeline.FeatureConfig(
          head="linear", attack="analytic", pretrain_clips=4,
          pretrain=pretrain.PretrainConfig(steps=4, batch_size=2)))
  victim = pipeline.feature_victim.build_feature_victim(cfg)
  truth = victim.extract(jnp.asarray(report.load_npz(str(workdir / "data.npz"))["clips"]))
  recovered = report.load_npz(str(workdir / "reconstruction.npz"))["features"]
  np.testing.assert_allclose(recovered[0, 0], np.asarray(truth[0].mean(axis=0)), rtol=1e-3,
                             atol=1e-5)
  want = fa.feature_errors(recovered, truth)["feature_rel_error"][0]
  assert result["feature_rel_error"][0] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bad, expected", [
    (["--head=gru", "--feature_attack=analytic"], "--feature_attack 'analytic' needs a head"),
    (["--head=transformer", "--feature_attack=subspace"], "--feature_attack 'subspace' needs"),
    (["--extractor=resnet50"], "--extractor"),
    (["--head_pooling=flatten", "--head=gru"], "--head_pooling"),
    (["--extractor_weights=w.safetensors"], "--extractor_weights"),
])
def test_bad_feature_flags_exit_with_one_message(tmp_path, bad, expected):
  workdir = tmp_path / "run"
  proc = _main(*TINY, *bad, f"--workdir={workdir}")
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_feature_inversion_from_reference_frames_beats_gray():
  from vidleak_jax.data import sources  # pylint: disable=import-outside-toplevel
  batch = sources.load_client_batch(jax.random.key(0), "synthetic", batch_size=1,
                                    spec=sources.ClipSpec(2, 16, 16, 3), num_classes=4,
                                    num_references=3)
  module = vl.models.create_extractor("resnet_small", jax.random.key(1), frames=2, height=16,
                                      width=16, channels=3)
  extract = vl.models.frozen(module)
  target = jax.jit(extract)(batch.clips)
  config = fa.StageConfig(optimizer="lbfgs", steps=10, tv_spatial=1e-2, tv_temporal=1e-2)
  scores = {}
  for name, references in (("gray", None), ("reference", batch.references)):
    init = pipeline.features.init_clips(
        jax.random.key(0), references, batch.clips.shape)
    found = fa.invert_features(extract, target, init, config)
    scores[name] = float(metrics.psnr(found.value, batch.clips)[0])
  assert scores["reference"] > scores["gray"] + 3.0, scores


@pytest.mark.slow
def test_end_to_end_attack_optimises_pixels_through_extractor_and_head(tmp_path):
  cfg = pipeline.RunConfig(
      workdir=str(tmp_path), pipeline="features", clip_shape=(2, 16, 16, 3), quiet=True,
      attack=vl.attack.AttackConfig(optimizer="lbfgs", metric="l2", schedule="constant",
                                    steps=10, log_every=5),
      features=pipeline.FeatureConfig(
          head="mlp1", attack="end_to_end", pretrain_clips=4,
          pretrain=pretrain.PretrainConfig(steps=3, batch_size=2)))
  result = pipeline.run(cfg)
  rec = report.load_npz(str(tmp_path / "reconstruction.npz"))
  assert rec["history_loss"].shape == (10, 1) and rec["loss"] < rec["history_loss"][0, 0]
  victim = pipeline.feature_victim.build_feature_victim(cfg)
  np.testing.assert_allclose(rec["features"], np.asarray(victim.extract(rec["clips"])),
                             rtol=1e-4, atol=1e-5)
  truth = victim.extract(jnp.asarray(report.load_npz(str(tmp_path / "data.npz"))["clips"]))
  assert result["feature_rel_error"][0] == pytest.approx(
      fa.feature_errors(rec["features"], truth)["feature_rel_error"][0], rel=1e-6)
  assert result["feature_attack"] == "end_to_end" and result["label_accuracy"] == 1.0


def test_every_clip_of_the_batch_starts_from_its_own_point():
  start = pipeline.features.init_clips(
      jax.random.key(0), None, (2, 4, 16, 16, 3))
  assert start.shape == (2, 4, 16, 16, 3) and abs(float(start.mean()) - 0.5) < 0.01
  assert np.abs(start[0] - start[1]).max() > 1e-3  # same-label clips can separate
  refs = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
  start = pipeline.features.init_clips(
      jax.random.key(0), refs, (2, 4, 16, 16, 3))
  assert np.abs(start - np.median(refs, axis=0)).max() < 0.1
  assert np.abs(start[0] - start[1]).max() > 1e-3


def test_the_attack_gets_the_references_whenever_it_uses_them(tmp_path):
  refs = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
  report.save_npz(tmp_path / "references.npz", frames=refs)
  for init, param, given in (("uniform", "direct", False), ("reference", "direct", True),
                             ("uniform", "background_residual", True)):
    cfg = pipeline.RunConfig(
        workdir=str(tmp_path), pipeline="features", clip_shape=(2, 16, 16, 3),
        attack=vl.attack.AttackConfig(init=init, param=param),
        features=pipeline.FeatureConfig(attack="end_to_end"))
    got = pipeline.rundir.attack_references(cfg)
    assert (got is not None) == given, (init, param)
    if given:
      np.testing.assert_array_equal(got, refs)


def _conv1d_matching(config: fa.StageConfig, start=None, **kwargs) -> fa.Recovered:
  """Feature matching on a conv1d head (seed-3 features), from `start` (default 0.5)."""
  features = _features(seed=3)
  _, head_apply, params, grads = _shared("conv1d", features)
  start = jnp.full_like(features, 0.5) if start is None else start
  return fa.match_features(head_apply, params, grads, LABELS, start, config, **kwargs)


@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_batched_restarts_equal_separate_runs_from_the_same_starts(batching):
  config = fa.StageConfig(optimizer="adam", lr=0.05, steps=20, log_every=8, restarts=3,
                          batching=batching, map_batch_size=2)  # "map": a pair, then one
  key, start = jax.random.key(0), jnp.full_like(_features(), 0.5)
  seen = []
  batched = _conv1d_matching(config, key=key, progress=lambda *a: seen.append(a[:2]))
  assert seen == [(0, 20), (8, 20), (16, 20), (20, 20)]
  assert batched.restart_losses.shape == (3,) and batched.history.shape == (20,)
  single = dataclasses.replace(config, restarts=1)
  separate = [_conv1d_matching(single, point) for point in fa.restart_points(key, start, config)]
  np.testing.assert_allclose(batched.restart_losses, [s.loss for s in separate], rtol=1e-5)
  best = int(np.argmin(batched.restart_losses))
  assert batched.loss == float(batched.restart_losses[best])
  np.testing.assert_allclose(batched.value, separate[best].value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched.history, separate[best].history, rtol=1e-5)


def test_feature_checkpoints_of_other_settings_or_stages_are_refused(tmp_path):
  config = fa.StageConfig(steps=8, log_every=2, restarts=2)
  directory = str(tmp_path / "ckpt")
  with pytest.raises(vl.attack.AttackInterrupted, match="feature matching stopped at step 2/8"):
    _conv1d_matching(config, key=jax.random.key(0), checkpoint_dir=directory,
                     should_stop=lambda: True)
  assert os.listdir(directory) == ["2"]
  with pytest.raises(ValueError, match=r"different attack \(differs: metric 'l2' -> 'cosine'\)"):
    _conv1d_matching(dataclasses.replace(config, metric="cosine"), key=jax.random.key(0),
                     checkpoint_dir=directory)
  with pytest.raises(ValueError, match=r"differs: starts_sha256\)"):
    _conv1d_matching(config, key=jax.random.key(1), checkpoint_dir=directory)
  extract = lambda x: x.reshape(x.shape[0], x.shape[1], -1)
  with pytest.raises(ValueError, match=r"differs: .*objective"):
    fa.invert_features(extract, jnp.zeros((1, 2, 12)), jnp.full((1, 2, 2, 2, 3), 0.5),
                       dataclasses.replace(config, restarts=1), checkpoint_dir=directory)
  assert os.listdir(directory) == ["2"]  # refused, left untouched


RESUMABLE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from vidleak_jax.attack import features as fa
    from tests.test_feature_attack import RESUMABLE_CONFIG, _conv1d_matching
    import jax
    seen = []
    def progress(done, total, info):
      seen.append(info["resumed_from"])
      time.sleep(0.2)  # slow enough to be killed mid-way
    found = _conv1d_matching(RESUMABLE_CONFIG, key=jax.random.key(0), progress=progress,
                             checkpoint_dir=sys.argv[1])
    np.savez(sys.argv[2], value=np.asarray(found.value), loss=found.loss, history=found.history,
             restart_losses=found.restart_losses)
    print("resumed_from", seen[0])
""")
RESUMABLE_CONFIG = fa.StageConfig(steps=60, log_every=3, restarts=3)


@pytest.mark.slow
def test_sigkilled_feature_matching_resumes_to_the_uninterrupted_result(tmp_path):
  def start(name):
    return subprocess.Popen([sys.executable, "-c", RESUMABLE, str(tmp_path / name),
                             str(tmp_path / f"{name}.npz")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return int(out.split()[-1])

  assert finish(start("uninterrupted")) == 0
  killed, deadline = start("run"), time.monotonic() + 600
  while not [n for n in os.listdir(tmp_path) if n == "run"] or not [
      n for n in os.listdir(tmp_path / "run") if n.isdigit()]:
    assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read()[-3000:]
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=600)
  assert killed.returncode == -signal.SIGKILL
  assert 0 < finish(start("run")) < RESUMABLE_CONFIG.steps  # resumed mid-way
  got, expected = (np.load(tmp_path / f"{name}.npz") for name in ("run", "uninterrupted"))
  for name in ("value", "loss", "history", "restart_losses"):
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_feature_matching_on_the_support_of_a_pruned_update_recovers_the_features():
  """Against a head update pruned to half its entries (DLG's defence), matching only the entries
  that were sent recovers the features far more precisely than reading the zeros as values
  (measured: relative error 4e-5 against 3e-3)."""
  features = _features(seed=3)
  _, head_apply, params, grads = _shared("gru", features, hidden=32)
  pruned = vl.fl.defend(None, grads, [vl.fl.defenses.prune(0.5)])
  start = jnp.full_like(features, 0.5)
  config = fa.StageConfig(optimizer="lbfgs", metric="l2", steps=100)
  error = lambda **kw: fa.feature_errors(fa.match_features(
      head_apply, params, pruned, LABELS, start, config, **kw).value, features)[
          "feature_rel_error"][0]
  on_support, everywhere = error(mask=vl.fl.support(pruned)), error()
  assert on_support < 1e-3 and everywhere > 10 * on_support, (on_support, everywhere)
