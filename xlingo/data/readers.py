"""Lines to tokenized examples: the one line parser, the one tokenizer, and the readers.

Every text that becomes an example goes through here, so that training, evaluation, token
counting (inputs.py) and the vocabulary tools (vocab.py) never read or tokenise a line
differently.

**Lines.** A line file holds one example per line. Lines are split at "\\n" with a trailing
"\\r" dropped (as tf.data's TextLineDataset splits them), and a line of ASCII whitespace only
is blank: never an example, in any format. A task's ``format`` says how a line is an example:

  ""            (FORMAT_TEXT) the line is the text
  "tsv"         (FORMAT_TSV) source<TAB>target, a conditional example; a missing target is ""
  "json:FIELD"  (FORMAT_JSON + FIELD) a JSON record whose FIELD is the text; a record whose
                FIELD is missing, not a string or blank is skipped

A file's format follows its name (:func:`format_of`): ``.jsonl``/``.json`` are JSON records,
anything else plain text; pairs files are TSV by configuration.

**Tokens.** The vocabulary on the host (SentencePiece or a Hugging Face tokenizer behind one
face, vocabulary.py), all texts of a read in one multi-threaded call. An example's tokens are its source's (a conditional example's
``prefix_len`` first tokens), then its text's, then EOS; a pair longer than a row keeps its
source and is cut in its target (:func:`encode_examples`). Every token carries the raw UTF-8
bytes it stands for (``raw_bytes``, for bits per byte).

**Readers.** tf.data elements (seqio tasks and mixtures of raw lines, tasks.py) become pieces
of the token stream that packing.py packs:

  ExampleReader    single examples (evaluation; training with ``data.group_size=0``), 256 per
                   read, in stream order
  GroupReader      groups of k examples (training, ``data.group_size`` = k > 0) taken on the
                   host from each task's stream at the (possibly scheduled) rates, about
                   ``data.examples_per_read`` examples per read, shuffled together (seeded);
                   a line-file task's stream is a host stream in a global permutation
                   (lineindex.PermutedLines), a TFDS task's a tf.data stream
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from xlingo import paths
from xlingo.data import packing
from xlingo.data.languages import LanguageTable
from xlingo.errors import DataError

if TYPE_CHECKING:  # the readers only call methods of the datasets they are given
  import tensorflow as tf

FORMAT_TEXT = ""
FORMAT_TSV = "tsv"
FORMAT_JSON = "json:"  # + the field name

JSONL_SUFFIXES = (".jsonl", ".json")


def format_of(path: str, jsonl_field: str = "text") -> str:
  """How the lines of a (train, validation or vocabulary) text file are examples: JSON records
  with ``jsonl_field`` for ``*.jsonl``/``*.json``, else plain text."""
  return FORMAT_JSON + jsonl_field if path.endswith(JSONL_SUFFIXES) else FORMAT_TEXT


_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what tf.strings.strip removes (and bytes.strip)


def is_blank(line) -> bool:
  """True for a line of ASCII whitespace only (bytes or str), as the tf.data sources see it."""
  return not (line.strip() if isinstance(line, bytes) else line.strip(_ASCII_SPACE))


class BadRecord(DataError):
  """A JSON line that does not parse; ``index`` is its position in the parsed list."""

  def __init__(self, index: int, line, where: str | None = None):
    self.index, self.line = index, line
    shown = line[:60]
    if where:
      msg = f"{where} is not valid JSON ({shown!r}); fix or remove that line"
    else:
      msg = f"a JSONL record is not valid JSON ({shown!r}); fix or remove that line of the file"
    super().__init__(msg)


def parse(lines: list, formats: np.ndarray | str) -> tuple[list, np.ndarray | None, np.ndarray]:
  """Non-blank lines (bytes or str) and their formats -> (texts, sources, kept).

  ``formats``: one format for all lines, or one per line (an array of bytes). ``sources`` is
  None when no line is a TSV pair, else an object array ("" for non-pairs). A JSON record that
  is not kept (module docstring) has ``kept`` False; one that does not parse raises
  :class:`BadRecord`. ``lines`` is modified in place and returned as ``texts``.
  """
  texts = lines
  keep = np.ones(len(texts), bool)
  if isinstance(formats, str):
    if formats == FORMAT_TEXT:
      return texts, None, keep
    special = np.arange(len(texts))
    fmts = [formats.encode()] * len(texts)
  else:
    special = np.flatnonzero(formats != b"")
    if not special.size:
      return texts, None, keep
    fmts = formats
  sources = None
  tsv, json_prefix = FORMAT_TSV.encode(), FORMAT_JSON.encode()
  for i in special.tolist():
    line, fmt = texts[i], fmts[i]
    if fmt == tsv:
      if sources is None:
        sources = np.full(len(texts), b"", object)
      src, _, tgt = line.partition("\t" if isinstance(line, str) else b"\t")
      sources[i], texts[i] = src, tgt
      continue
    try:
      obj = json.loads(line)
    except ValueError:
      raise BadRecord(i, line) from None
    field = fmt[len(json_prefix):].decode()
    text = obj.get(field, "") if isinstance(obj, dict) else ""
    if isinstance(text, str) and text.strip():
      texts[i] = text
    else:
      keep[i] = False
  return texts, sources, keep


class NotUtf8(DataError):
  """Text that is not UTF-8, with the file, line and byte offset where it fails."""

  def __init__(self, path: str, line: int, offset: int):
    self.path, self.line, self.offset = path, line, offset
    super().__init__(f"{path} line {line} is not valid UTF-8 (byte offset {offset}); "
                     "re-encode the file as UTF-8 (e.g. iconv -t UTF-8)")


def decode_utf8(data: bytes, path: str, first_line: int = 1, complete: bool = True) -> str:
  """``data`` (lines of ``path`` from ``first_line`` on) as text; :class:`NotUtf8` where it is
  not UTF-8. ``complete=False``: ``data`` may end mid-character (a cut read)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if not complete and e.start >= len(data) - 4:
      return data[:e.start].decode("utf-8")
    raise NotUtf8(path, first_line + data[:e.start].count(b"\n"), e.start) from None


def file_lines(path: str) -> Iterator[bytes]:
  """The lines of a file (through the path layer), split as the module docstring says."""
  with paths.open(path, "rb") as f:
    for line in f:
      if line.endswith(b"\n"):
        line = line[:-1]
      yield line[:-1] if line.endswith(b"\r") else line


def file_examples(path: str, fmt: str, limit: int | None = None,
                  chunk: int = 4096) -> Iterator[tuple[str, str | None]]:
  """(text, source or None) of each example of a line file in format ``fmt``, in file order:
  blank lines and records without text skipped; up to ``limit`` examples. Text is checked
  to be UTF-8 line by line; errors name the file and line. Lines are parsed ``chunk`` (at most
  ``limit``) at a time: no more of the file is read than the examples asked for need."""
  chunk = min(chunk, limit or chunk)
  count = 0
  lines, numbers = [], []

  def flush():
    texts, sources, keep = _parse_located(lines, fmt, path, numbers)
    for i in np.flatnonzero(keep).tolist():
      yield texts[i], None if sources is None else sources[i]

  for lineno, raw in enumerate(file_lines(path), 1):
    if is_blank(raw):
      continue
    lines.append(decode_utf8(raw, path, lineno))
    numbers.append(lineno)
    if len(lines) >= chunk:
      for ex in flush():
        yield ex
        count += 1
        if limit is not None and count >= limit:
          return
      lines, numbers = [], []
  for ex in flush():
    yield ex
    count += 1
    if limit is not None and count >= limit:
      return


def _parse_located(lines: list, fmt: str, path: str, numbers: Sequence[int]):
  try:
    return parse(lines, fmt)
  except BadRecord as e:
    raise BadRecord(e.index, e.line, f"{path} line {numbers[e.index]}") from None


# --- the tokenizer --------------------------------------------------------------------------


def encode_flat(vocab, texts: list) -> tuple[np.ndarray, np.ndarray]:
  """Ids of ``texts`` (str or bytes) as (all ids concatenated, length of each), no special
  token added: one batch call of the vocabulary (``xlingo.data.vocabulary``)."""
  return vocab.encode_flat(texts)


def piece_bytes(vocab) -> np.ndarray:
  """UTF-8 bytes of the normalised text each piece stands for (control and unknown pieces 0):
  a token's byte count before the per-example correction to the raw text
  (:func:`encode_examples`). Computed once per vocabulary."""
  return vocab.piece_bytes()


def utf8_lengths(texts: Sequence) -> np.ndarray:
  """Raw UTF-8 bytes of each text (bytes, or str encoded)."""
  return np.fromiter((len(t) if isinstance(t, bytes) else len(t.encode("utf-8")) for t in texts),
                     np.int64, count=len(texts))


@dataclasses.dataclass
class Encoded:
  """Tokenized examples, flat: ``values`` (tokens) split by ``row_splits``; per token
  ``raw_bytes``; per example ``prefix_len`` (source tokens), ``cut`` (target tokens, EOS
  included, that did not fit ``max_len``) and ``kept`` (False: dropped, in none of the other
  arrays)."""

  values: np.ndarray
  row_splits: np.ndarray
  prefix_len: np.ndarray
  raw_bytes: np.ndarray
  cut: np.ndarray
  kept: np.ndarray


def encode_examples(vocab, eos: int, texts: list, sources: np.ndarray | None = None, *,
                    max_len: int = 0, table: np.ndarray | None = None) -> Encoded:
  """Examples -> tokens: each example's source's (where ``sources`` has one, non-empty), its
  text's, then EOS.

  ``max_len`` > 0 fits a conditional example (one with a source) into a row of that many
  tokens, so that every target token trained sees the whole source: a longer pair keeps its
  source and the first target tokens that fit, without EOS (cut short, it does not end
  there); a pair whose source alone fills the row is dropped. Plain texts are left whole (the
  packer splits them).

  ``raw_bytes``: bits per byte are counted on the raw UTF-8 text, not the tokenizer's
  normalised form (NFKC, collapsed spaces, a dummy-prefix space), so that they compare across
  tokenizers. Each target token carries its piece's normalised bytes (``table``, default
  :func:`piece_bytes`), and EOS the difference to the text's raw length, so that an example's
  tokens sum to its raw length; a pair cut short carries its kept pieces' bytes. Source tokens
  carry 0 (no loss is taken there).
  """
  table = piece_bytes(vocab) if table is None else table
  tokens, lens = encode_flat(vocab, texts)
  n = len(texts)
  prefix = np.zeros(n, np.int64)
  cond = (np.flatnonzero(np.fromiter((len(s) > 0 for s in sources), bool, len(sources)))
          if sources is not None else np.zeros(0, np.int64))
  if not cond.size:
    return _encode_texts(texts, tokens, lens, eos, table)
  src_tokens, src_lens = encode_flat(vocab, list(sources[cond]))
  prefix[cond] = src_lens
  keep_t = lens.copy()  # target tokens kept
  eos_n = np.ones(n, np.int64)
  kept = np.ones(n, bool)
  if max_len:
    over = prefix + lens + 1 > max_len
    kept = ~(over & (prefix >= max_len))
    short = over & kept
    keep_t[short] = max_len - prefix[short]
    eos_n[short] = 0
  cut = np.where(kept, lens + 1 - keep_t - eos_n, lens + 1)
  out_len = prefix + keep_t + eos_n
  out_len[~kept] = 0
  splits = np.zeros(n + 1, np.int64)
  np.cumsum(out_len, out=splits[1:])
  values = np.full(int(splits[-1]), eos, np.int32)
  raw = np.zeros(values.shape[0], np.int32)
  # target tokens: the first keep_t of each example's, after its source
  local = np.arange(tokens.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens)
  take = (local < np.repeat(keep_t, lens)) & np.repeat(kept, lens)
  dest = np.repeat(splits[:-1] + prefix, lens)[take] + local[take]
  values[dest] = tokens[take]
  raw[dest] = table[tokens[take]]
  src_kept = np.repeat(kept[cond], src_lens)
  s_local = np.arange(src_tokens.shape[0]) - np.repeat(np.cumsum(src_lens) - src_lens, src_lens)
  values[np.repeat(splits[:-1][cond], src_lens)[src_kept] + s_local[src_kept]] = \
      src_tokens[src_kept]
  ends = np.flatnonzero(kept & (eos_n > 0))
  if ends.size:
    target_sum = np.bincount(np.repeat(np.arange(n), lens), weights=table[tokens],
                             minlength=n).astype(np.int64)
    raw[splits[ends + 1] - 1] = utf8_lengths([texts[i] for i in ends.tolist()]) - target_sum[ends]
  if not kept.all():
    splits = np.concatenate([[0], splits[1:][kept]])
    prefix = prefix[kept]
  return Encoded(values, splits, prefix, raw, cut, kept)


def _encode_texts(texts: list, tokens: np.ndarray, lens: np.ndarray, eos: int,
                  table: np.ndarray) -> Encoded:
  """:func:`encode_examples` for texts without a source (the common case, vectorised)."""
  n = len(texts)
  splits = np.zeros(n + 1, np.int64)
  np.cumsum(lens + 1, out=splits[1:])
  ends = splits[1:] - 1
  values = np.full(int(splits[-1]), eos, np.int32)
  body = np.ones(values.shape[0], bool)
  body[ends] = False
  values[body] = tokens
  piece = table[tokens]
  raw = np.zeros(values.shape[0], np.int32)
  raw[body] = piece
  cs = np.zeros(tokens.shape[0] + 1, np.int64)
  np.cumsum(piece, out=cs[1:])
  raw[ends] = utf8_lengths(texts) - (cs[splits[1:] - np.arange(1, n + 1)] - cs[splits[:-1] -
                                                                              np.arange(n)])
  zeros = np.zeros(n, np.int64)
  return Encoded(values, splits, zeros, raw, zeros, np.ones(n, bool))


# --- readers: tf.data -> pieces of the token stream ---------------------------------------

# Single examples cross from tf.data to NumPy this many at a time: the per-element cost of a
# Python-side tf.data iterator step is paid once per batch.
EXAMPLES_PER_TRANSFER = 256

# Default ``data.examples_per_read``: groups are read so that about this many examples are
# tokenized (and shuffled) together.
EXAMPLES_PER_READ = 4096


class _Reader:
  """tf.data batches of raw lines -> tokenized examples -> pieces of the token stream.

  A read is :meth:`fetch` (the next tf.data batch as NumPy; cheap, called in order) then
  :meth:`process` (the piece; any thread, any order), so reads can run ahead in parallel
  (iterator.py). ``iterator`` is the tf.data iterator whose state is checkpointed; :meth:`state`
  holds anything else a restore needs. ``locate(line)`` names the file and line of a raw line
  ("PATH line N") for error messages, or returns None.
  """

  kind: str
  iterator: object

  def __init__(self, table: LanguageTable, vocab, locate: Callable[[bytes], str | None] | None,
               max_len: int = 0):
    self._table = table
    self._lang_cache: dict = {}
    self._vocab = vocab
    self._eos = int(vocab.eos_id)
    self.start_id = int(vocab.start_id)
    self._locate = locate
    self._max_len = int(max_len)
    self.piece_bytes = piece_bytes(vocab)

  def fetch(self) -> dict | None:
    b = next(self.iterator, None)
    return None if b is None else {k: v.numpy() for k, v in b.items()}

  def examples(self, b: dict) -> dict:
    """A fetched batch as a ragged group of tokenized examples (packing.flatten_group's input,
    with language ids)."""
    raise NotImplementedError

  def process(self, b: dict) -> tuple:
    return packing.flatten_group(self.examples(b), self._table, self._lang_cache)

  def read(self):
    b = self.fetch()
    return None if b is None else self.process(b)

  def state(self) -> dict:
    return {}

  def check_state(self, state: dict, directory: str) -> None:
    """Refuse (DataError) a saved :meth:`state` this reader cannot continue, before anything
    is restored."""
    del state, directory

  def load_state(self, state: dict) -> None:
    del state

  def state_arrays(self) -> dict[str, np.ndarray]:
    """Arrays a restore needs besides :meth:`state` (saved with the token stream)."""
    return {}

  def load_state_arrays(self, arrays: dict) -> None:
    del arrays

  def _ids(self, codes: np.ndarray) -> np.ndarray:
    """Language ids of codes; 0 for "" (no source)."""
    ids = np.zeros(len(codes), np.int32)
    named = codes != b""
    ids[named] = packing.lang_ids_of(codes[named], self._table, self._lang_cache)
    return ids

  def _tokenize(self, lines: np.ndarray, lang: np.ndarray, src_lang: np.ndarray,
                fmt: np.ndarray) -> dict:
    """Raw non-blank lines with their language ids and formats -> tokenized examples."""
    try:
      texts, sources, keep = parse(lines.tolist(), fmt)
    except BadRecord as e:
      where = self._locate(e.line) if self._locate is not None else None
      raise BadRecord(e.index, e.line, where) from None
    if not keep.all():
      texts = [t for t, k in zip(texts, keep, strict=True) if k]
      lang, src_lang = lang[keep], src_lang[keep]
      sources = None if sources is None else sources[keep]
    enc = encode_examples(self._vocab, self._eos, texts, sources, max_len=self._max_len,
                          table=self.piece_bytes)
    if not enc.kept.all():
      lang, src_lang = lang[enc.kept], src_lang[enc.kept]
    return {"values": enc.values, "row_splits": enc.row_splits, "lang_ids": lang,
            "src_lang_ids": src_lang, "prefix_len": enc.prefix_len, "raw_bytes": enc.raw_bytes}


class ExampleReader(_Reader):
  """Single raw examples (a seqio task or per-example mixture), 256 per read, in order."""

  kind = "examples"

  def __init__(self, ds: tf.data.Dataset, table: LanguageTable, vocab,
               locate: Callable[[bytes], str | None] | None = None, max_len: int = 0,
               context: int = 0):
    super().__init__(table, vocab, locate, max_len)
    self.iterator = iter(ds.batch(EXAMPLES_PER_TRANSFER).prefetch(2))
    # > 0 (validation, train.eval_context): an example longer than a row is scored in
    # sliding windows that keep this many tokens of context (packing.sliding_windows)
    self._context = int(context)

  def process(self, b: dict) -> tuple:
    piece = super().process(b)
    if self._context and self._max_len:
      piece = packing.sliding_windows(piece, self._max_len, self._context)
    return piece

  def examples(self, b: dict) -> dict:
    return self._tokenize(b["targets"], self._ids(b["lang"]), self._ids(b["src_lang"]),
                          b["format"])


class GroupReader(_Reader):
  """Groups of raw lines drawn on the host from each task's own grouped stream, tokenized
  here: training with ``data.group_size`` = k > 0. A stream is either a host stream (an object
  with ``take()``, ``read(lines)``, ``state()`` and ``load_state()``: lineindex.PermutedLines,
  a line-file task's lines in a global permutation, whose position is saved in :meth:`state`;
  a fetch takes its groups' line numbers, the workers read them) or a
  tf.data dataset of groups (tasks.register_grouped: TFDS), iterated here and checkpointed
  with the iterator (``iterator`` lists only these).

  Every task keeps one stream for the whole run. A read takes ``ceil(examples_per_read / k)``
  groups: each goes to the task the rates owe most (``owed`` grows by each task's group rate
  per group and drops by one per group taken), so the groups taken from every task stay
  within one of their rate's share at every point of the run. (Independent random draws of
  64-example groups would need some 1,600 groups per language to come within 5% of the rates;
  a seqio mixture draws them so.) A group rate is the task's example rate over its mean group
  size (``mean_group``), so that examples come at the example rates. The read's lines are then
  shuffled together (a NumPy permutation seeded by (seed, read number)), parsed, and tokenized
  in one multi-threaded tokenizer call: no TensorFlow op and no Python tf.data step per
  example. Groups cross from tf.data ``GROUPS_PER_FETCH`` at a time per task (a Python tf.data
  step costs ~0.1 ms); the ones not yet taken wait in the reader (and in its saved state).

  The rates may move over the run (``data.temperature_schedule``): ``rates_at(x)`` gives each
  task's example rate (by position) at fraction x of the run's tokens. Progress is the tokens
  fetched so far over ``run_tokens``, counted as each task's expected tokens per group
  (``group_tokens``): a number known at fetch time, so a read's rates never wait on reads still
  being tokenized. The streams continue across rate changes (nothing is re-read from a
  restarted stream), and a restored reader (the tasks' tf.data iterators, the groups waiting,
  the read number, ``owed`` and the progress) takes exactly what the saved one would have.
  ``codes`` are each task's (lang, src_lang, format), the same for all its groups.
  """

  GROUPS_PER_FETCH = 8

  def __init__(self, datasets: Sequence[tf.data.Dataset], rates_at: Callable[[float], Sequence],
               mean_group: Sequence[float], group_tokens: Sequence[float], run_tokens: float,
               codes: Sequence[tuple[str, str, str]], table: LanguageTable, vocab,
               group_size: int, seed: int, examples_per_read: int = EXAMPLES_PER_READ,
               locate: Callable[[bytes], str | None] | None = None, max_len: int = 0):
    super().__init__(table, vocab, locate, max_len)
    self.kind = f"groups:{group_size}/{examples_per_read}"
    self._codes = [tuple(x.encode() for x in c) for c in codes]
    # A host stream (lineindex.PermutedLines: line files) hands out groups itself and saves
    # its position in state(); a tf.data stream (TFDS) is iterated here and checkpointed.
    # (tf.data datasets have a take() of their own: load_state() is the host stream's alone.)
    self._host = [t for t, ds in enumerate(datasets) if hasattr(ds, "load_state")]
    self._streams = [ds if t in self._host else
                     iter(ds.map(lambda ex: ex["targets"]).ragged_batch(self.GROUPS_PER_FETCH)
                          .prefetch(2)) for t, ds in enumerate(datasets)]
    self.iterator = [it for t, it in enumerate(self._streams) if t not in self._host]
    self._waiting: list[collections.deque] = [collections.deque() for _ in datasets]
    self._groups = max(1, -(-examples_per_read // group_size))
    self._rates_at = rates_at
    self._mean_group = np.asarray(mean_group, float)
    self._group_tokens = np.asarray(group_tokens, float)
    self._run_tokens = float(run_tokens)
    self._seed = int(seed)
    self.reads = 0
    self.progress = 0.0  # expected tokens fetched
    self.owed = np.zeros(len(datasets))

  def _group(self, t: int) -> np.ndarray | None:
    """The next group (lines) of task ``t``; None at the end of a finite stream."""
    if t in self._host:
      return self._streams[t].take()  # line numbers: read in examples(), in a worker
    waiting = self._waiting[t]
    if not waiting:
      rb = next(self._streams[t], None)
      if rb is None:
        return None
      values, splits = rb.values.numpy(), rb.row_splits.numpy()
      waiting.extend(values[a:b] for a, b in zip(splits[:-1], splits[1:]))
    return waiting.popleft()

  def fetch(self):
    """The next read's groups, numbered (the number seeds their permutation); None when a
    finite stream ends."""
    q = np.asarray(self._rates_at(min(self.progress / max(self._run_tokens, 1.0), 1.0)),
                   float) / self._mean_group
    q /= q.sum()
    take = []
    for _ in range(self._groups):
      self.owed += q
      t = int(np.argmax(self.owed))
      self.owed[t] -= 1.0
      take.append(t)
    groups, taken = [], []
    for t in take:
      g = self._group(t)
      if g is None:  # a finite stream ended: what was taken is the last read
        break
      groups.append(g)
      taken.append(t)
    if not groups:
      return None
    self.progress += float(self._group_tokens[taken].sum())
    sizes = np.array([len(g) for g in groups], np.int64)
    b = {"groups": groups, "tasks": taken, "row_splits": np.concatenate([[0], np.cumsum(sizes)]),
         "read": self.reads}
    for i, k in enumerate(("lang", "src_lang", "format")):
      b[k] = np.array([self._codes[t][i] for t in taken], object)
    self.reads += 1
    return b

  def _values(self, b: dict) -> np.ndarray:
    """A fetched read's lines, in group order: a host stream's groups are read here (one read
    per task), so that reading runs in the workers, not in the in-order fetch."""
    splits = b["row_splits"]
    out = np.empty(int(splits[-1]), object)
    host: dict[int, list[int]] = collections.defaultdict(list)
    for i, (t, g) in enumerate(zip(b["tasks"], b["groups"], strict=True)):
      if t in self._host:
        host[t].append(i)
      else:
        out[splits[i]:splits[i + 1]] = g
    for t, idx in host.items():
      at = np.concatenate([np.arange(splits[i], splits[i + 1]) for i in idx])
      out[at] = self._streams[t].read(np.concatenate([b["groups"][i] for i in idx]))
    return out

  def examples(self, b: dict) -> dict:
    sizes = np.diff(b["row_splits"])
    values = self._values(b)
    rng = np.random.default_rng([self._seed, b["read"]])
    order = rng.permutation(values.shape[0])
    return self._tokenize(values[order], np.repeat(self._ids(b["lang"]), sizes)[order],
                          np.repeat(self._ids(b["src_lang"]), sizes)[order],
                          np.repeat(b["format"], sizes)[order])

  def state(self) -> dict:
    return {"reads": self.reads, "progress": self.progress, "owed": self.owed.tolist(),
            "line_streams": {str(t): self._streams[t].state() for t in self._host}}

  def check_state(self, state: dict, directory: str) -> None:
    saved = set(state.get("line_streams", {}))
    if saved != {str(t) for t in self._host}:
      raise DataError(
          f"data state in {directory} was saved by an input pipeline that read "
          f"{len(saved)} of the {len(self._streams)} tasks as permuted line files, this run "
          f"reads {len(self._host)} (another data config, or an xlingo version that shuffled "
          "line files within blocks); resume with the config and version that wrote it")

  def load_state(self, state: dict) -> None:
    for t in self._host:
      self._streams[t].load_state(state["line_streams"][str(t)])
    self.reads = int(state["reads"])
    self.progress = float(state["progress"])
    self.owed = np.asarray(state["owed"], float)

  def state_arrays(self) -> dict[str, np.ndarray]:
    out = {}
    for t, waiting in enumerate(self._waiting):
      lines = [line for g in waiting for line in g]
      out[f"waiting{t}_bytes"] = np.frombuffer(b"".join(lines), np.uint8)
      out[f"waiting{t}_lines"] = np.array([len(x) for x in lines], np.int64)
      out[f"waiting{t}_groups"] = np.array([len(g) for g in waiting], np.int64)
    return out

  def load_state_arrays(self, arrays: dict) -> None:
    for t, waiting in enumerate(self._waiting):
      waiting.clear()
      data = arrays[f"waiting{t}_bytes"].tobytes()
      ends = np.cumsum(arrays[f"waiting{t}_lines"])
      lines = np.array([data[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)],
                       object)
      bounds = np.concatenate([[0], np.cumsum(arrays[f"waiting{t}_groups"])])
      waiting.extend(lines[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
