"""Clip builders built from tiny lossless videos written in each dataset's official layout."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from vidleak_jax.data import tfds as vtfds
from vidleak_jax.data import video_io
from vidleak_jax.data.tfds import common

FRAMES, HW = 12, (16, 16)


@pytest.fixture
def no_tensorflow():
  """Fails the test if reading or building imported TensorFlow (which is not installed)."""
  assert "tensorflow" not in sys.modules
  yield
  assert "tensorflow" not in sys.modules


def _videos(root, rels, seed=0) -> dict[str, np.ndarray]:
  """Writes random 12-frame 16x16 videos (FFV1: lossless) at root/rel; {rel: frames}."""
  rng = np.random.default_rng(seed)
  out = {}
  for rel in rels:
    out[rel] = rng.integers(0, 256, (FRAMES, *HW, 3), dtype=np.uint8)
    video_io.write_video(root / rel, out[rel])
  return out


def _corrupt(path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(np.random.default_rng(1).bytes(700))


def _examples(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("window, max_picks, calls", [
    (None, None, {"read_frames": 1}), (8, 96, {"read_frames_at": 1}), (4, 3, {"read_frames": 3})])
def test_video_clips_read_paths_agree(tmp_path, monkeypatch, window, max_picks, calls):
  """Contiguous-range, picked-frames and per-clip reads give the same clips."""
  src = _videos(tmp_path, ["v.mkv"])["v.mkv"]
  if window:  # frames per contiguous read; picked frames per read_frames_at call
    monkeypatch.setattr(common, "_BYTES_PER_PASS", window * HW[0] * HW[1] * 3)
    monkeypatch.setattr(common, "_MAX_PICKS", max_picks)
  counted: dict[str, int] = {}
  for name in ("read_frames", "read_frames_at"):
    def spy(*args, _name=name, _fn=getattr(video_io, name), **kwargs):
      counted[_name] = counted.get(_name, 0) + 1
      return _fn(*args, **kwargs)
    monkeypatch.setattr(video_io, name, spy)
  config = vtfds.VideoClipConfig(frames=4, stride=2, size=None, clips_per_video=3)
  clips = list(common.video_clips(tmp_path / "v.mkv", config))
  assert counted == calls
  assert [start for start, _ in clips] == [0, 2, 5]  # evenly spaced over 12 frames, span 7
  for start, clip in clips:
    np.testing.assert_array_equal(clip, src[start:start + 7:2])


def test_video_folder_splits_pixels_and_skipped(tmp_path, no_tensorflow):
  man = tmp_path / "man"
  rels = [f"{c}/v{i}.mkv" for c in ("walk", "run", "jump") for i in range(2)]
  src = _videos(man, rels)
  _corrupt(man / "walk" / "broken.mp4")
  kw = dict(manual_dir=man, data_dir=tmp_path / "data", frames=4, stride=2, size=None,
            clips_per_video=2, test_fraction=0.5)
  train = vtfds.load("video_folder", split="train", **kw)
  test = vtfds.load("video_folder", split="test", **kw)
  assert train.class_names == ["jump", "run", "walk"]
  examples = _examples(train) + _examples(test)
  assert len(examples) == 2 * len(rels)  # two clips (starts 0 and 5) per readable video
  for ex in examples:
    assert ex["clip"].shape == (4, *HW, 3) and ex["clip"].dtype == np.uint8
    assert ex["start"] in (0, 5) and ex["scene"] == ex["video"][:-4]
    assert train.class_names[ex["label"]] == ex["video"].split("/")[0]
    np.testing.assert_array_equal(ex["clip"], src[ex["video"]][ex["start"]::2][:4])
  train_videos = {ex["video"] for ex in _examples(train)}
  test_videos = {ex["video"] for ex in _examples(test)}
  assert train_videos | test_videos == set(rels) and not train_videos & test_videos
  report = vtfds.read_skipped(train.builder.data_dir)
  assert report["num_skipped"] == 1 and report["num_videos"] == len(rels) + 1
  skipped = report["skipped"][0]
  assert skipped["video"] == "walk/broken.mp4" and "broken.mp4" in skipped["reason"]
  assert (train.skipped + test.skipped) == report["skipped"]


def test_ucf_crime_official_layout(tmp_path, no_tensorflow):
  man = tmp_path / "UCF_Crimes"
  on_disk = ["Abuse/Abuse001_x264.mkv", "Abuse/Abuse002_x264.mkv",
             "Anomaly-Videos-Part-1/Arrest/Arrest001_x264.mkv", "Arrest/Arrest002_x264.mkv",
             "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mkv",
             "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mkv"]
  src = _videos(man, on_disk)
  _corrupt(man / "Abuse" / "Abuse003_x264.mp4")
  splits = man / "Anomaly_Detection_splits"
  splits.mkdir()
  (splits / "Anomaly_Train.txt").write_text(
      "Abuse/Abuse001_x264.mkv\nAbuse/Abuse003_x264.mp4\nArrest/Arrest001_x264.mp4\n"
      "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4\n\n")
  (splits / "Anomaly_Test.txt").write_bytes(
      b"Abuse/Abuse002_x264.mp4\r\nArrest/Arrest002_x264.mp4\r\n"
      b"Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4\r\n"
      b"Stealing/Stealing099_x264.mp4\r\n")
  kw = dict(manual_dir=man, data_dir=tmp_path / "data", frames=4, stride=3, size=(8, 8))
  train = vtfds.load("ucf_crime", split="train", **kw)
  test = vtfds.load("ucf_crime", split="test", **kw)
  names = train.class_names
  assert len(names) == 14 and names[:2] == ["Abuse", "Arrest"] and names[13] == "Normal"
  labels = {ex["video"]: names[ex["label"]] for ex in _examples(train) + _examples(test)}
  assert labels == {rel: rel.split("/")[-1].split("_")[0].rstrip("0123456789")
                    for rel in on_disk}
  for ex in _examples(train) + _examples(test):
    assert ex["start"] == 1 and ex["scene"] == ex["video"].split("/")[-1][:-4]
    frames = src[ex["video"]][1::3][:4].astype(np.float64)
    want = np.round(frames.reshape(4, 8, 2, 8, 2, 3).mean(axis=(2, 4))).astype(np.uint8)
    np.testing.assert_array_equal(ex["clip"], want)
  assert len(train) == 3 and len(test) == 3
  assert [s["video"] for s in train.skipped] == ["Abuse/Abuse003_x264.mp4"]
  assert [s["video"] for s in test.skipped] == ["Stealing/Stealing099_x264.mp4"]


def test_ucf_crime_without_split_files_names_them(tmp_path):
  man = tmp_path / "man"
  (man / "Abuse").mkdir(parents=True)
  (man / "Abuse" / "notes.txt").write_text("no videos here")
  with pytest.raises(FileNotFoundError, match="Anomaly_Train.txt, Anomaly_Test.txt"):
    vtfds.load("ucf_crime", manual_dir=man, data_dir=tmp_path / "data", frames=4)


def test_ucf101_official_lists(tmp_path, no_tensorflow):
  man = tmp_path / "man"
  classes = ["ApplyEyeMakeUp", "Archery", "HandstandPushups"]
  stems = {"HandstandPushups": "HandStandPushups"}  # file-name case differs in UCF101
  rels = {(c, g): f"{c}/v_{stems.get(c, c)}_g{g:02d}_c01.avi" for c in classes for g in (1, 8)}
  src = _videos(man / "UCF-101", rels.values())
  _corrupt(man / "UCF-101" / "Archery" / "v_Archery_g09_c02.avi")
  lists = man / "ucfTrainTestlist"
  lists.mkdir()
  crlf = lambda lines: "".join(f"{line}\r\n" for line in lines).encode()
  (lists / "classInd.txt").write_bytes(crlf(f"{i + 1} {c}" for i, c in enumerate(classes)))
  (lists / "trainlist01.txt").write_bytes(crlf(
      [f"{c}/v_{c}_g08_c01.avi {i + 1}" for i, c in enumerate(classes)]
      + ["Archery/v_Archery_g09_c02.avi 2"]))
  (lists / "testlist01.txt").write_bytes(crlf(f"{c}/v_{c}_g01_c01.avi" for c in classes))
  kw = dict(manual_dir=man, data_dir=tmp_path / "data", frames=3, stride=1, size=None,
            clips_per_video=None, split_number=1)
  for split, group in (("train", 8), ("test", 1)):
    source = vtfds.load("ucf101", split=split, **kw)
    assert source.builder.builder_config.name == "split1_f3_s1_native_c-all"
    assert source.class_names == classes
    examples = _examples(source)
    assert len(examples) == 3 * 4  # all 4 disjoint 3-frame clips of each 12-frame video
    for ex in examples:
      cls = classes[ex["label"]]
      assert ex["video"] == f"UCF-101/{rels[cls, group]}"
      assert ex["scene"] == f"{cls}_g{group:02d}" and ex["start"] in (0, 3, 6, 9)
      np.testing.assert_array_equal(ex["clip"], src[rels[cls, group]][ex["start"]:][:3])
  report = vtfds.read_skipped(source.builder.data_dir)
  assert [(s["video"], s["split"]) for s in report["skipped"]] == [
      ("UCF-101/Archery/v_Archery_g09_c02.avi", "train")]
