"""`ucf101`: clips of UCF101 action videos with the official train/test splits 1, 2 and 3.

Expected manual dir (the official archives extracted side by side):
  UCF-101/<Class>/v_<Class>_gXX_cYY.avi
  ucfTrainTestlist/classInd.txt      "1 ApplyEyeMakeUp"
  ucfTrainTestlist/trainlist0N.txt   "ApplyEyeMakeUp/v_ApplyEyeMakeUp_g08_c01.avi 1"
  ucfTrainTestlist/testlist0N.txt    "ApplyEyeMakeUp/v_ApplyEyeMakeUp_g01_c01.avi"
Labels are 0-based (classInd index - 1) and taken from a listed video's class folder; paths
are matched case-insensitively (the official lists and files disagree on case, e.g.
`HandstandPushups/v_HandStandPushups_g01_c01.avi`).

This builder is not added to the TFDS catalog, whose own (TensorFlow-based) `ucf101` builder
owns that name; use `vidleak_jax.data.tfds.load("ucf101", ...)` or `Ucf101(...)` directly.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from etils import epath

from vidleak_jax.data.tfds import common

VIDEO_DIRS = ("UCF-101", "UCF101")
LIST_DIR = "ucfTrainTestlist"
_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)


@dataclasses.dataclass(eq=False)
class Ucf101Config(common.VideoClipConfig):
  """Clip sampling plus the official split number (1, 2 or 3)."""
  split_number: int = 1

  def __post_init__(self) -> None:
    if self.split_number not in (1, 2, 3):
      raise ValueError(f"split_number must be 1, 2 or 3, got {self.split_number!r}")
    super().__post_init__()

  def default_name(self) -> str:
    return f"split{self.split_number}_" + super().default_name()


def _lines(path: epath.Path) -> list[list[str]]:
  """Whitespace-split fields of the non-empty lines of a list file (CRLF tolerated)."""
  text = path.read_bytes().decode("utf-8-sig", errors="replace")
  return [line.split() for line in text.splitlines() if line.strip()]


def read_class_names(path: epath.Path) -> list[str]:
  """Class names in label order from classInd.txt ("<1-based index> <Class>" lines)."""
  entries = sorted((int(fields[0]), fields[1]) for fields in _lines(path))
  if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
    raise ValueError(f"{path}: class indices must be 1..N, got {[i for i, _ in entries]}")
  return [name for _, name in entries]


def scene_of(rel: str) -> str:
  """Scene id `<Class>_gXX` of a UCF101 video (group ids restart in every class)."""
  cls, name = rel.split("/")[-2:]
  group = _GROUP.search(name)
  return f"{cls}_g{int(group.group(1)):02d}" if group else epath.Path(name).stem


class Ucf101(common.VideoClipBuilder, skip_registration=True):
  """UCF101 (101 human action classes) as fixed-length clips; scene = class and group gXX
  (videos of one group share actor and background)."""

  name = "ucf101"
  BUILDER_CONFIGS = [Ucf101Config(split_number=n) for n in (1, 2, 3)]
  DESCRIPTION = "UCF101 action recognition videos cut into fixed-length clips."
  HOMEPAGE = "https://www.crcv.ucf.edu/data/UCF101.php"
  CITATION = """\
@article{soomro2012ucf101,
  title={{UCF101}: A Dataset of 101 Human Actions Classes From Videos in The Wild},
  author={Soomro, Khurram and Zamir, Amir Roshan and Shah, Mubarak},
  journal={arXiv preprint arXiv:1212.0402},
  year={2012}
}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Extract UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip into the manual dir, giving
  {VIDEO_DIRS[0]}/<Class>/v_<Class>_gXX_cYY.avi and {LIST_DIR}/classInd.txt,
  trainlist0N.txt, testlist0N.txt.
  """

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    root = epath.Path(dl_manager.manual_dir)
    number = self.builder_config.split_number
    lists = root / LIST_DIR if (root / LIST_DIR).is_dir() else root
    files = {"classes": lists / "classInd.txt", "train": lists / f"trainlist0{number}.txt",
             "test": lists / f"testlist0{number}.txt"}
    videos = next((root / d for d in VIDEO_DIRS if (root / d).is_dir()), None)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing or videos is None:
      missing += [] if videos else [f"{root / VIDEO_DIRS[0]}/ (video folder)"]
      raise FileNotFoundError(f"UCF101 manual dir {root} lacks: {', '.join(missing)}")
    names = read_class_names(files["classes"])
    self._set_class_names(names)
    labels = {name.lower(): i for i, name in enumerate(names)}
    on_disk = {p.relative_to(root).as_posix().lower(): p.relative_to(root).as_posix()
               for p in common.list_videos(videos)}
    prefix = videos.relative_to(root).as_posix()
    splits = {}
    for split in ("train", "test"):
      items = []
      for fields in _lines(files[split]):
        rel = fields[0].replace("\\", "/").removeprefix("./")
        label = labels.get(rel.split("/")[0].lower()) if "/" in rel else None
        found = on_disk.get(f"{prefix}/{rel}".lower())
        if label is None or found is None:
          self._num_videos += 1
          why = "has no class in classInd.txt" if label is None else "is not on disk"
          self.skip(rel, split, f"listed in {files[split].name} but {why}")
          continue
        items.append(common.VideoItem(found, label, scene_of(found)))
      splits[split] = self._generate_examples(root, items, split)
    return splits
