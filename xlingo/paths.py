"""The one path layer: every file xlingo reads or writes goes through here, local or ``gs://``.

Built on ``etils.epath``, so a ``gs://bucket/run`` workdir behaves like a local directory for
every file the project owns (checkpoint metadata, data-iterator state, metrics, plots, reports,
vocabularies, corpus globs). Local paths are expanded (``~``) and made absolute; remote paths
(anything with ``://``) are left as they are and never touch the local disk, so no local
directory named ``gs:`` can appear.

Functions take and return ``str`` paths (``Path`` where a caller wants epath's methods).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Iterable

from etils import epath

Path = epath.Path


def is_remote(path) -> bool:
  """True for a URL-style path (``gs://...``), False for a local one."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """A local path expanded and made absolute; a remote path unchanged (no trailing slash)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(os.path.expanduser(path))


def as_path(path) -> epath.Path:
  return epath.Path(resolve(path))


def join(base, *parts: str) -> str:
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def basename(path) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/"))


def dirname(path) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def exists(path) -> bool:
  return as_path(path).exists()


def isdir(path) -> bool:
  return as_path(path).is_dir()


def isfile(path) -> bool:
  return as_path(path).is_file()


def makedirs(path) -> str:
  p = as_path(path)
  p.mkdir(parents=True, exist_ok=True)
  return os.fspath(p)


def listdir(path) -> list[str]:
  """Names in a directory (not paths), sorted; [] when it does not exist."""
  p = as_path(path)
  if not p.is_dir():
    return []
  return sorted(c.name for c in p.iterdir())


def open(path, mode: str = "r", **kwargs):  # noqa: A001 - the path layer's open
  return as_path(path).open(mode, **kwargs)


def read_text(path, encoding: str = "utf-8") -> str:
  return as_path(path).read_text(encoding=encoding)


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def write_text(path, text: str, encoding: str = "utf-8") -> None:
  """Write a whole file atomically: readers see the old or the new content, never a part.

  Local: a temporary sibling then ``os.replace``. Remote: one object upload (atomic on GCS).
  """
  write_bytes(path, text.encode(encoding))


def write_bytes(path, data: bytes) -> None:
  p = as_path(path)
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
  with tmp.open("wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def remove(path) -> None:
  """Remove a file; nothing if it is not there."""
  p = as_path(path)
  if p.exists():
    p.unlink()


def rmtree(path) -> None:
  """Remove a directory tree; nothing if it is not there."""
  p = as_path(path)
  if p.exists():
    p.rmtree()


def rename(src, dst) -> None:
  """Rename a file or directory (remote directories are copied then removed, not atomic)."""
  as_path(src).rename(as_path(dst))


def size(path) -> int:
  return int(as_path(path).stat().length)


def mtime(path) -> float:
  return float(as_path(path).stat().mtime)


def has_glob(pattern: str) -> bool:
  return any(ch in pattern for ch in "*?[")


def glob(pattern) -> list[str]:
  """Sorted paths matching ``pattern`` (``*``, ``?``, ``[..]`` in any component; no ``**``,
  which epath refuses because on GCS it lists whole buckets)."""
  pattern = resolve(pattern)
  if not has_glob(pattern):
    return [pattern] if exists(pattern) else []
  parts = pattern.split("/")
  i = next(k for k, part in enumerate(parts) if has_glob(part))
  root = "/".join(parts[:i]) or "/"
  rest = "/".join(parts[i:])
  base = epath.Path(root)
  if not base.exists():
    return []
  return sorted(os.fspath(p) for p in base.glob(rest))


def copy_file(src, dst) -> None:
  write_bytes(dst, read_bytes(src))


def copy_tree(src, dst) -> None:
  """Copy every file under ``src`` to the same relative place under ``dst`` (either side may
  be remote)."""
  src_p = as_path(src)
  for dirpath, _, filenames in src_p.walk():
    rel = os.fspath(dirpath)[len(os.fspath(src_p)):].lstrip("/")
    for name in filenames:
      copy_file(join(os.fspath(dirpath), name), join(resolve(dst), rel, name) if rel
                else join(resolve(dst), name))


def match_any(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatch(name, p) for p in patterns)


def local_copy(path, cache_dir: str | None = None) -> str:
  """A local file with the content of ``path``: ``path`` itself (resolved) when it is local,
  else a copy in a local cache named by the content's SHA-1, so it is never stale. For
  libraries that read only local files or go through tf.io.gfile (SentencePiece, seqio's
  vocabulary), which cannot reach every store the path layer can."""
  import hashlib
  import tempfile

  if not is_remote(path):
    return resolve(path)
  data = read_bytes(path)
  name = hashlib.sha1(data).hexdigest() + posixpath.splitext(basename(path))[1]
  local = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "xlingo-cache"), name)
  if not exists(local):
    write_bytes(local, data)
  return local
