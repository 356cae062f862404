"""The one path layer: every file xlingo reads or writes goes through here, local or ``gs://``.

Built on ``etils.epath``, so a ``gs://bucket/run`` workdir behaves like a local directory for
every file the project owns (checkpoint metadata, data-iterator state, metrics, plots, reports,
vocabularies, corpus globs). Local paths are expanded (``~``) and made absolute; remote paths
(anything with ``://``) are left as they are and never touch the local disk, so no local
directory named ``gs:`` can appear.

Backend: ``xlingo/__init__.py`` sets ``EPATH_USE_TF=false``, so ``gs://`` goes through gcsfs
(fsspec) in production and under the tests' GCS emulator alike, never through TensorFlow's gfile.
Remote metadata queries (``exists``, ``isdir``, ``listdir``, ``glob``) drop gcsfs's listing cache
first, so they see what other processes wrote since.

Functions take and return ``str`` paths (``Path`` where a caller wants epath's methods).
"""

from __future__ import annotations

import errno
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


def _fsspec(path):
  """The fsspec filesystem epath itself uses for a remote path (one instance, one cache)."""
  from etils.epath import backend

  return backend.fsspec_backend.fs(os.fspath(path))


def _fresh(path) -> str:
  """``path`` resolved; for a remote path, gcsfs's cached listings of it are dropped first."""
  path = resolve(path)
  if is_remote(path):
    _fsspec(path).invalidate_cache(path)
  return path


def exists(path) -> bool:
  return epath.Path(_fresh(path)).exists()


def isdir(path) -> bool:
  return epath.Path(_fresh(path)).is_dir()


def isfile(path) -> bool:
  return epath.Path(_fresh(path)).is_file()


def makedirs(path) -> str:
  """Create a local directory and its parents; nothing for a remote one (object stores have no
  directories: writing a file under a prefix is what makes it appear)."""
  p = as_path(path)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
  return os.fspath(p)


def listdir(path) -> list[str]:
  """Names in a directory (not paths), sorted; [] when it does not exist."""
  p = epath.Path(_fresh(path))
  if not p.is_dir():
    return []
  return sorted(c.name for c in p.iterdir())


def open(path, mode: str = "r", **kwargs):  # noqa: A001 - the path layer's open
  if is_remote(path) and "a" in mode:
    raise ValueError(f"cannot append to {path}: objects in a bucket are written whole; use "
                     "paths.append_text")
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
  try:
    with tmp.open("wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    # A full disk must not also leave a half-written temporary behind.
    if tmp.exists():
      tmp.unlink()
    raise


def append_text(path, text: str, encoding: str = "utf-8") -> None:
  """Append to a file (created if missing). Local: an append and fsync, so a crash can tear at
  most the last line. Remote: objects cannot be appended to, so the whole file is rewritten in
  one upload (atomic, O(size)); callers that append often should batch (see MetricWriter)."""
  p = as_path(path)
  if is_remote(p):
    old = p.read_text(encoding=encoding) if exists(p) else ""
    p.write_text(old + text, encoding=encoding)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a", encoding=encoding) as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def create_new(path, data: bytes) -> bool:
  """Create ``path`` holding ``data`` only if nothing is there yet; True if this call created it.

  Atomic against every other writer: locally ``O_CREAT | O_EXCL``; on GCS an upload with the
  precondition ``ifGenerationMatch=0``, which the server refuses once the object exists. The
  primitive the workdir lock is built on.
  """
  path = resolve(path)
  if is_remote(path):
    if not path.startswith(("gs://", "gcs://")):
      raise NotImplementedError(f"create_new supports local and gs:// paths, not {path}")
    try:
      _fsspec(path).pipe_file(path, data, mode="create")
    except FileExistsError:  # gcsfs's translation of HTTP 412 (precondition failed)
      return False
    _fsspec(path).invalidate_cache(path)
    return True
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, data)
    os.fsync(fd)
  except BaseException:
    os.close(fd)
    os.unlink(path)
    raise
  os.close(fd)
  return True


def remove(path) -> None:
  """Remove a file; nothing if it is not there."""
  p = as_path(path)
  if exists(p):
    p.unlink()


def rmtree(path) -> None:
  """Remove a directory tree; nothing if it is not there."""
  p = as_path(path)
  if exists(p):
    p.rmtree()


def rename(src, dst) -> None:
  """Rename a file or directory (remote directories are copied then removed, not atomic)."""
  as_path(src).rename(as_path(dst))


def size(path) -> int:
  return int(as_path(path).stat().length)


def mtime(path) -> float:
  return float(as_path(path).stat().mtime)


def free_bytes(path) -> int | None:
  """Bytes free to this user on the disk holding ``path`` (or its nearest existing parent);
  None for a remote path (a bucket has no such limit)."""
  path = resolve(path)
  if is_remote(path):
    return None
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize


def is_disk_full(e: BaseException) -> bool:
  """True when ``e`` or anything it was raised from is 'no space left on device' (ENOSPC, or
  the same reported by tensorstore/Orbax in a message)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


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
  base = epath.Path(_fresh(root))
  if not base.exists():
    return []
  return sorted(os.fspath(p) for p in base.glob(rest))


def copy_file(src, dst) -> None:
  write_bytes(dst, read_bytes(src))


def walk_files(path) -> list[str]:
  """Every file under ``path``, as paths relative to it ('a/b.txt'), sorted."""
  root = epath.Path(_fresh(path))
  if not root.is_dir():
    return []
  # fsspec's walk yields remote directories without their 'gs://'; strip the same prefix.
  prefix = os.fspath(root).split("://", 1)[-1].rstrip("/")
  out = []
  for dirpath, _, filenames in root.walk():
    rel = os.fspath(dirpath).split("://", 1)[-1][len(prefix):].strip("/")
    out.extend(posixpath.join(rel, name) if rel else name for name in filenames)
  return sorted(out)


def copy_tree(src, dst) -> None:
  """Copy every file under ``src`` to the same relative place under ``dst`` (either side may
  be remote)."""
  for rel in walk_files(src):
    copy_file(join(resolve(src), *rel.split("/")), join(resolve(dst), *rel.split("/")))


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


def tree_size(path) -> int:
  """Total bytes of the files under ``path`` (a file: its size); 0 when it does not exist."""
  if not exists(path):
    return 0
  if not isdir(path):
    return size(path)
  return sum(size(join(resolve(path), *rel.split("/"))) for rel in walk_files(path))
