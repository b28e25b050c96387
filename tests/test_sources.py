"""Client batches from every `data` spec kind, and the attacker's reference frames."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from vidleak_jax.data import sources, write_video

SPEC = sources.ClipSpec(frames=4, height=8, width=8, channels=3, stride=2)


def _noise_video(path, num_frames, seed):
  frames = np.random.default_rng(seed).integers(0, 256, (num_frames, 8, 8, 3), dtype=np.uint8)
  write_video(path, frames)  # .mkv: lossless, so clip pixels can be compared exactly
  return frames


@pytest.fixture
def folder(tmp_path):
  videos = {}
  for c, cls in enumerate(["Fighting", "Normal"]):
    os.makedirs(tmp_path / cls)
    for v in range(2):
      path = str(tmp_path / cls / f"v{v}.mkv")
      videos[path] = (c, _noise_video(path, 20, seed=10 * c + v))
  (tmp_path / "Normal" / "broken.mp4").write_bytes(b"not a video at all" * 50)
  return tmp_path, videos


def test_parse_data_spec_names_the_valid_forms():
  assert sources.parse_data_spec("tfds:ucf_crime:/data/x") == ("tfds", ["ucf_crime", "/data/x"])
  for bad in ("synth", "folder", "tfds:ucf_crime", "video:"):
    with pytest.raises(ValueError, match="data=.*is not one of"):
      sources.parse_data_spec(bad)


def test_synthetic_batch_and_references_share_the_camera():
  spec = sources.ClipSpec(frames=3, height=16, width=16, channels=3)
  batch = sources.load_client_batch(jax.random.key(0), "synthetic", batch_size=2, spec=spec,
                                    num_classes=4, num_references=5)
  assert batch.clips.shape == (2, 3, 16, 16, 3) and batch.references.shape == (5, 16, 16, 3)
  # Static background: most pixels of a reference equal the clip's first frame.
  same = np.isclose(batch.references, batch.clips[0, 0][None], atol=1e-6).all(-1).mean()
  assert same > 0.5
  again = sources.load_client_batch(jax.random.key(0), "synthetic", batch_size=2, spec=spec,
                                    num_classes=4, num_references=5)
  np.testing.assert_array_equal(batch.clips, again.clips)


def test_folder_batch_reads_exact_frames_and_skips_corrupt_files(folder):
  root, videos = folder
  batch = sources.load_client_batch(jax.random.key(1), f"folder:{root}", batch_size=3,
                                    spec=SPEC, num_classes=2, num_references=4)
  assert batch.clips.shape == (3, 4, 8, 8, 3) and batch.clips.dtype == np.float32
  for clip, label, origin in zip(batch.clips, batch.labels, batch.origins):
    path, start = origin.rsplit("@", 1)
    assert not path.endswith("broken.mp4")
    true_label, frames = videos[path]
    assert label == true_label
    expected = frames[int(start):int(start) + 7:2] / 255.0
    np.testing.assert_allclose(clip, expected, atol=1e-6)
  # References: real frames of the batch's videos, never frames of an attacked clip.
  attacked = {(o.rsplit("@", 1)[0], int(o.rsplit("@", 1)[1]) + 2 * t)
              for o in batch.origins for t in range(4)}
  for ref in batch.references:
    hits = [(p, i) for p, (_, f) in videos.items() for i in range(20)
            if np.allclose(ref, f[i] / 255.0, atol=1e-6)]
    assert len(hits) == 1 and hits[0] not in attacked


def test_single_video_gives_evenly_spaced_clips(tmp_path):
  path = str(tmp_path / "cam.mkv")
  frames = _noise_video(path, 30, seed=3)
  batch = sources.load_client_batch(jax.random.key(0), f"video:{path}", batch_size=2,
                                    spec=SPEC, num_classes=2)
  starts = [int(o.rsplit("@", 1)[1]) for o in batch.origins]
  assert starts == [0, 23]
  np.testing.assert_allclose(batch.clips[1], frames[23:30:2] / 255.0, atol=1e-6)
  assert batch.labels.tolist() == [0, 0] and batch.references.shape == (0, 8, 8, 3)


def test_unusable_data_fails_with_a_clear_message(tmp_path, folder):
  root, _ = folder
  with pytest.raises(ValueError, match="num_classes"):
    sources.load_client_batch(jax.random.key(0), f"folder:{root}", batch_size=1, spec=SPEC,
                              num_classes=1)
  with pytest.raises(ValueError, match="does not exist"):
    sources.load_client_batch(jax.random.key(0), f"folder:{tmp_path}/nope", batch_size=1,
                              spec=SPEC, num_classes=2)
  short = str(tmp_path / "short.mkv")
  _noise_video(short, 5, seed=0)
  with pytest.raises(ValueError, match="short.mkv"):
    sources.load_client_batch(jax.random.key(0), f"video:{short}", batch_size=1, spec=SPEC,
                              num_classes=2)


def test_tfds_video_folder_batch(folder, tmp_path_factory):
  root, videos = folder
  tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  batch = sources.load_client_batch(jax.random.key(0), f"tfds:video_folder:{root}",
                                    batch_size=2, spec=SPEC, num_classes=2, num_references=2,
                                    tfds_dir=tfds_dir)
  assert batch.clips.shape == (2, 4, 8, 8, 3) and batch.references.shape == (2, 8, 8, 3)
  for clip, label, origin in zip(batch.clips, batch.labels, batch.origins):
    video, start = origin.rsplit("@", 1)
    true_label, frames = videos[os.path.join(str(root), video)]
    assert label == true_label
    np.testing.assert_allclose(clip, frames[int(start):int(start) + 7:2] / 255.0, atol=1e-6)
