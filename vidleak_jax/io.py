"""Atomic file writers: temp file in the target's directory, flush + fsync, then os.replace.

A reader sees either the old file or the complete new one, never a partial write; on any
exception the temp file is removed and the previous content (if any) is left untouched.
Missing parent directories are created.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import zipfile
from typing import Any, BinaryIO, Iterator, NamedTuple

import numpy as np

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def _atomic_open(path: PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file that replaces `path` only if the `with` block completes."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  while True:  # O_EXCL + mode 0o666 lets the umask set permissions like a plain open().
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
      break
    except FileExistsError:
      continue
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_dir(parent)


def fsync_dir(directory: str) -> None:
  """Best-effort fsync of a directory so the rename itself is durable (POSIX only)."""
  if not hasattr(os, "O_DIRECTORY"):
    return
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> None:
  """Atomically writes `data` to `path`."""
  with _atomic_open(path) as f:
    f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
  """Atomically writes `text` to `path` (no newline translation)."""
  write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
  """Converts numpy/jax scalars and arrays to Python values; NaN and +/-Inf become None."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if obj is None or isinstance(obj, (bool, int, str)):
    return obj
  if isinstance(obj, dict):
    return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return to_jsonable(obj.item())
  if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")):
    return to_jsonable(np.asarray(obj).tolist())
  return obj  # Left for json to reject with a TypeError naming the type.


def _json_key(key: Any) -> Any:
  return key.item() if isinstance(key, np.generic) else key


def write_json(path: PathLike, obj: Any) -> None:
  """Atomically writes `obj` as JSON (indent=2, sorted keys, trailing newline).

  numpy/jax scalars and arrays become (nested) lists; non-finite floats (NaN, +/-Inf) are
  written as `null` so the output is strict JSON. Serialisation happens before any file is
  touched, so an unserialisable object raises TypeError and leaves `path` unchanged.
  """
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
  write_text(path, text + "\n")


def save_npz(path: PathLike, **arrays: Any) -> None:
  """Atomically writes `arrays` to an uncompressed .npz at exactly `path` (no suffix added).

  Object-dtype arrays are rejected with ValueError since `load_npz` refuses pickled data.
  """
  converted = {name: np.asarray(a) for name, a in arrays.items()}
  for name, a in converted.items():
    if a.dtype.hasobject:
      raise ValueError(f"save_npz({os.fspath(path)!r}): array {name!r} has object dtype")
  with _atomic_open(path) as f:  # A file object stops np.savez from appending ".npz".
    np.savez(f, **converted)


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """Loads every array of an .npz (allow_pickle=False); ValueError naming `path` on failure."""
  path = os.fspath(path)
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # Missing, truncated, not a zip, pickled payload, bad header...
    raise ValueError(f"cannot load {path!r}: {type(e).__name__}: {e}") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"cannot load {path!r}: not an .npz archive")
  try:
    with data:
      return {name: np.asarray(data[name]) for name in data.files}
  except Exception as e:  # Object (pickled) members, corrupt members, bad CRC...
    raise ValueError(f"cannot load {path!r}: {type(e).__name__}: {e}") from e


class ArrayHeader(NamedTuple):
  """What an .npy header declares: the array's shape and dtype (its data not read)."""

  shape: tuple[int, ...]
  dtype: np.dtype


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def npz_headers(path: PathLike) -> dict[str, ArrayHeader]:
  """{name: ArrayHeader} of every array of an .npz, read from the zip's member headers only: no
  array data is read or allocated, so the caller can refuse names, shapes or sizes first.

  ValueError naming `path` (and the member) for a missing file or one that is not a zip archive
  (e.g. a pickle), a member that is not a .npy array, a duplicate name, a header of an unsupported
  .npy version or a corrupt one, and object dtypes (their data would be pickled).
  """
  path = os.fspath(path)
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:  # a pickle, a bare .npy, a truncated archive...
    raise ValueError(f"cannot load {path!r}: not an .npz archive ({e})") from e
  except OSError as e:  # missing, unreadable
    raise ValueError(f"cannot load {path!r}: {type(e).__name__}: {e}") from e
  headers: dict[str, ArrayHeader] = {}
  with archive:
    for info in archive.infolist():
      member = info.filename
      name = member[:-len(".npy")] if member.endswith(".npy") else None
      if name is None or name in headers:
        what = "is not a .npy array" if name is None else "is a duplicate"
        raise ValueError(f"cannot load {path!r}: member {member!r} {what}")
      try:
        with archive.open(info) as f:
          version = np.lib.format.read_magic(f)
          if version not in _HEADER_READERS:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
          shape, _, dtype = _HEADER_READERS[version](f)
      except Exception as e:  # bad magic, corrupt header, bad zip entry, encrypted member...
        raise ValueError(f"cannot load {path!r}: array {name!r}: {type(e).__name__}: {e}") from e
      if dtype.hasobject:
        raise ValueError(f"cannot load {path!r}: array {name!r} has object dtype {dtype} "
                         "(pickled data is refused)")
      headers[name] = ArrayHeader(tuple(int(n) for n in shape), dtype)
  return headers
