"""Super-resolution: networks, training and checkpoints, methods, the sr stage, LPIPS."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vidleak_jax as vl
from vidleak_jax import metrics, pipeline, report, training
from vidleak_jax.data import synthetic
from vidleak_jax.metrics_lpips import lpips
from vidleak_jax.sr import apply, methods, models, train
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["espcn", "edsr"])
@pytest.mark.parametrize("scale", [2, 4])
def test_untrained_networks_upscale_like_bicubic(name, scale):
  clips = jax.random.uniform(jax.random.key(0), (2, 3, 8, 6, 3))
  model = models.create_model(name, jax.random.key(1), scale=scale, temporal_radius=1)
  out = apply.apply_model(model, clips, temporal_radius=1)
  assert out.shape == (2, 3, 8 * scale, 6 * scale, 3)
  # The last layer starts at zero: the prediction is the centre frame's bicubic upsampling.
  np.testing.assert_allclose(out, apply.bicubic(clips, scale), atol=1e-6)


def test_pixel_shuffle_matches_depth_to_space():
  x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 3, 4, 12)  # C = 3, s = 2
  out = np.asarray(models.pixel_shuffle(jnp.asarray(x), 2))
  expected = np.zeros((2, 6, 8, 3), np.float32)
  for h in range(3):
    for w in range(4):
      for i in range(2):
        for j in range(2):
          expected[:, 2 * h + i, 2 * w + j] = x[:, h, w, (2 * i + j) * 3:(2 * i + j + 1) * 3]
  np.testing.assert_array_equal(out, expected)


def test_classical_methods_equal_jax_image_resize():
  clips = jax.random.uniform(jax.random.key(0), (2, 3, 5, 7, 3))
  for name, method in (("bicubic", "cubic"), ("lanczos3", "lanczos3")):
    setup = methods.SRSetup(methods.SRConfig(method=name), 2, np.zeros((0, 10, 14, 3)))
    out = methods.SR_METHODS.get(name)(jax.random.key(0), setup)(clips)
    np.testing.assert_array_equal(out, jax.image.resize(clips, (2, 3, 10, 14, 3), method))


def test_neighbour_stacks_repeat_the_edges():
  clips = jnp.arange(4, dtype=jnp.float32)[None, :, None, None, None] * jnp.ones((1, 4, 2, 2, 1))
  stacks = apply.stack_neighbours(clips, 1)  # [4, 2, 2, 3]: frames t-1, t, t+1
  np.testing.assert_array_equal(stacks[:, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def _tiny_pairs():
  high = train.photo_clips(16, 1)[:24]
  return train.pairs_from_clips(train.degrade(high, 2), high)


def test_training_reduces_the_loss():
  model = models.create_model("espcn", jax.random.key(0), scale=2)
  _, losses = train.fit(jax.random.key(1), model, _tiny_pairs(), steps=80, batch_size=8,
                        learning_rate=2e-3)
  assert np.all(np.isfinite(losses))
  assert losses[-20:].mean() < 0.8 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
  pairs, key = _tiny_pairs(), jax.random.key(2)
  new = lambda: models.create_model("edsr", jax.random.key(0), scale=2)
  full, full_losses = train.fit(key, new(), pairs, steps=12, batch_size=4,
                                checkpoint_dir=str(tmp_path / "a"), save_every=6)
  original_save = training.save

  def save_then_crash(manager, step, *args):
    original_save(manager, step, *args)
    raise KeyboardInterrupt(f"stopped after step {step}")

  monkeypatch.setattr(training, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt, match="step 6"):
    train.fit(key, new(), pairs, steps=12, batch_size=4, checkpoint_dir=str(tmp_path / "b"),
              save_every=6)
  monkeypatch.setattr(training, "save", original_save)
  resumed, resumed_losses = train.fit(key, new(), pairs, steps=12, batch_size=4,
                                      checkpoint_dir=str(tmp_path / "b"), save_every=6)
  np.testing.assert_array_equal(full_losses, resumed_losses)
  for a, b in zip(jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(resumed))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_reference_adapted_sr_beats_generic_sr_on_the_same_camera(tmp_path):
  size, scale = 32, 2
  camera = synthetic.environment(jax.random.key(7), size, size, 3)
  frames, _ = synthetic.synthetic_clips(jax.random.key(8), 14, frames=1, height=size,
                                        width=size, background=camera)
  references, held_out = frames[:6, 0], frames[6:]  # other frames of the same camera
  config = methods.SRConfig(method="adapted", model="espcn", steps=60, finetune_steps=60,
                            checkpoint=str(tmp_path / "generic"))
  setup = methods.SRSetup(config, scale, np.asarray(references))
  generic = methods.SR_METHODS.get("espcn")(jax.random.key(0), setup)  # trained, saved
  adapted = methods.SR_METHODS.get("adapted")(jax.random.key(0), setup)  # restored, adapted
  low = train.degrade(held_out, scale)
  score = lambda upscale: float(metrics.psnr(jnp.clip(upscale(low), 0, 1), held_out).mean())
  assert score(adapted) > score(generic) + 1.0, (score(generic), score(adapted))


def test_lpips_and_temporal_error():
  clips, _ = synthetic.synthetic_clips(jax.random.key(0), 2, frames=3, height=16, width=16)
  noise = jax.random.normal(jax.random.key(1), clips.shape)
  slightly, very = jnp.clip(clips + 0.05 * noise, 0, 1), jnp.clip(clips + 0.3 * noise, 0, 1)
  same, small, large = lpips(clips, clips), lpips(slightly, clips), lpips(very, clips)
  assert same.shape == (2,) and np.all(np.abs(same) < 1e-6)
  assert np.all(small > 1e-3) and np.all(large > small), (small, large)
  x, y = np.asarray(very, np.float64), np.asarray(clips, np.float64)
  expected = np.abs(np.diff(x, axis=1) - np.diff(y, axis=1)).mean(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(metrics.temporal_error(very, clips), expected, rtol=1e-5)


def test_clip_scores_of_grayscale_clips_include_lpips_of_the_gray_rgb_frames():
  clips, _ = synthetic.synthetic_clips(jax.random.key(0), 2, frames=3, height=16, width=16)
  gray = np.asarray(clips).mean(axis=-1, keepdims=True)  # [2,3,16,16,1]
  noisy = np.clip(gray + 0.2 * np.asarray(jax.random.normal(jax.random.key(1), gray.shape)), 0, 1)
  scores = pipeline.evaluate.clip_scores(noisy, gray)
  expected = lpips(np.repeat(noisy, 3, axis=-1), np.repeat(gray, 3, axis=-1))
  np.testing.assert_allclose(scores["lpips"], expected, rtol=1e-6)
  assert scores["lpips_mean"] > 1e-3
  assert "lpips" not in pipeline.evaluate.clip_scores(np.stack([noisy[..., 0]] * 2, -1),
                                             np.stack([gray[..., 0]] * 2, -1))


def test_bad_inputs_name_the_setting(tmp_path):
  with pytest.raises(KeyError, match="unknown method 'srgan'; valid: none, adapted, bicubic"):
    methods.SRConfig(method="srgan")
  with pytest.raises(ValueError, match="unknown scale 3; valid: 1, 2, 4"):
    methods.SRConfig(method="bicubic", scale=3)
  with pytest.raises(ValueError, match="sr_scale=4 must divide"):
    pipeline.sr.sr_input(np.zeros((1, 2, 18, 18, 3), np.float32), None, 4)
  with pytest.raises(ValueError, match="'espcn': its networks are trained on RGB frames; clips "
                                       "have C=1"):
    pipeline.RunConfig(workdir=str(tmp_path / "gray"), clip_shape=(4, 16, 16, 1),
                     sr=methods.SRConfig(method="espcn"))
  setup = methods.SRSetup(methods.SRConfig(method="adapted"), 2, np.zeros((0, 8, 8, 3)))
  with pytest.raises(ValueError, match="method='adapted' needs the attacker's reference frames"):
    methods.SR_METHODS.get("adapted")(jax.random.key(0), setup)
  checkpoint = str(tmp_path / "ckpt")
  train.train_generic(jax.random.key(0), "espcn", scale=2, size=16, frames=1, steps=2,
                      checkpoint_dir=checkpoint)
  setup = methods.SRSetup(methods.SRConfig(method="edsr", checkpoint=checkpoint), 2,
                          np.zeros((0, 8, 8, 3)))
  with pytest.raises(ValueError, match="checkpoint=.* holds another model .*'espcn'"):
    methods.SR_METHODS.get("edsr")(jax.random.key(0), setup)


@pytest.mark.slow
def test_sr_stage_end_to_end(tmp_path):
  attack = vl.attack.AttackConfig(steps=4, log_every=2, attack_scale=2, init="reference",
                                  param="background_residual", residual_l1=1e-2)
  cfg = pipeline.RunConfig(workdir=str(tmp_path), stages=("data", "attack"),
                         clip_shape=(3, 16, 16, 3), references=2, victim="frame_cnn",
                         attack=attack, quiet=True)
  pipeline.run(cfg)
  rec = report.load_npz(os.path.join(tmp_path, "reconstruction.npz"))
  assert rec["clips"].shape == (1, 3, 16, 16, 3) and rec["clips_lowres"].shape == (1, 3, 8, 8, 3)
  bicubic = dataclasses.replace(cfg, stages=("sr", "eval"), sr=methods.SRConfig(method="bicubic"))
  result = pipeline.run(bicubic)
  out = report.load_npz(os.path.join(tmp_path, "sr.npz"))["clips"]
  # Bicubic SR with the background detail transfer is the attack's own decoding.
  np.testing.assert_allclose(out, rec["clips"], atol=1e-5)
  sr = result["sr_metrics"]
  assert sr["method"] == "bicubic" and sr["scale"] == 2
  assert abs(sr["after"]["psnr_mean"] - sr["before"]["psnr_mean"]) < 1e-3
  assert result["lpips_mean"] == pytest.approx(sr["before"]["lpips_mean"])
  restoration = dataclasses.replace(bicubic, sr=methods.SRConfig(
      method="restoration", steps=3, finetune_steps=3, simulations=1, simulation_steps=2))
  pipeline.run(restoration)
  with open(os.path.join(tmp_path, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["sr_metrics"]["method"] == "restoration"
  assert np.isfinite(saved["sr_metrics"]["after"]["psnr_mean"])
  with pytest.raises(ValueError, match="method='adapted' needs the attacker's reference frames"):
    pipeline.run(dataclasses.replace(bicubic, workdir=str(tmp_path / "none"), references=0,
                                   stages=("data", "attack", "sr"),
                                   attack=vl.attack.AttackConfig(steps=2, log_every=2),
                                   sr=methods.SRConfig(method="adapted")))
  assert not os.path.exists(tmp_path / "none" / "sr.npz")


@pytest.mark.parametrize("bad, expected", [
    ("--sr=srgan", "--sr"), ("--sr=bicubic --sr_scale=3", "--sr_scale: unknown scale 3"),
    ("--attack_scale=3", "--attack_scale"), ("--param=background", "--param"),
])
def test_bad_sr_flags_exit_nonzero_with_one_clear_message(tmp_path, bad, expected):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "experiments.main",
                         "--flagfile=experiments/flags/tiny.flags", f"--workdir={workdir}",
                         *bad.split()], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("bad, expected", [
    ("--sr_methods=none,bogus", "--sr_methods: unknown ['bogus']"),
    ("--reference_counts=0,-1", "--reference_counts must be integers >= 0"),
    ("--shape=4,32,32", "--shape expects T,H,W,C"),
    ("--scale=3", "unknown attack_scale 3"),
])
def test_scenario_flags_are_checked_before_anything_runs(tmp_path, bad, expected):
  out = tmp_path / "scenarios"
  proc = subprocess.run([sys.executable, "-m", "experiments.scenarios", f"--out={out}",
                         f"--table={tmp_path / 'table.md'}", bad], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-1000:]
  assert "Traceback" not in proc.stderr
  assert not out.exists() and not (tmp_path / "table.md").exists()
