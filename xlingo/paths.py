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

import builtins
import errno
import fnmatch
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable

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


def check_writable(path) -> None:
  """Raise OSError (with ``strerror``) unless a file can be written at ``path``, before the work
  that would produce it: its directory is created if missing, a probe file written and removed
  beside it; ``path`` itself is not touched."""
  path = resolve(path)
  if isdir(path):
    raise IsADirectoryError(errno.EISDIR, "it is a directory")
  parent = dirname(path)
  makedirs(parent)
  if not isdir(parent) and not is_remote(parent):
    raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a directory")
  probe = join(parent, f".{basename(path)}.probe-{os.getpid()}")
  write_text(probe, "")
  remove(probe)


# --- storage calls that fail or stall --------------------------------------------------------

# Signs of a store that is away for a while (a restart, 429/503, a dropped connection): the
# exception types and the words gcsfs, aiohttp, tensorstore and Orbax report them with.
_TRANSIENT_TYPES = ("ConnectionError", "TimeoutError", "ClientConnectorError", "ClientOSError",
                    "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError",
                    "StorageStall")
_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection refused", "Couldn't connect",
                    "Could not connect", "connection reset", "Connection reset", "timed out",
                    "Timeout was reached", "Server disconnected", "Service Unavailable",
                    "Too Many Requests", "Bad Gateway", "Gateway Timeout", " 503", " 502",
                    " 504", " 429", "code=503", "code=429", "Empty reply from server")


class StorageStall(TimeoutError):
  """A storage call that did not return within its time limit (a store that stopped answering)."""


class StorageGaveUp(Exception):
  """Storage stayed unusable for the whole retry window (or a stop request came meanwhile).

  ``since``: when the trouble began (time.time()); ``cause``: the last error, in one line;
  ``stopped``: True when a stop request (SIGTERM) ended the waiting, not the window."""

  def __init__(self, what: str, since: float, cause: str, stopped: bool = False):
    super().__init__(f"{what}: {cause}")
    self.what, self.since, self.cause, self.stopped = what, since, cause, stopped


def is_transient(e: BaseException) -> bool:
  """True when ``e`` or anything it was raised from says the store is away for a while, not
  that the request is wrong (a missing bucket, no permission, a full disk)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    names = {t.__name__ for t in type(e).__mro__}
    if names & set(_TRANSIENT_TYPES):
      return True
    code = getattr(e, "code", None) or getattr(e, "status", None)
    if isinstance(code, int) and (code in (408, 429) or 500 <= code < 600):
      return True
    if any(w in str(e) for w in _TRANSIENT_WORDS):
      return True
    e = e.__cause__ or e.__context__
  return False


def call_with_timeout(fn: Callable, timeout_s: float, abort: Callable[[], bool] | None = None,
                      grace_s: float = 0.0):
  """``fn()`` in a worker thread: its result or its exception, or StorageStall once it has run
  ``timeout_s`` (or ``grace_s`` after ``abort()`` turned true). For calls that take no timeout
  of their own (Orbax, gcsfs' sync wrappers): a stalled call is left behind in its daemon
  thread, and the caller goes on (or stops) in bounded time."""
  box: dict = {}

  def work():
    try:
      box["value"] = fn()
    except BaseException as e:  # noqa: BLE001 - handed to the calling thread
      box["error"] = e

  thread = threading.Thread(target=work, name="xlingo-storage-call", daemon=True)
  start = time.monotonic()
  thread.start()
  deadline = start + timeout_s
  while True:
    # Short waits keep the calling (main) thread free to run signal handlers.
    thread.join(min(0.2, max(deadline - time.monotonic(), 0.0)))
    if not thread.is_alive():
      break
    now = time.monotonic()
    if abort is not None and abort():
      deadline = min(deadline, now + grace_s)
      abort = None
    if now >= deadline:
      raise StorageStall(f"no answer from the store for {now - start:.0f} s")
  if "error" in box:
    raise box["error"]
  return box.get("value")


class Retrying:
  """Storage calls retried with backoff while the store is away, for at most ``retry_s``.

  ``run(fn, what)`` bounds each try (``call_with_timeout``), retries transient errors and
  stalls (``is_transient``; for a local path nothing is transient: a disk does not come back by
  itself) and raises ``give_up(StorageGaveUp)`` (default: the StorageGaveUp) once ``retry_s``
  passed since the call began, or once ``abort()`` (a stop request) is true.
  ``on_retry(what, error, waited_s, left_s)`` reports each retry. ``again=False``: one bounded
  try, then the same give-up (where one process alone must not try again).
  ``recover()``, when given to ``run``, runs before each retry, inside its time bound (e.g. to
  replace a client whose state the failure may have broken)."""

  GRACE_S = 15.0  # how long a call may still finish once a stop was requested
  MAX_DELAY_S = 30.0

  def __init__(self, retry_s: float, *, remote: bool, abort: Callable[[], bool] | None = None,
               on_retry: Callable | None = None,
               give_up: Callable[[StorageGaveUp], BaseException] | None = None,
               again: bool = True):
    self.retry_s = float(retry_s)
    self.again = again
    self.give_up = give_up or (lambda e: e)
    self.remote = remote
    self.abort = abort or (lambda: False)
    self.on_retry = on_retry
    if remote:
      # gcsfs logs each request that ran out of its own retries with a traceback, then raises:
      # the error is retried (or reported in one line) here.
      logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

  def run(self, fn: Callable, what: str, recover: Callable | None = None):
    if not self.remote:
      return fn()
    first: float | None = None
    first_mono = time.monotonic()
    delay = 1.0
    while True:
      limit = self.retry_s - (time.monotonic() - first_mono)
      began = time.time()
      attempt = fn if first is None or recover is None else lambda: (recover(), fn())[1]
      try:
        return call_with_timeout(attempt, max(limit, 1.0), self.abort, self.GRACE_S)
      except Exception as e:  # noqa: BLE001 - sorted: transient ones are retried
        if not is_transient(e):
          raise
        if first is None:
          first = began
        cause = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        waited = time.monotonic() - first_mono
        if self.abort() or waited >= self.retry_s or not self.again:
          raise self.give_up(StorageGaveUp(what, first, cause, stopped=self.abort())) from None
        if self.on_retry is not None:
          self.on_retry(what, cause, waited, self.retry_s - waited)
        pause = min(delay, self.retry_s - waited)
        end = time.monotonic() + pause
        while time.monotonic() < end and not self.abort():
          time.sleep(0.1)
        delay = min(delay * 2, self.MAX_DELAY_S)


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


def cache_dir() -> str:
  """The local directory of files derived from others (copies of remote files, line indexes):
  ``<tmp>/xlingo-cache``. Anything in it can be rebuilt."""
  import tempfile

  return os.path.join(tempfile.gettempdir(), "xlingo-cache")


_default_cache_dir = cache_dir  # what local_copy's parameter of that name shadows


def _streamed_copy(path, directory: str, chunk: int = 16 << 20) -> tuple[str, str]:
  """Copies remote ``path`` into a temporary file in local ``directory``, ``chunk`` bytes at a
  time (never a whole large object in memory): (the temporary file, the content's SHA-1)."""
  import hashlib

  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{basename(path)}.tmp.{os.getpid()}")
  digest = hashlib.sha1()
  try:
    with as_path(path).open("rb") as src, builtins.open(tmp, "wb") as dst:
      for block in iter(lambda: src.read(chunk), b""):
        digest.update(block)
        dst.write(block)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return tmp, digest.hexdigest()


def _settle(tmp: str, local: str) -> str:
  """Moves a finished copy to ``local`` (a copy already there is the same: the name says so)."""
  if os.path.exists(local):
    os.remove(tmp)
  else:
    os.replace(tmp, local)
  return local


def local_mirror(path) -> str:
  """A local file with the content of ``path``, for random access by offset: ``path`` itself
  (resolved) when it is local; else a copy in :func:`cache_dir` named by the path, size and
  modification time (so a changed object is copied again, and an unchanged one is not read
  again): one streamed pass over the object instead of a range request per line."""
  import hashlib

  if not is_remote(path):
    return resolve(path)
  key = f"{resolve(path)}\0{size(path)}\0{mtime(path)}".encode()
  directory = os.path.join(cache_dir(), "mirror")
  local = os.path.join(directory,
                       hashlib.sha1(key).hexdigest()[:24] + posixpath.splitext(basename(path))[1])
  if os.path.exists(local):
    return local
  return _settle(_streamed_copy(path, directory)[0], local)


def mapped(path):
  """A read-only memory map of a local file (bytes-like; slicing reads the page cache, no copy
  of the file in memory); an empty file maps to ``b""``."""
  import mmap

  with builtins.open(resolve(path), "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      return b""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def local_copy(path, cache_dir: str | None = None) -> str:
  """A local file with the content of ``path``: ``path`` itself (resolved) when it is local,
  else a copy in a local cache named by the content's SHA-1, so it is never stale. For
  libraries that read only local files or go through tf.io.gfile (SentencePiece, seqio's
  vocabulary, safetensors, GGUF), which cannot reach every store the path layer can. The copy
  is streamed, so a multi-GB shard is never held in memory."""
  if not is_remote(path):
    return resolve(path)
  directory = cache_dir or _default_cache_dir()
  tmp, digest = _streamed_copy(path, directory)
  return _settle(tmp, os.path.join(directory, digest + posixpath.splitext(basename(path))[1]))


def tree_size(path) -> int:
  """Total bytes of the files under ``path`` (a file: its size); 0 when it does not exist."""
  if not exists(path):
    return 0
  if not isdir(path):
    return size(path)
  return sum(size(join(resolve(path), *rel.split("/"))) for rel in walk_files(path))
