"""Text to sharded batches: tasks → mixture → packed, language-tagged rows → global jax.Arrays.

Two input paths feed one packer:

  grouped       (training, ``data.group_size`` = k > 0, the default) a seqio mixture of the
                tasks' grouped twins samples groups of k untokenized examples at the
                languages' rates; a :class:`TextGroupReader` takes ~1024 examples' worth of
                groups per tf.data step, shuffles their examples together and tokenizes them
                in one multi-threaded SentencePiece call on the host.
  per example   (evaluation, and training with ``data.group_size=0``) seqio tasks tokenize in
                tf.data and the mixture samples single examples; an :class:`ExampleReader`
                takes them 256 at a time.

Either reader appends whole examples to a :class:`TokenStream` (flat tokens, language ids,
loss weights, example starts), and batches are cut from its head in NumPy. A batch is a dict
of [batch, seq_len] arrays:

  inputs        tokens shifted right inside each packed segment (0 at a segment's start)
  targets       the tokens to predict
  segment_ids   1, 2, ... per packed segment in a row; 0 on padding
  positions     position inside the segment
  lang_ids      index into ``config.data.languages`` of each token's language (0 on padding)
  loss_weights  1.0 where the loss counts (not on padding, not on a conditional task's source)

Two packings (``config.data.packing``):

  concat     the stream is cut into rows of seq_len: no padding, an example that crosses a
             row boundary continues in the next row as a new segment (positions restart at 0,
             its input there starts at 0, its tokens keep their language ids and weights).
  first_fit  (the default) each example (split into seq_len chunks when longer) goes whole
             into the first row of the batch with room for it; a batch is emitted when a chunk
             fits in no row. Examples are never cut; about 3% of the slots are padding.
             Evaluation batches always use this packing.

Iteration is deterministic for a seed, and :class:`PackedIterator` saves and restores its state
(the tf.data iterator checkpoint, the reader's counters and the tokens read but not yet
placed), so a restored run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from xlingo.data import tasks
from xlingo.errors import DataError

FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights")


class LanguageTable:
  """Language code <-> id, in the order of ``config.data.languages``."""

  def __init__(self, codes: Sequence[str]):
    self.codes = tuple(codes)
    if len(set(self.codes)) != len(self.codes):
      raise DataError(f"data.languages has duplicates: {self.codes}; list each language once")
    self._ids = {c: i for i, c in enumerate(self.codes)}

  def id(self, code: str) -> int:
    try:
      return self._ids[code]
    except KeyError:
      raise DataError(
          f"unknown language {code!r}: not in data.languages={self.codes}; add it there "
          "(append only: the order is the model's language-embedding table)") from None

  def __len__(self):
    return len(self.codes)


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _cached_lang_id(code, table: LanguageTable, cache: dict) -> int:
  """``table.id`` of a language code from tf.data (bytes), memoised in ``cache``."""
  lang_id = cache.get(code)
  if lang_id is None:
    lang_id = cache[code] = table.id(_as_str(code))
  return lang_id


PACKINGS = ("concat", "first_fit")


def check_packing(packing: str) -> None:
  if packing not in PACKINGS:
    from xlingo.errors import ConfigError

    raise ConfigError(f"data.packing={packing!r} is unknown; use one of {PACKINGS}")


def _lang_ids(codes: np.ndarray, table: LanguageTable, cache: dict) -> np.ndarray:
  """Language code per example (bytes) -> ids, one dict lookup per example."""
  return np.fromiter((_cached_lang_id(c, table, cache) for c in codes), np.int32,
                     count=len(codes))


def flatten_group(b: Mapping[str, np.ndarray], table: LanguageTable,
                  lang_cache: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A ragged group of tokenized examples -> flat (tokens, lang_ids, weights, starts).

  ``b`` holds ``values`` + ``row_splits`` (the examples' tokens, EOS included) and per example
  ``lang``, ``src_lang`` (codes) and ``prefix_len``; ``lang_ids`` / ``src_lang_ids``, when
  given, are the codes' ids already (``src_lang_ids`` 0 where there is no source). ``starts`` marks each example's first token. On a
  conditional example's first ``prefix_len`` tokens (its source) the language is the
  source's and the loss weight 0. All vectorised: no Python step per token.
  """
  values = np.asarray(b["values"], np.int32)
  splits = np.asarray(b["row_splits"], np.int64)
  lens = np.diff(splits)
  n = values.shape[0]
  ids = b.get("lang_ids")
  lang = np.repeat(_lang_ids(b["lang"], table, lang_cache) if ids is None else ids, lens)
  weights = np.ones(n, np.float32)
  prefix = np.asarray(b["prefix_len"], np.int64)
  if n and prefix.any():
    offset = np.arange(n, dtype=np.int64) - np.repeat(splits[:-1], lens)
    src = offset < np.repeat(prefix, lens)
    has = prefix > 0
    src_ids = b.get("src_lang_ids")
    if src_ids is None:
      src_ids = np.zeros(len(lens), np.int32)
      src_ids[has] = _lang_ids(b["src_lang"][has], table, lang_cache)
    lang = np.where(src, np.repeat(src_ids, lens), lang)
    weights[src] = 0.0
  starts = np.zeros(n, bool)
  starts[splits[:-1][lens > 0]] = True
  return values, lang, weights, starts


class TokenStream:
  """Tokens read but not yet placed in a batch: flat token, language id, loss weight and
  example-start arrays. Both packings take batches from its head."""

  FIELDS = ("tokens", "lang_ids", "weights", "starts")

  def __init__(self):
    self.clear()

  def clear(self):
    self.tokens = np.zeros(0, np.int32)
    self.lang_ids = np.zeros(0, np.int32)
    self.weights = np.zeros(0, np.float32)
    self.starts = np.zeros(0, bool)

  def __len__(self):
    return self.tokens.shape[0]

  def add(self, tokens, lang_ids, weights, starts) -> None:
    self.tokens = np.concatenate([self.tokens, tokens])
    self.lang_ids = np.concatenate([self.lang_ids, lang_ids])
    self.weights = np.concatenate([self.weights, weights])
    self.starts = np.concatenate([self.starts, starts])

  def pop(self, n: int) -> list[np.ndarray]:
    """Remove and return the first ``n`` of each array."""
    out = [getattr(self, f)[:n] for f in self.FIELDS]
    for f in self.FIELDS:
      setattr(self, f, getattr(self, f)[n:])
    return out


def _finish(targets, segs, pos, langs, weights) -> dict[str, np.ndarray]:
  """Add the shifted inputs (0 at every segment start and on padding)."""
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[pos == 0] = 0
  return {"inputs": inputs, "targets": targets, "segment_ids": segs, "positions": pos,
          "lang_ids": langs, "loss_weights": weights}


def _split(rows: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """[k*batch, seq_len] arrays -> k batches."""
  n = rows["targets"].shape[0] // batch_size
  return [{f: v[i * batch_size:(i + 1) * batch_size] for f, v in rows.items()} for i in range(n)]


def concat_batches(stream: TokenStream, batch_size: int, seq_len: int,
                   final: bool = False) -> list[dict[str, np.ndarray]]:
  """Every full batch of the stream, cut into rows of seq_len (module docstring, ``concat``).

  ``final``: the stream has ended, so its rest also makes a (zero-padded) batch.
  """
  size = batch_size * seq_len
  n = len(stream) // size * size
  if final and len(stream) > n:
    n = len(stream)
  if n == 0:
    return []
  k = -(-n // size)
  parts = []
  for a in stream.pop(n):
    out = np.zeros(k * size, a.dtype)
    out[:n] = a
    parts.append(out.reshape(k * batch_size, seq_len))
  targets, langs, weights, starts = parts
  real = (np.arange(k * size) < n).reshape(k * batch_size, seq_len)
  starts[:, 0] = True
  segs = np.cumsum(starts, axis=1, dtype=np.int32)
  arange = np.arange(seq_len, dtype=np.int32)
  pos = arange - np.maximum.accumulate(np.where(starts, arange, 0), axis=1)
  segs[~real] = 0
  pos[~real] = 0
  return _split(_finish(targets, segs, pos, langs, weights), batch_size)


def _chunks(starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(start, length) of each chunk: examples cut at every ``seq_len`` tokens from their start."""
  w = starts.shape[0]
  st = np.flatnonzero(starts)
  if not st.size or st[0] != 0:  # the head continues an example cut at a chunk boundary
    st = np.concatenate([[0], st])
  nch = -(-np.diff(np.append(st, w)) // seq_len)
  first = np.repeat(np.cumsum(nch) - nch, nch)
  cstart = np.repeat(st, nch) + seq_len * (np.arange(first.shape[0]) - first)
  return cstart, np.diff(np.append(cstart, w))


def first_fit_batches(stream: TokenStream, batch_size: int, seq_len: int,
                      final: bool = False) -> list[dict[str, np.ndarray]]:
  """Every complete first-fit batch of the stream (module docstring, ``first_fit``).

  Chunks (examples cut every seq_len tokens) go, in order, each into the first row of the
  current batch with room for it; a chunk that fits in no row completes that batch and starts
  the next. The last batch is complete only when the stream has ended (``final``); until then
  its chunks stay in the stream. Placement is a loop over chunk lengths; the tokens move in one
  vectorised scatter for all the batches.
  """
  b, length = batch_size, seq_len
  if not len(stream):
    return []
  cstart, clens = _chunks(stream.starts, length)
  fill = [0] * b
  nseg = [0] * b
  dest, segno = [], []
  batch = open_row = done = 0  # current batch; its first row with room; chunks in full batches
  for i, n in enumerate(clens.tolist()):
    r = open_row
    while r < b and fill[r] + n > length:
      r += 1
    if r == b:
      batch += 1
      done = i
      fill = [0] * b
      nseg = [0] * b
      r = open_row = 0
    dest.append((batch * b + r) * length + fill[r])
    fill[r] += n
    nseg[r] += 1
    segno.append(nseg[r])
    while open_row < b and fill[open_row] == length:
      open_row += 1
  nb, k = (batch + 1, len(dest)) if final else (batch, done)
  if nb == 0:
    return []
  lens = clens[:k]
  ntok = int(cstart[k - 1] + lens[-1])
  local = np.arange(ntok) - np.repeat(cstart[:k], lens)
  idx = np.repeat(np.asarray(dest[:k]), lens) + local
  tokens, lang_ids, weights, _ = stream.pop(ntok)
  size = nb * b * length
  out = []
  for src, dtype in ((tokens, np.int32), (np.repeat(np.asarray(segno[:k], np.int32), lens), np.int32),
                     (local, np.int32), (lang_ids, np.int32), (weights, np.float32)):
    a = np.zeros(size, dtype)
    a[idx] = src
    out.append(a.reshape(nb * b, length))
  return _split(_finish(*out), b)


_PACKERS = {"concat": concat_batches, "first_fit": first_fit_batches}


def pack_examples(examples: Sequence[Mapping[str, object]], table: LanguageTable,
                  batch_size: int, seq_len: int, packing: str = "first_fit") -> list[dict]:
  """Pack a finite list of tokenized examples (``targets`` with EOS, ``lang``, optional
  ``src_lang``/``prefix_len``) into batches."""
  check_packing(packing)
  lens = [len(ex["targets"]) for ex in examples]
  group = {
      "values": np.concatenate([np.asarray(ex["targets"], np.int32) for ex in examples]),
      "row_splits": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
      "lang": np.array([ex["lang"] for ex in examples], object),
      "src_lang": np.array([ex.get("src_lang", "") for ex in examples], object),
      "prefix_len": np.array([int(ex.get("prefix_len", 0)) for ex in examples], np.int64)}
  stream = TokenStream()
  stream.add(*flatten_group(group, table, {}))
  return _PACKERS[packing](stream, batch_size, seq_len, final=True)


# --- readers: tf.data -> pieces of the token stream ---------------------------------------

# Tokenized examples cross from tf.data to NumPy this many at a time (one ragged batch): the
# per-element cost of a Python-side tf.data iterator step is paid once per group.
EXAMPLES_PER_TRANSFER = 256


def _flat_batches(ds: tf.data.Dataset, n: int):
  """An iterator over batches of ``n`` elements: ``targets`` (a vector per element) as flat
  ``values`` + ``row_splits``, the other features stacked."""

  def flat(b):
    t = b.pop("targets")
    return {"values": t.values, "row_splits": t.row_splits, **b}

  return iter(ds.ragged_batch(n).map(flat).prefetch(2))


class _Reader:
  """tf.data batches -> pieces of the token stream.

  A read is :meth:`fetch` (the next tf.data batch as NumPy; cheap, called in order) then
  :meth:`process` (the piece; any thread, any order), so reads can run ahead in parallel
  (:class:`_Background`). ``iterator`` is the tf.data iterator whose state is checkpointed;
  :meth:`state` holds anything else a restore needs.
  """

  kind: str
  iterator: object

  def __init__(self, table: LanguageTable):
    self._table = table
    self._lang_cache: dict = {}

  def fetch(self) -> dict | None:
    b = next(self.iterator, None)
    return None if b is None else {k: v.numpy() for k, v in b.items()}

  def process(self, b: dict) -> tuple:
    raise NotImplementedError

  def read(self):
    b = self.fetch()
    return None if b is None else self.process(b)

  def state(self) -> dict:
    return {}

  def load_state(self, state: dict) -> None:
    del state


class ExampleReader(_Reader):
  """Tokenized single examples (a seqio task or per-example mixture), 256 per read."""

  kind = "examples"

  def __init__(self, ds: tf.data.Dataset, table: LanguageTable):
    super().__init__(table)
    self.iterator = _flat_batches(ds, EXAMPLES_PER_TRANSFER)

  def process(self, b) -> tuple:
    return flatten_group(b, self._table, self._lang_cache)


# Default ``data.examples_per_read``: groups are read so that about this many examples are
# tokenized (and shuffled) together.
EXAMPLES_PER_READ = 4096


class TextGroupReader(_Reader):
  """Groups of raw lines from a grouped mixture (tasks.register_grouped), tokenized here.

  Each read takes ``ceil(examples_per_read / group_size)`` groups in one tf.data step, shuffles
  their lines together (a NumPy permutation seeded by (seed, read number), so a restored
  reader repeats it), splits TSV pairs and parses JSONL records (dropping records without
  text), and tokenizes all texts in one multi-threaded SentencePiece call: no TensorFlow op
  and no Python tf.data step per example.
  """

  def __init__(self, ds: tf.data.Dataset, table: LanguageTable,
               vocab: seqio.SentencePieceVocabulary, group_size: int, seed: int,
               examples_per_read: int = EXAMPLES_PER_READ):
    super().__init__(table)
    self.kind = f"text_groups:{group_size}/{examples_per_read}"
    self.iterator = _flat_batches(ds, max(1, -(-examples_per_read // group_size)))
    self._sp = vocab.tokenizer
    self._eos = int(vocab.eos_id)
    self._seed = int(seed)
    self.reads = 0

  def _ids(self, codes: np.ndarray) -> np.ndarray:
    """Language ids of group codes; 0 for "" (no source)."""
    ids = np.zeros(len(codes), np.int32)
    named = codes != b""
    ids[named] = _lang_ids(codes[named], self._table, self._lang_cache)
    return ids

  def fetch(self):
    """The next groups, numbered: the number seeds their permutation."""
    b = super().fetch()
    if b is not None:
      b["read"] = self.reads
      self.reads += 1
    return b

  def process(self, b) -> tuple:
    sizes = np.diff(b["row_splits"])
    rng = np.random.default_rng([self._seed, b["read"]])
    order = rng.permutation(b["values"].shape[0])
    lines = b["values"][order]
    lang = np.repeat(self._ids(b["lang"]), sizes)[order]
    src_lang = np.repeat(self._ids(b["src_lang"]), sizes)[order]
    fmt = np.repeat(b["format"], sizes)[order]
    texts, sources, keep = _parse_lines(lines, fmt)
    if not keep.all():
      texts = [t for t, k in zip(texts, keep, strict=True) if k]
    lang, src_lang = lang[keep], src_lang[keep]
    tokens, lens = encode_flat(self._sp, texts)
    prefix = np.zeros(len(texts), np.int64)
    cond = (np.flatnonzero(fmt[keep] == tasks.FORMAT_TSV.encode()) if sources is not None
            else np.zeros(0, np.int64))
    if cond.size:  # conditional examples: source tokens, then the target's
      src_tokens, src_lens = encode_flat(self._sp, list(sources[keep][cond]))
      prefix[cond] = src_lens
      parts = np.split(tokens, np.cumsum(lens)[:-1])
      for i, s in zip(cond.tolist(), np.split(src_tokens, np.cumsum(src_lens)[:-1]), strict=True):
        parts[i] = np.concatenate([s, parts[i]])
      tokens = np.concatenate(parts)
      lens = lens + prefix
    lens = lens + 1  # EOS
    splits = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=splits[1:])
    values = np.full(int(splits[-1]), self._eos, np.int32)
    body = np.ones(values.shape[0], bool)
    body[splits[1:] - 1] = False
    values[body] = tokens
    return flatten_group({"values": values, "row_splits": splits, "lang_ids": lang,
                          "src_lang_ids": src_lang, "prefix_len": prefix},
                         self._table, self._lang_cache)

  def state(self) -> dict:
    return {"reads": self.reads}

  def load_state(self, state: dict) -> None:
    self.reads = int(state["reads"])


def encode_flat(sp, texts: list) -> tuple[np.ndarray, np.ndarray]:
  """SentencePiece ids of ``texts`` (str or bytes) as (all ids concatenated, length of each).

  One multi-threaded batch call. sentencepiece 0.2.3's numpy output builds one array per text
  in Python (about a fifth of the encode time, holding the GIL); its C++ buffers are joined
  here in one step instead, falling back to the public call if that method is not there.
  """
  batch = getattr(getattr(sp, "_processor", None), "_EncodeAsBufferBatch", None)
  if batch is not None:
    bufs = batch(texts, -1, None, False, 0, 0.0, False, False, False)
    lens = np.fromiter((memoryview(b).nbytes for b in bufs), np.int64, count=len(bufs)) // 4
    return np.frombuffer(b"".join(bufs), np.int32), lens
  arrs = sp.Encode(texts, return_type="numpy")
  lens = np.fromiter(map(len, arrs), np.int64, count=len(arrs))
  return (np.concatenate(arrs) if arrs else np.zeros(0, np.int32)), lens


def _parse_lines(lines: np.ndarray, fmt: np.ndarray):
  """Raw non-blank lines (bytes) and their groups' formats -> (texts, sources or None, kept).

  ``tsv`` lines are split at the first tab into source and target (a missing target is "");
  ``json:<field>`` lines are parsed and their field taken, and a record whose field is
  missing, not a string or blank is not kept.
  """
  texts = lines.tolist()
  keep = np.ones(len(texts), bool)
  special = np.flatnonzero(fmt != b"")
  if not special.size:
    return texts, None, keep
  sources = np.full(len(texts), b"", object)
  tsv = tasks.FORMAT_TSV.encode()
  for i in special.tolist():
    if fmt[i] == tsv:
      src, _, tgt = texts[i].partition(b"\t")
      sources[i], texts[i] = src, tgt
      continue
    try:
      obj = json.loads(texts[i])
    except ValueError:
      raise DataError(f"a JSONL record is not valid JSON: {texts[i][:80]!r}...; fix or "
                      "remove that line of the file") from None
    field = fmt[i].decode()[len(tasks.FORMAT_JSON):]
    text = obj.get(field, "") if isinstance(obj, dict) else ""
    if isinstance(text, str) and text.strip():
      texts[i] = text
    else:
      keep[i] = False
  return texts, sources, keep


class _Background:
  """Reads ahead in ``workers`` threads, at most ``depth`` pieces ahead, in order.

  A read is a ``reader.fetch()`` (tf.data, in order, under ``read_lock``) then a
  ``reader.process()`` (parsing, SentencePiece, NumPy; in parallel). SentencePiece and
  tf.data release the GIL, so tokenizing overlaps the packing and the next fetch. A state
  saved under ``read_lock`` after :meth:`take_buffered` has every fetched piece in hand.
  """

  def __init__(self, reader, workers: int = 2, depth: int = 3):
    self.reader = reader
    self.workers = workers
    self.depth = depth
    self.read_lock = threading.Lock()
    self.cv = threading.Condition()
    self.threads: list[threading.Thread] = []
    self._reset()
    _LIVE.add(self)

  def _reset(self):
    self.results: dict[int, tuple] = {}
    self.issued = 0  # reads fetched
    self.next = 0  # the next read the consumer takes
    self.inflight = 0
    self.end: int | None = None  # read number at which the stream ended
    self.error: BaseException | None = None
    self.stop = False

  def _run(self):
    while True:
      with self.cv:
        while self.issued - self.next >= self.depth and not self.stop:
          self.cv.wait()
      with self.read_lock:
        if self.stop or self.end is not None or self.error is not None:
          return
        try:
          raw = self.reader.fetch()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
          return self._fail(e)
        with self.cv:
          if raw is None:
            self.end = self.issued
            self.cv.notify_all()
            return
          seq = self.issued
          self.issued += 1
          self.inflight += 1
      try:
        piece = self.reader.process(raw)
      except BaseException as e:  # noqa: BLE001
        return self._fail(e)
      with self.cv:
        self.results[seq] = piece
        self.inflight -= 1
        self.cv.notify_all()

  def _fail(self, e: BaseException):
    with self.cv:
      self.error = e
      self.inflight = 0
      self.cv.notify_all()

  def get(self):
    """The next piece, or None at the end of a finite stream."""
    if not self.threads:
      self.threads = [threading.Thread(target=self._run, daemon=True, name=f"xlingo-input-{i}")
                      for i in range(self.workers)]
      for t in self.threads:
        t.start()
    with self.cv:
      while (self.next not in self.results and self.error is None
             and (self.end is None or self.next < self.end)):
        self.cv.wait()
      if self.next in self.results:
        piece = self.results.pop(self.next)
        self.next += 1
        self.cv.notify_all()
        return piece
      if self.error is not None:
        raise self.error
      return None

  def take_buffered(self) -> list:
    """Every piece fetched but not yet taken, in order (call with ``read_lock`` held)."""
    with self.cv:
      while self.inflight and self.error is None:
        self.cv.wait()
      if self.error is not None:
        raise self.error
      out = [self.results.pop(i) for i in range(self.next, self.issued)]
      self.next = self.issued
      self.cv.notify_all()
      return out

  def request_stop(self) -> None:
    """Ask the threads to end after their current read (does not wait)."""
    with self.cv:
      self.stop = True
      self.cv.notify_all()

  def halt(self) -> None:
    """Stop the threads (after their current read); pieces not taken are dropped."""
    self.request_stop()
    for t in self.threads:
      if t is not threading.current_thread():
        t.join()
    self.threads = []
    self._reset()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _halt_all():
  # A daemon thread inside a tf.data call while the interpreter shuts down can crash it.
  for bg in list(_LIVE):
    bg.halt()


class PackedIterator:
  """Iterates packed [batch, seq_len] batches from a reader; its state can be saved.

  ``reader`` is an :class:`ExampleReader` or a :class:`TextGroupReader`; ``packing`` is
  ``"concat"`` or ``"first_fit"`` (module docstring). With ``background``, reads run ahead in
  a thread (:class:`_Background`). A saved state holds the reader's tf.data iterator
  (positioned after the last read), its counters and the token stream not yet placed in a
  batch (read-ahead pieces included), so a restored iterator continues exactly.
  """

  def __init__(self, reader, batch_size: int, seq_len: int, packing: str = "first_fit",
               background: bool = False):
    check_packing(packing)
    self.packing = packing
    self.reader = reader
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.stream = TokenStream()
    self.ready: collections.deque = collections.deque()  # packed, not yet returned
    self.batches = 0
    self._bg = _Background(reader) if background else None

  def __iter__(self):
    return self

  def __del__(self):
    bg = getattr(self, "_bg", None)
    if bg is not None:
      bg.request_stop()

  def __next__(self) -> dict[str, np.ndarray]:
    read = self.reader.read if self._bg is None else self._bg.get
    pack = _PACKERS[self.packing]
    while not self.ready:
      piece = read()
      if piece is None:  # the end of a finite stream: its rest makes the last batch
        self.ready.extend(pack(self.stream, self.batch_size, self.seq_len, final=True))
        if not self.ready:
          raise StopIteration
        break
      self.stream.add(*piece)
      self.ready.extend(pack(self.stream, self.batch_size, self.seq_len))
    self.batches += 1
    return self.ready.popleft()

  # --- state ---------------------------------------------------------------------------------
  def save(self, directory: str) -> None:
    """Write this process's iterator state into ``directory`` (created if needed)."""
    lock = self._bg.read_lock if self._bg is not None else contextlib.nullcontext()
    with lock:
      if self._bg is not None:
        for piece in self._bg.take_buffered():
          self.stream.add(*piece)
      self._save(directory)

  def _save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    tf.train.Checkpoint(iterator=self.reader.iterator).write(
        os.path.join(directory, "tf_iterator"))
    ready = {f"ready_{k}": np.stack([b[k] for b in self.ready]) for k in FEATURES
             if self.ready}
    np.savez(os.path.join(directory, "stream.npz"),
             **{f: getattr(self.stream, f) for f in TokenStream.FIELDS}, **ready)
    with open(os.path.join(directory, "state.json"), "w") as f:
      json.dump({"format": 2, "batches": self.batches, "packing": self.packing,
                 "reader": self.reader.kind, **self.reader.state()}, f)

  def restore(self, directory: str) -> None:
    with open(os.path.join(directory, "state.json")) as f:
      state = json.load(f)
    saved_kind = state.get("reader", "examples")
    if saved_kind != self.reader.kind:
      raise DataError(
          f"data state in {directory} was saved by another input pipeline ({saved_kind}) than "
          f"this run's ({self.reader.kind}); resume with {_flags(saved_kind)}")
    if self._bg is not None:
      self._bg.halt()
    tf.train.Checkpoint(iterator=self.reader.iterator).read(
        os.path.join(directory, "tf_iterator")).assert_consumed()
    self.stream.clear()
    self.ready.clear()
    if state.get("format", 1) >= 2:
      with np.load(os.path.join(directory, "stream.npz")) as z:
        self.stream.add(*(z[f] for f in TokenStream.FIELDS))
        if "ready_targets" in z:
          cols = {k: z[f"ready_{k}"] for k in FEATURES}
          self.ready.extend({k: v[i] for k, v in cols.items()}
                            for i in range(cols["targets"].shape[0]))
    else:
      self.stream.add(*_v1_stream(directory, state["pending"]))
    saved = state.get("packing", "first_fit")
    if saved != self.packing:
      # Nothing read is lost, but the batches differ from an uninterrupted run's from here on.
      logging.warning("data state in %s was saved with data.packing=%r, this run packs %r; "
                      "its %d packed batches come first, then its unplaced tokens are "
                      "repacked", directory, saved, self.packing, len(self.ready))
    self.reader.load_state(state)
    self.batches = state["batches"]


def _flags(kind: str) -> str:
  """The config overrides that select the reader of kind ``kind``."""
  if not kind.startswith("text_groups:"):
    return "--config.data.group_size=0"
  k, _, per_read = kind.split(":")[1].partition("/")
  return f"--config.data.group_size={k} --config.data.examples_per_read={per_read}"


def _v1_stream(directory: str, pending: int) -> list[np.ndarray]:
  """The unplaced tokens of a state written before the token stream (first-fit chunks, or
  the concat packer's arrays) as one stream."""
  with np.load(os.path.join(directory, "pending.npz")) as z:
    if pending:
      parts = [[z[f"{k}_{i}"] for i in range(pending)] for k in ("tokens", "lang_ids", "weights")]
      starts = [np.arange(len(t)) == 0 for t in parts[0]]
      return [np.concatenate(p) for p in parts] + [np.concatenate(starts)]
    return [z[f"concat_{k}"] for k in ("tokens", "lang_ids", "weights", "starts")]


def shard_info() -> seqio.ShardInfo | None:
  import jax  # the data layer needs jax only for the process topology

  n = jax.process_count()
  return seqio.ShardInfo(index=jax.process_index(), num_shards=n) if n > 1 else None


def mixture_dataset(mixture_or_task: str, *, split: str, seed: int, shuffle: bool,
                    repeat: bool, shard: seqio.ShardInfo | None,
                    grouped: bool = False) -> tf.data.Dataset:
  """The mixed stream of this process: tokenized examples, or text groups (``grouped``)."""
  provider = seqio.get_mixture_or_task(mixture_or_task)
  kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                num_epochs=None if repeat else 1, trim_output_features=False,
                try_in_mem_cache=False)
  passthrough = tasks.GROUP_PASSTHROUGH if grouped else tasks.PASSTHROUGH_FEATURES
  if isinstance(provider, seqio.Mixture):
    kwargs["passthrough_features"] = list(passthrough)
  file_shard_ok = shard is None or _files_per_task_at_least(provider, split, shard.num_shards)
  ds = provider.get_dataset(shard_info=shard if file_shard_ok else None, **kwargs)
  if shard is not None and not file_shard_ok:
    logging.warning(
        "%s: fewer input files than the %d processes; every process reads all files and keeps "
        "every %d-th element. Split each language's files into >= %d shards to read less.",
        mixture_or_task, shard.num_shards, shard.num_shards, shard.num_shards)
    ds = ds.shard(shard.num_shards, shard.index)
  keep = ("targets",) + tuple(passthrough)
  if set(ds.element_spec) != set(keep):  # (a mixture's output is these already)
    ds = ds.map(lambda ex: {k: ex[k] for k in keep}, num_parallel_calls=tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  # Fusing seqio's chain of per-example maps (and the filter) cuts tf.data's per-element cost:
  # about +20% examples/s on 2 CPU cores (docs/PERFORMANCE.md, "Data pipeline").
  opts.experimental_optimization.map_fusion = True
  opts.experimental_optimization.map_and_filter_fusion = True
  return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


def _files_per_task_at_least(provider, split: str, n: int) -> bool:
  task_list = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for t in task_list:
    src = t.source
    if not isinstance(src, seqio.FileDataSource) or len(src.list_shards(split)) < n:
      return False
  return True


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
  """Per-process batch → global jax.Arrays sharded over the mesh's batch axes."""
  import jax

  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def vocab_byte_lengths(vocab: seqio.SentencePieceVocabulary) -> np.ndarray:
  """UTF-8 bytes each piece stands for (for bits per byte); control pieces count 0."""
  sp = vocab.tokenizer
  out = np.zeros(vocab.vocab_size, np.float32)
  for i in range(sp.get_piece_size()):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    if sp.is_byte(i):
      out[i] = 1.0
      continue
    out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return out
