"""`ucf_crime`: clips of the UCF-Crime surveillance videos (13 anomaly classes + Normal).

Splits follow the official anomaly-detection split files `Anomaly_Train.txt` and
`Anomaly_Test.txt` (one video path per line, e.g. `Abuse/Abuse001_x264.mp4` or
`Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4`). A listed path that is not at that
place under the manual dir is looked up by file name anywhere below it (so the archive's
`Anomaly-Videos-Part-1/Abuse/...` layout works), then by file name without extension (for
re-encoded copies, e.g. `.mkv`).
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any

from etils import epath

from vidleak_jax.data.tfds import common

ANOMALY_CLASSES = ("Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting",
                   "RoadAccidents", "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism")
CLASS_NAMES = ANOMALY_CLASSES + ("Normal",)
SPLIT_FILES = {"train": "Anomaly_Train.txt", "test": "Anomaly_Test.txt"}
NORMAL_FOLDERS = ("Training_Normal_Videos_Anomaly", "Testing_Normal_Videos_Anomaly",
                  "Normal_Videos_event")

_KEYS = {re.sub(r"[^a-z]", "", name.lower()): i for i, name in enumerate(CLASS_NAMES)}
_PREFIX = re.compile(r"^([A-Za-z]+(?:_Videos)?)")


def _norm(text: str) -> str:
  return re.sub(r"[^a-z]", "", text.lower())


def label_of(rel: str) -> int | None:
  """Class index of a listed video from its file-name prefix (`Abuse001_x264` -> Abuse,
  `Normal_Videos_003_x264` -> Normal) or else its folders; None if neither names a class."""
  parts = rel.split("/")
  prefix = _PREFIX.match(parts[-1])
  for name in ([prefix.group(1)] if prefix else []) + parts[-2::-1]:
    key = _norm(name)
    if key in _KEYS:
      return _KEYS[key]
    if key.startswith("normal") or "normalvideos" in key:
      return CLASS_NAMES.index("Normal")
  return None


def parse_split_file(text: str) -> list[str]:
  """Video paths listed in a split file: first field of each non-empty, non-comment line,
  '/'-separated, without a leading './'; duplicates dropped (first kept)."""
  videos: dict[str, None] = {}
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    rel = line.split()[0].replace("\\", "/")
    while rel.startswith("./"):
      rel = rel[2:]
    videos[rel.lstrip("/")] = None
  return list(videos)


def find_split_files(root: epath.Path) -> dict[str, epath.Path]:
  """{split: path} of the official split files, the shallowest match (any case) below `root`."""
  wanted = {name.lower(): split for split, name in SPLIT_FILES.items()}
  found: dict[str, epath.Path] = {}
  for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda w: w[0].count(os.sep)):
    del dirnames
    for filename in sorted(filenames):
      split = wanted.get(filename.lower())
      if split and split not in found:
        found[split] = epath.Path(dirpath) / filename
  return found


class _Locator:
  """Finds listed videos below the manual dir: exact path, then file name, then stem."""

  def __init__(self, root: epath.Path):
    self.root = root
    self._by_name: dict[str, list[str]] | None = None
    self._by_stem: dict[str, list[str]] = collections.defaultdict(list)

  def _index(self) -> None:
    self._by_name = collections.defaultdict(list)
    for path in common.list_videos(self.root):
      rel = path.relative_to(self.root).as_posix()
      self._by_name[path.name.lower()].append(rel)
      self._by_stem[path.stem.lower()].append(rel)

  def __call__(self, rel: str) -> str | None:
    if (self.root / rel).is_file():
      return rel
    if self._by_name is None:
      self._index()
    name = rel.rsplit("/", 1)[-1]
    matches = self._by_name.get(name.lower()) or self._by_stem.get(
        epath.Path(name).stem.lower()) or []
    parent = rel.rsplit("/", 1)[0].lower() if "/" in rel else ""
    same_parent = [m for m in matches if m.lower().rsplit("/", 2)[-2:-1] == [parent]]
    return (same_parent or matches or [None])[0]


class UcfCrime(common.VideoClipBuilder):
  """UCF-Crime surveillance videos as fixed-length clips; label 13 is Normal. The scene of a
  clip is its video's file name without extension (the dataset gives no camera ids)."""

  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = ("UCF-Crime: 1900 untrimmed real-world surveillance videos of 13 anomaly "
                 "classes and normal activity, cut into fixed-length clips.")
  HOMEPAGE = "https://www.crcv.ucf.edu/projects/real-world/"
  CITATION = """\
@inproceedings{sultani2018real,
  title={Real-world Anomaly Detection in Surveillance Videos},
  author={Sultani, Waqas and Chen, Chen and Shah, Mubarak},
  booktitle={CVPR},
  year={2018}
}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Extract UCF-Crime into the manual dir: class folders {', '.join(ANOMALY_CLASSES)}, the normal
  videos ({', '.join(NORMAL_FOLDERS)}), and the official split files
  {SPLIT_FILES['train']} and {SPLIT_FILES['test']} (anywhere below the manual dir).
  """

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    root = epath.Path(dl_manager.manual_dir)
    files = find_split_files(root)
    missing = [name for split, name in SPLIT_FILES.items() if split not in files]
    if missing:
      raise FileNotFoundError(
          f"UCF-Crime split file(s) {', '.join(missing)} not found below {root}; expected the "
          f"official {SPLIT_FILES['train']} and {SPLIT_FILES['test']} (one video path per "
          "line, e.g. 'Abuse/Abuse001_x264.mp4').")
    locate = _Locator(root)
    return {split: self._generate_examples(root, self._items(locate, path, split), split)
            for split, path in files.items()}

  def _items(self, locate: _Locator, split_file: epath.Path, split: str
             ) -> list[common.VideoItem]:
    """The videos listed in one split file; unknown classes and missing files are skipped."""
    items = []
    text = split_file.read_bytes().decode("utf-8-sig", errors="replace")
    for rel in parse_split_file(text):
      label, found = label_of(rel), locate(rel)
      if label is None or found is None:
        self._num_videos += 1
        why = "names no UCF-Crime class" if label is None else "is not below the manual dir"
        self.skip(rel, split, f"listed in {split_file.name} but {why}")
        continue
      items.append(common.VideoItem(found, label, epath.Path(found).stem))
    return items
