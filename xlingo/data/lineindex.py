"""Line files read in a seeded global permutation: the line index and the permuted stream.

Training on line files (``data.source`` ``files`` or ``embedded``, ``data.group_size`` > 0)
reads each task's lines in a pseudo-random order over the whole of its files, a new order each
epoch, so that the first N examples of any run are a uniform sample of every file (a short run
used to read the start of each file: docs/SCIENCE.md (a)).

**The index.** A file's non-blank lines (readers.is_blank) as byte offsets: where each starts
and where its "\\n" is (or the end of the file), two int64 per line. Built in one streamed pass
over the file (a few MB at a time), with the SHA-1 of its content, and kept for the process;
with ``data.line_index_dir`` set (local or ``gs://``, e.g. one bucket folder for every host)
also as a sidecar there, named by the file's path, that records the file's size, modification
time and content hash. (Not by default: a run on a ``gs://`` workdir leaves nothing on its
machine, and the token counts, counts.py, read every file at every start anyway.) A
later run whose file has the same size and modification time reuses the sidecar; a file
whose size or modification time differs is re-indexed with a one-line warning (saying whether
its content changed), never read with stale offsets.
While a stream reads, each line read must lie between the two "\\n" its index records (or the
file's start and end), with none inside, and the files' size and modification time are checked
again every ``RECHECK_S`` seconds; a mismatch re-indexes the file (the same warning) and the
read is done again on the new index. (A file cut shorter in place while it is being read can
still end the process: the memory map's pages past the new end are gone. Replace files rather
than rewrite them in place during a run.)

Sixteen bytes per line are held in memory, against the ~50-200 bytes of text per line of a
typical corpus (the text itself is never read into memory whole: lines are gathered from a
memory map, i.e. the page cache). ``gs://`` files are copied once to a local mirror
(``paths.local_mirror``, streamed, named by path, size and modification time) and read by
offset there: a range request per line would cost a round trip per example.

**The permutation.** Line i of epoch e of a stream is its files' line ``permute(i)``, a
4-round Feistel network over the smallest even power of two >= the line count, keyed by
(seed, stream salt, epoch), with cycle walking to stay below the count. It is computed on the
fly, ``CHUNK`` positions at a time: nothing of size N is made per epoch (a NumPy permutation
would be 8 bytes per line, rebuilt at every epoch boundary), and the position alone says what
comes next. A stream's state is (epoch, position): it resumes exactly, and every process or
host that builds the same stream over the same files reads the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
import zlib
from collections.abc import Sequence

import numpy as np

from xlingo import paths
from xlingo.errors import DataError

INDEX_VERSION = 1
_SCAN_BYTES = 4 << 20
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip removes (readers.is_blank)


@dataclasses.dataclass(frozen=True)
class LineIndex:
  """Where the non-blank lines of ``path`` are in ``local`` (``path`` or its local mirror)."""

  path: str
  local: str
  size: int
  mtime: float
  sha1: str
  starts: np.ndarray  # int64: first byte of each non-blank line
  ends: np.ndarray  # int64: its "\n" (or the file's size for a last line without one)
  crlf: bool  # some line ends "\r\n" (its "\r" is dropped)

  def __len__(self) -> int:
    return int(self.starts.shape[0])


def _scan(local: str) -> tuple[np.ndarray, np.ndarray, bool, str]:
  """(starts, ends, crlf, SHA-1) of the non-blank lines of a local file, in one streamed
  pass."""
  digest = hashlib.sha1()
  starts, ends = [], []
  base, carry, crlf = 0, b"", False
  with paths.open(local, "rb") as f:
    while True:
      data = f.read(_SCAN_BYTES)
      digest.update(data)
      buf = carry + data
      if not buf:
        break
      arr = np.frombuffer(buf, np.uint8)
      nl = np.flatnonzero(arr == 10)
      if not data:  # the file's last line, without a "\n"
        nl = np.append(nl, len(buf))
      if nl.size:
        s = np.concatenate([[0], nl[:-1] + 1])
        text = np.zeros(len(buf) + 1, np.int64)
        np.cumsum(~_WHITESPACE[arr], out=text[1:])
        keep = text[nl] > text[s]
        crlf = crlf or bool((arr[np.maximum(nl[keep] - 1, 0)] == 13).any())
        starts.append(s[keep] + base)
        ends.append(nl[keep] + base)
        cut = int(nl[-1]) + 1
        base, carry = base + cut, buf[cut:]
      else:
        carry = buf
      if not data:
        break
  cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64))
  return cat(starts), cat(ends), crlf, digest.hexdigest()


def _sidecar(path: str, index_dir: str) -> str:
  return paths.join(index_dir, hashlib.sha1(path.encode()).hexdigest()[:24] + ".npz")


def _load_sidecar(path: str, index_dir: str) -> LineIndex | None:
  if not index_dir:
    return None
  side = _sidecar(path, index_dir)
  try:
    with np.load(io.BytesIO(paths.read_bytes(side))) as z:
      meta = json.loads(bytes(z["meta"]).decode())
      if meta.get("version") != INDEX_VERSION or meta.get("path") != path:
        return None
      return LineIndex(path, "", int(meta["size"]), float(meta["mtime"]), meta["sha1"],
                       z["starts"], z["ends"], bool(meta["crlf"]))
  except (OSError, ValueError, KeyError, EOFError):  # absent or unreadable: built again
    return None


def _save_sidecar(ix: LineIndex, index_dir: str) -> None:
  if not index_dir:
    return
  meta = {"version": INDEX_VERSION, "path": ix.path, "size": ix.size, "mtime": ix.mtime,
          "sha1": ix.sha1, "crlf": ix.crlf}
  buf = io.BytesIO()
  np.savez(buf, starts=ix.starts, ends=ix.ends,
           meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
  try:
    paths.write_bytes(_sidecar(ix.path, index_dir), buf.getvalue())
  except OSError as e:  # a read-only cache costs a re-index per process, nothing else
    logging.info("line index of %s not cached (%s)", ix.path, e)


_MEMO: dict[str, LineIndex] = {}
_LOCK = threading.Lock()


def line_index(path: str, stale: str | None = None, index_dir: str = "") -> LineIndex:
  """The index of ``path`` (module docstring): this process's, the sidecar in ``index_dir``
  (when given), or built now. ``stale``: why the caller found the index it holds wrong
  (rebuilt, with a warning)."""
  path = paths.resolve(path)
  size, mtime = paths.size(path), paths.mtime(path)
  with _LOCK:
    old = _MEMO.get(path) or _load_sidecar(path, index_dir)
    if old is not None and stale is None and (old.size, old.mtime) == (size, mtime):
      if not old.local:
        old = dataclasses.replace(old, local=paths.local_mirror(path))
      _MEMO[path] = old
      return old
    local = paths.local_mirror(path)
    starts, ends, crlf, sha1 = _scan(local)
    new = LineIndex(path, local, size, mtime, sha1, starts, ends, crlf)
    if old is not None:
      why = stale or f"size {old.size} -> {size} bytes, modified {old.mtime:.0f} -> {mtime:.0f}"
      same = "content unchanged" if sha1 == old.sha1 else f"{len(old)} -> {len(new)} lines"
      logging.warning("%s changed since its line index was built (%s; %s): re-indexed", path,
                      why, same)
    _MEMO[path] = new
    _save_sidecar(new, index_dir)
    return new


# --- the permutation --------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """A 64-bit integer hash (splitmix64's finaliser): every output bit depends on every input
  bit, which is what a Feistel round function needs."""
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
  """Positions ``i`` (< n) -> their images under a keyed permutation of [0, n) (module
  docstring): a Feistel network of ``len(key)`` rounds over the 2^b values of b = n's bit
  length (halves of ceil(b/2) and floor(b/2) bits, which trade places each round), walking
  the cycle until the value is below n (fewer than 2 steps on average: 2^b < 2n)."""
  b = max(2, (n - 1).bit_length())
  widths = (b - b // 2, b // 2)  # (high, low) bits
  keys = [np.uint64(k) for k in key]
  with np.errstate(over="ignore"):

    def encrypt(x):
      hi_w, lo_w = widths
      for k in keys:
        hi, lo = x >> np.uint64(lo_w), x & np.uint64((1 << lo_w) - 1)
        # (hi, lo) -> (lo, hi ^ F(lo)): a bijection whatever the two widths
        x = (lo << np.uint64(hi_w)) | (hi ^ (_mix(lo ^ k) & np.uint64((1 << hi_w) - 1)))
        hi_w, lo_w = lo_w, hi_w
      return x

    x = encrypt(np.asarray(i, np.uint64))
    out = np.flatnonzero(x >= np.uint64(n))
    while out.size:
      x[out] = encrypt(x[out])
      out = out[x[out] >= np.uint64(n)]
  return x.astype(np.int64)


def salt(*parts: str) -> int:
  """A stream's salt from names that identify it (its language, its files' kind): stable
  across processes and runs, unlike Python's ``hash``."""
  return zlib.crc32("\0".join(parts).encode())


class PermutedLines:
  """The non-blank lines of ``files`` (one task's, this process's share) in a permutation of
  all of them per epoch (module docstring), ``group_size`` at a time. Groups run on across an
  epoch's end, so every group is full.

  A host stream for readers.GroupReader: :meth:`take` (in order: the next group's line
  numbers, advancing the state), :meth:`read` (those lines' bytes, "\\n" and one "\\r" before
  it dropped; any thread, any order, so that reading overlaps tokenizing), :meth:`state`,
  :meth:`load_state`."""

  CHUNK = 16384  # positions permuted at a time
  RECHECK_S = 1.0  # how often the files' size and modification time are checked again

  def __init__(self, files: Sequence[str], group_size: int, seed: int, stream_salt: int,
               index_dir: str = ""):
    if not files:
      raise DataError("a line stream needs at least one file")
    self._files = [paths.resolve(p) for p in files]
    self._k = int(group_size)
    self._seed, self._salt = int(seed), int(stream_salt)
    self.epoch, self.pos = 0, 0  # the next position taken
    self._lock = threading.Lock()  # re-indexing, while other threads read
    self._index_dir = index_dir
    self._open([line_index(p, index_dir=index_dir) for p in self._files])

  def _open(self, index: list[LineIndex]) -> None:
    bounds = np.cumsum([0] + [len(ix) for ix in index])
    if not bounds[-1]:
      raise DataError(f"{', '.join(self._files)}: no non-blank line to train on; remove the "
                      "file(s) or point the pattern elsewhere")
    # One tuple, replaced whole: a reader in another thread sees the old files or the new.
    self._view = (index, [np.frombuffer(paths.mapped(ix.local), np.uint8) for ix in index],
                  bounds)
    self.n = int(bounds[-1])
    self.pos = min(self.pos, self.n - 1)
    self._chunk: tuple = (None, None, None)  # (epoch, first position, permuted lines)
    self._checked = time.monotonic()

  def _reindex(self, f: int, why: str | None, seen: tuple) -> None:
    with self._lock:
      if self._view is seen:  # (not already done by another thread)
        index = list(seen[0])
        index[f] = line_index(self._files[f], stale=why, index_dir=self._index_dir)
        self._open(index)

  def _recheck(self) -> None:
    for f, ix in enumerate(self._view[0]):
      if (paths.size(ix.path), paths.mtime(ix.path)) != (ix.size, ix.mtime):
        self._reindex(f, None, self._view)
    self._checked = time.monotonic()

  def take(self) -> np.ndarray:
    """The next group's line numbers (over all files); advances the state."""
    if time.monotonic() - self._checked > self.RECHECK_S:
      self._recheck()
    out, m = [], self._k
    while m:
      first = self.pos - self.pos % self.CHUNK
      if self._chunk[:2] != (self.epoch, first):
        key = np.random.SeedSequence([self._seed, self._salt, self.epoch]).generate_state(4)
        ids = np.arange(first, min(first + self.CHUNK, self.n))
        self._chunk = (self.epoch, first, permute(ids, self.n, key.tolist()))
      lines = self._chunk[2][self.pos - first:self.pos - first + m]
      out.append(lines)
      m -= len(lines)
      self.pos += len(lines)
      if self.pos == self.n:
        self.epoch, self.pos = self.epoch + 1, 0
    return out[0] if len(out) == 1 else np.concatenate(out)

  def read(self, lines: np.ndarray) -> list[bytes]:
    """The lines numbered ``lines`` (from :meth:`take`). A file found changed under its index
    is re-indexed and the read done again (over the new lines: numbers past their count wrap
    around)."""
    while True:
      view = self._view
      got = self._read(view, lines % int(view[2][-1]))
      if got is not None:
        return got

  def _read(self, view: tuple, lines: np.ndarray) -> list[bytes] | None:
    index, arrays, bounds = view
    if len(index) == 1:
      fid, files = None, [0]
    else:
      fid = np.searchsorted(bounds, lines, side="right") - 1
      files = np.unique(fid).tolist()
    got: list = [None] * len(lines)
    for f in files:
      sel = None if fid is None else np.flatnonzero(fid == f)
      ix, data = index[f], arrays[f]
      local = lines if sel is None else lines[sel] - bounds[f]
      starts, ends = ix.starts[local], ix.ends[local]
      size = data.shape[0]
      # Every line, each followed by a "\n", gathered in NumPy and split in one call: no
      # Python step per line. It must be a whole line exactly where the index says ("\n" or
      # the file's edge on both sides, none inside), or the file changed under its index.
      lens = ends - starts + 1
      seps = np.cumsum(lens) - 1
      idx = np.arange(int(seps[-1]) + 1) + np.repeat(starts - (seps + 1 - lens), lens)
      buf = data[np.minimum(idx, size - 1)] if size else np.zeros(len(idx), np.uint8)
      whole = ((ends >= size) | (data[np.minimum(ends, size - 1)] == 10)).all() and (
          (starts == 0) | (data[np.maximum(starts - 1, 0)] == 10)).all()
      buf[seps] = 10
      if ends.max() > size or not whole or np.count_nonzero(buf == 10) != len(lens):
        self._reindex(f, "a line is no longer where its index says", view)
        return None
      raw = buf.tobytes().split(b"\n")
      del raw[-1]
      if ix.crlf:
        raw = [x[:-1] if x[-1:] == b"\r" else x for x in raw]
      if sel is None:
        return raw
      for i, x in zip(sel.tolist(), raw, strict=True):
        got[i] = x
    return got

  def group(self) -> list[bytes]:
    """The next ``group_size`` lines (:meth:`take` then :meth:`read`)."""
    return self.read(self.take())

  def state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos, "lines": self.n}

  def load_state(self, state: dict) -> None:
    if int(state["lines"]) != self.n:
      logging.warning("%s: %d non-blank lines now, %d when the data state was saved; the "
                      "stream goes on from the same epoch and position over the new lines",
                      ", ".join(self._files), self.n, int(state["lines"]))
    self.epoch, self.pos = int(state["epoch"]), min(int(state["pos"]), self.n - 1)
