"""HTML reports: embedded images of a real tiny run, escaping, sweep pages, headless rendering."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from vidleak_jax import attack, metrics, pipeline, report, sweep
from vidleak_jax.report import html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMG = re.compile(r'<img class="([a-z]+)" src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny evaluated run (report written by pipeline.run itself)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = pipeline.RunConfig(
      workdir=workdir, clip_shape=(4, 8, 8, 3), quiet=True,
      attack=attack.AttackConfig(optimizer="adam", metric="l2", schedule="constant", steps=4,
                                 log_every=2, priors={}))
  pipeline.run(cfg)
  return workdir


def _images(page: str) -> list[tuple[str, str, Image.Image]]:
  """(css class, mime type, decoded image) of every embedded <img>."""
  return [(cls, mime, Image.open(io.BytesIO(base64.b64decode(data))))
          for cls, mime, data in IMG.findall(page)]


def test_run_report_embeds_clips_and_plots_and_loads_nothing_external(run_dir):
  page = open(os.path.join(run_dir, html.REPORT_FILE), encoding="utf-8").read()
  assert page == html.run_report_html(run_dir)  # written by pipeline.run, deterministic
  images = _images(page)
  assert page.count("<img") == len(images) == 4  # truth, reconstruction, curves, per-frame
  gifs = [im for _, mime, im in images if mime == "image/gif"]
  assert [im.n_frames for im in gifs] == [4, 4]  # one GIF frame per video frame
  assert {im.size for im in gifs} == {(128, 128)}  # 8x8 frames at 16x, one clip
  assert [mime for cls, mime, _ in images if cls == "plot"] == ["image/png"] * 2
  assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
  metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
  assert f"{metrics['psnr_mean']:.4g}" in page


def test_report_escapes_strings_and_shows_super_resolution(run_dir, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(run_dir, work)
  config = json.loads((work / "config.json").read_text())
  config["data"] = "video:/x/<script>alert(1)</script>&.mp4"
  (work / "config.json").write_text(json.dumps(config))
  metrics = json.loads((work / "metrics.json").read_text())
  metrics["sr_metrics"] = {"method": "<b>x</b>", "scale": 2, "before": {"psnr_mean": 21.25},
                           "after": {"psnr_mean": 23.5, "psnr": [23.5]}}
  metrics["curve"] = {"step": [1, 2, 3, 4], "objective": [4.0, 3.0, 2.0, 1.0],
                      "psnr": [10.0, 12.0, 14.0, 15.0]}
  (work / "metrics.json").write_text(json.dumps(metrics))
  rec = np.load(work / "reconstruction.npz")["clips"]
  np.savez(work / "sr.npz", clips=rec.repeat(2, axis=2).repeat(2, axis=3))
  page = html.run_report_html(str(work))
  assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page
  assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
  gifs = [im for _, mime, im in _images(page) if mime == "image/gif"]
  assert len(gifs) == 3 and gifs[2].size == (128, 128)  # 16x16 SR frames shown at 8x
  assert "super-resolved" in page
  assert '<td>psnr_mean</td><td class="num">21.25</td><td class="num">23.5</td>' in page


def test_batch_report_matches_clips_to_the_truth_without_a_config(tmp_path):
  rng = np.random.default_rng(0)
  truth = rng.random((2, 4, 16, 16, 3)).astype(np.float32)
  rec = truth[::-1].copy()
  rec[1] = 0.5  # rec[0] is truth clip 1 exactly; rec[1] (matched to clip 0) is grey
  report.save_npz(tmp_path / "data.npz", clips=truth, labels=np.array([2, 3]))
  report.save_npz(tmp_path / "reconstruction.npz", clips=rec, labels=np.array([3, 2]),
                  history_loss=np.ones((5, 2), np.float32))
  report.write_json(tmp_path / "metrics.json", metrics.evaluate(
      rec, truth, rec_labels=np.array([3, 2]), true_labels=np.array([2, 3])))
  page = html.run_report_html(str(tmp_path))
  truth_gif, rec_gif = [im for _, mime, im in _images(page) if mime == "image/gif"]
  assert truth_gif.size == rec_gif.size == (128, 2 * 128 + 2)  # two clips stacked, 8x
  for t in range(4):  # the reconstruction GIF shows matched clips: clip 1 equals the truth
    truth_gif.seek(t)
    rec_gif.seek(t)
    a = np.asarray(truth_gif.convert("RGB"), np.float64)[130:]
    b = np.asarray(rec_gif.convert("RGB"), np.float64)[130:]
    assert np.abs(a - b).mean() < 8.0  # GIF palette quantisation only
  assert '<td class="num">0</td><td class="num">2</td><td class="num">2</td>' in page
  assert "Settings" not in page


def _fake_sweep(run_dir, workdir) -> sweep.SweepSpec:
  """A finished 2x2 sweep whose points are copies of `run_dir` with distinct PSNRs."""
  spec = sweep.parse_spec({"name": "<fake>", "grid": {"victim": ["c3d", "frame_cnn"],
                                                      "lr": [0.1, 0.01]}})
  for i, point in enumerate(sweep.expand(spec)):
    point_dir = os.path.join(workdir, point.point_id)
    shutil.copytree(run_dir, point_dir)
    metrics = json.loads(open(os.path.join(point_dir, "metrics.json")).read())
    metrics["psnr_mean"] = 10.0 + i
    with open(os.path.join(point_dir, "metrics.json"), "w") as f:
      json.dump(metrics, f)
    sweep.mark_finished(point_dir, spec, point)
  sweep.write_results(workdir, spec)
  return spec


def test_sweep_report_has_table_plots_and_point_thumbnails(run_dir, tmp_path):
  _fake_sweep(run_dir, str(tmp_path))
  page = open(html.write_report(str(tmp_path)), encoding="utf-8").read()
  images = _images(page)
  assert [cls for cls, _, _ in images].count("plot") == 2  # one per swept flag
  assert [mime for _, mime, _ in images].count("image/gif") == 4  # a thumbnail per point
  assert "&lt;fake&gt;" in page and "<fake>" not in page
  for pid in ("victim=c3d,lr=0.1", "victim=frame_cnn,lr=0.01"):
    assert f'href="#{pid}"' in page and f'id="{pid}"' in page
    assert f'href="{urllib.parse.quote(pid)}/report.html"' in page
  assert '<td class="num">10</td>' in page and '<td class="num">13</td>' in page


def _chromium(*args, tmp_path) -> subprocess.CompletedProcess:
  return subprocess.run(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking", "--disable-component-update",
       "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000",
       *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: apt-get install chromium")
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_report_renders_in_headless_chromium(run_dir, tmp_path, kind):
  if kind == "run":
    path = os.path.join(run_dir, html.REPORT_FILE)
  else:
    _fake_sweep(run_dir, str(tmp_path / "sweep"))
    path = html.write_report(str(tmp_path / "sweep"))
  url = "file://" + os.path.abspath(path)
  shot = tmp_path / "shot.png"
  proc = _chromium(f"--screenshot={shot}", url, tmp_path=tmp_path)
  assert shot.exists(), proc.stderr[-2000:]
  pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
  assert pixels.shape == (3000, 1200, 3) and pixels.std() > 10.0  # not a blank page
  dom = _chromium("--dump-dom", url, tmp_path=tmp_path).stdout
  total = open(path, encoding="utf-8").read().count("<img")
  body = re.search(r"<body[^>]*>", dom)
  assert body, dom[:500]
  assert f'data-images-total="{total}"' in body[0], body[0]
  assert f'data-images-decoded="{total}"' in body[0], body[0]
