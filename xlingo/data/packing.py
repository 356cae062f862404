"""Packing: tokenized examples -> [batch, seq_len] rows with language ids, segments, positions.

Readers (readers.py) append whole tokenized examples to a :class:`TokenStream` (flat tokens,
language ids, loss weights, example starts), and batches are cut from its head in NumPy. A
batch is a dict of [batch, seq_len] arrays:

  inputs        tokens shifted right inside each packed segment (the vocabulary's start id at
                a segment's start: 0 for SentencePiece, vocabulary.py; 0 on padding)
  targets       the tokens to predict
  segment_ids   1, 2, ... per packed segment in a row; 0 on padding
  positions     position inside the segment
  lang_ids      index into ``config.data.languages`` of each token's language (0 on padding)
  loss_weights  1.0 where the loss counts (not on padding, not on a conditional task's source)
  raw_bytes     the raw UTF-8 bytes of the example's text each token stands for (readers.py:
                an example's tokens sum to its raw length; 0 on sources and padding), the
                denominator of bits per byte

Two packings (``config.data.packing``):

  concat     the stream is cut into rows of seq_len: no padding, an example that crosses a
             row boundary continues in the next row as a new segment (positions restart at 0,
             its input there starts at 0, its tokens keep their language ids and weights).
  first_fit  (the default) each example (split into seq_len chunks when longer) goes whole
             into the first row of the batch with room for it; a batch is emitted when a chunk
             fits in no row. Examples are never cut; about 3% of the slots are padding.
             Evaluation batches always use this packing.

Either way a conditional example's target tokens are trained only where its source is in the
same row: the readers cut a pair to fit one row, and should a pair still be split (concat's
row boundaries, or a pair longer than a row when nothing cut it), its tokens past the split
get loss weight 0 instead of training as unconditional text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from xlingo.data.languages import LanguageTable
from xlingo.errors import ConfigError

FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights",
            "raw_bytes")


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
    raise ConfigError(f"data.packing={packing!r} is unknown; use one of {PACKINGS}")


def lang_ids_of(codes: np.ndarray, table: LanguageTable, cache: dict) -> np.ndarray:
  """Language code per example (bytes) -> ids, one dict lookup per example."""
  return np.fromiter((_cached_lang_id(c, table, cache) for c in codes), np.int32,
                     count=len(codes))


def flatten_group(b: Mapping[str, np.ndarray], table: LanguageTable,
                  lang_cache: dict) -> tuple[np.ndarray, ...]:
  """A ragged group of tokenized examples -> the flat arrays of :class:`TokenStream`.

  ``b`` holds ``values`` + ``row_splits`` (the examples' tokens, EOS included), optionally
  ``raw_bytes`` per token, and per example ``lang``, ``src_lang`` (codes) and ``prefix_len``;
  ``lang_ids`` / ``src_lang_ids``, when given, are the codes' ids already (``src_lang_ids`` 0
  where there is no source). On a conditional example's first ``prefix_len`` tokens (its
  source) the language is the source's and the loss weight 0, and all its tokens are
  ``sourced``. All vectorised: no Python step per token.
  """
  values = np.asarray(b["values"], np.int32)
  splits = np.asarray(b["row_splits"], np.int64)
  lens = np.diff(splits)
  n = values.shape[0]
  ids = b.get("lang_ids")
  lang = np.repeat(lang_ids_of(b["lang"], table, lang_cache) if ids is None else ids, lens)
  weights = np.ones(n, np.float32)
  prefix = np.asarray(b["prefix_len"], np.int64)
  sourced = np.zeros(n, bool)
  if n and prefix.any():
    offset = np.arange(n, dtype=np.int64) - np.repeat(splits[:-1], lens)
    src = offset < np.repeat(prefix, lens)
    has = prefix > 0
    src_ids = b.get("src_lang_ids")
    if src_ids is None:
      src_ids = np.zeros(len(lens), np.int32)
      src_ids[has] = lang_ids_of(b["src_lang"][has], table, lang_cache)
    lang = np.where(src, np.repeat(src_ids, lens), lang)
    weights[src] = 0.0
    sourced = np.repeat(has, lens)
  starts = np.zeros(n, bool)
  starts[splits[:-1][lens > 0]] = True
  raw = b.get("raw_bytes")
  raw = np.zeros(n, np.int32) if raw is None else np.asarray(raw, np.int32)
  return values, lang, weights, starts, raw, sourced


class TokenStream:
  """Tokens read but not yet placed in a batch: flat token, language id, loss weight,
  example-start, raw-byte and has-a-source arrays. Both packings take batches from its head;
  ``start_id`` is the input at each segment's start (the vocabulary's ``start_id``)."""

  FIELDS = ("tokens", "lang_ids", "weights", "starts", "raw_bytes", "sourced")
  DTYPES = (np.int32, np.int32, np.float32, bool, np.int32, bool)

  def __init__(self, start_id: int = 0):
    self.start_id = int(start_id)
    self.clear()

  def clear(self):
    for f, dt in zip(self.FIELDS, self.DTYPES, strict=True):
      setattr(self, f, np.zeros(0, dt))

  def __len__(self):
    return self.tokens.shape[0]

  def add(self, tokens, lang_ids, weights, starts, raw_bytes=None, sourced=None) -> None:
    """Append examples' arrays; ``raw_bytes`` (default 0) and ``sourced`` (default False)
    may be left out."""
    n = len(tokens)
    raw_bytes = np.zeros(n, np.int32) if raw_bytes is None else raw_bytes
    sourced = np.zeros(n, bool) if sourced is None else sourced
    for f, a in zip(self.FIELDS, (tokens, lang_ids, weights, starts, raw_bytes, sourced),
                    strict=True):
      setattr(self, f, np.concatenate([getattr(self, f), a]))

  def pop(self, n: int) -> list[np.ndarray]:
    """Remove and return the first ``n`` of each array."""
    out = [getattr(self, f)[:n] for f in self.FIELDS]
    for f in self.FIELDS:
      setattr(self, f, getattr(self, f)[n:])
    return out


def sliding_windows(piece: tuple, seq_len: int, context: int) -> tuple:
  """Cut each example longer than ``seq_len`` (flat arrays of :class:`TokenStream`, in its
  field order) into windows of at most ``seq_len`` tokens that each start a segment: the
  first scores its ``seq_len`` tokens, every later one re-reads the ``context`` tokens before
  the ones it scores (loss weight 0 and no raw bytes there) and scores the next
  ``seq_len - context``. Every token is scored once, with at least ``context`` tokens before
  it in its row (a plain cut every ``seq_len`` tokens, context 0, restarts each chunk with
  none). Conditional examples (with a source) are left as they are: a window would lose the
  source."""
  tokens, lang, weights, starts, raw, sourced = piece
  n = tokens.shape[0]
  st = np.flatnonzero(starts)
  if not st.size or st[0] != 0:
    st = np.concatenate([[0], st])
  ends = np.append(st[1:], n)
  step = seq_len - context
  idx, scored, first = [], [], []
  for a, e in zip(st.tolist(), ends.tolist(), strict=True):
    if e - a <= seq_len or sourced[a]:
      idx.append(np.arange(a, e))
      scored.append(np.ones(e - a, bool))
      first.append(np.arange(e - a) == 0)
      continue
    lo, s = a, a + seq_len
    while True:
      hi = min(s, e)
      idx.append(np.arange(lo, hi))
      scored.append(np.arange(lo, hi) >= lo + (0 if lo == a else context))
      first.append(np.arange(hi - lo) == 0)
      if hi == e:
        break
      lo, s = s - context, s + step
  if len(idx) == len(st):
    return piece
  idx, keep = np.concatenate(idx), np.concatenate(scored)
  return (tokens[idx], lang[idx], np.where(keep, weights[idx], np.float32(0)),
          np.concatenate(first), np.where(keep, raw[idx], 0), sourced[idx])


def _finish(start_id, targets, segs, pos, langs, weights, raw_bytes) -> dict[str, np.ndarray]:
  """Add the shifted inputs (``start_id`` at every segment start, 0 on padding)."""
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[pos == 0] = 0
  inputs[(pos == 0) & (segs > 0)] = start_id
  return {"inputs": inputs, "targets": targets, "segment_ids": segs, "positions": pos,
          "lang_ids": langs, "loss_weights": weights, "raw_bytes": raw_bytes}


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
  targets, langs, weights, starts, raw, sourced = parts
  real = (np.arange(k * size) < n).reshape(k * batch_size, seq_len)
  # a conditional example continued from the row before has lost its source (module docstring)
  continued = ~np.logical_or.accumulate(starts, axis=1)
  weights[continued & sourced] = 0.0
  starts[:, 0] = True
  segs = np.cumsum(starts, axis=1, dtype=np.int32)
  arange = np.arange(seq_len, dtype=np.int32)
  pos = arange - np.maximum.accumulate(np.where(starts, arange, 0), axis=1)
  segs[~real] = 0
  pos[~real] = 0
  return _split(_finish(stream.start_id, targets, segs, pos, langs, weights, raw), batch_size)


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
  tokens, lang_ids, weights, starts, raw, sourced = stream.pop(ntok)
  # a later chunk of a conditional example has lost its source (module docstring)
  continued = np.repeat(~starts[cstart[:k]] & sourced[cstart[:k]], lens)
  weights = np.where(continued, np.float32(0), weights)
  size = nb * b * length
  out = []
  segs = np.repeat(np.asarray(segno[:k], np.int32), lens)
  for src, dtype in ((tokens, np.int32), (segs, np.int32), (local, np.int32),
                     (lang_ids, np.int32), (weights, np.float32), (raw, np.int32)):
    a = np.zeros(size, dtype)
    a[idx] = src
    out.append(a.reshape(nb * b, length))
  return _split(_finish(stream.start_id, *out), b)


PACKERS = {"concat": concat_batches, "first_fit": first_fit_batches}


def pack_examples(examples: Sequence[Mapping[str, object]], table: LanguageTable,
                  batch_size: int, seq_len: int, packing: str = "first_fit",
                  start_id: int = 0) -> list[dict]:
  """Pack a finite list of tokenized examples (``targets`` with EOS, ``lang``, optional
  ``src_lang``/``prefix_len``/``raw_bytes``) into batches; ``start_id``: the vocabulary's."""
  check_packing(packing)
  lens = [len(ex["targets"]) for ex in examples]
  group = {
      "raw_bytes": np.concatenate([np.asarray(ex.get("raw_bytes", np.zeros(n)), np.int32)
                                   for ex, n in zip(examples, lens, strict=True)]),
      "values": np.concatenate([np.asarray(ex["targets"], np.int32) for ex in examples]),
      "row_splits": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
      "lang": np.array([ex["lang"] for ex in examples], object),
      "src_lang": np.array([ex.get("src_lang", "") for ex in examples], object),
      "prefix_len": np.array([int(ex.get("prefix_len", 0)) for ex in examples], np.int64)}
  stream = TokenStream(start_id)
  stream.add(*flatten_group(group, table, {}))
  return PACKERS[packing](stream, batch_size, seq_len, final=True)
