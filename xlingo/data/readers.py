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

**Tokens.** SentencePiece on the host (the vocabulary's Python processor), all texts of a read
in one multi-threaded call. An example's tokens are its source's (a conditional example's
``prefix_len`` first tokens), then its text's, then EOS.

**Readers.** tf.data elements (seqio tasks and mixtures of raw lines, tasks.py) become pieces
of the token stream that packing.py packs:

  ExampleReader    single examples (evaluation; training with ``data.group_size=0``), 256 per
                   read, in stream order
  TextGroupReader  groups of k examples (training, ``data.group_size`` = k > 0): about
                   ``data.examples_per_read`` examples per read, shuffled together (seeded)
"""

from __future__ import annotations

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


def encode_examples(sp, eos: int, texts: list,
                    sources: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Examples -> (values, row_splits, prefix_len): each example's tokens are its source's (where
  ``sources`` has one, non-empty), its text's and EOS; ``prefix_len`` counts the source's."""
  tokens, lens = encode_flat(sp, texts)
  prefix = np.zeros(len(texts), np.int64)
  cond = (np.flatnonzero(np.fromiter((len(s) > 0 for s in sources), bool, len(sources)))
          if sources is not None else np.zeros(0, np.int64))
  if cond.size:  # conditional examples: source tokens, then the target's
    src_tokens, src_lens = encode_flat(sp, list(sources[cond]))
    prefix[cond] = src_lens
    parts = np.split(tokens, np.cumsum(lens)[:-1])
    for i, s in zip(cond.tolist(), np.split(src_tokens, np.cumsum(src_lens)[:-1]), strict=True):
      parts[i] = np.concatenate([s, parts[i]])
    tokens = np.concatenate(parts)
    lens = lens + prefix
  lens = lens + 1  # EOS
  splits = np.zeros(len(lens) + 1, np.int64)
  np.cumsum(lens, out=splits[1:])
  values = np.full(int(splits[-1]), eos, np.int32)
  body = np.ones(values.shape[0], bool)
  body[splits[1:] - 1] = False
  values[body] = tokens
  return values, splits, prefix


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

  def __init__(self, table: LanguageTable, vocab, locate: Callable[[bytes], str | None] | None):
    self._table = table
    self._lang_cache: dict = {}
    self._sp = vocab.tokenizer
    self._eos = int(vocab.eos_id)
    self._locate = locate

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

  def load_state(self, state: dict) -> None:
    del state

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
    values, splits, prefix = encode_examples(self._sp, self._eos, texts, sources)
    return {"values": values, "row_splits": splits, "lang_ids": lang, "src_lang_ids": src_lang,
            "prefix_len": prefix}


class ExampleReader(_Reader):
  """Single raw examples (a seqio task or per-example mixture), 256 per read, in order."""

  kind = "examples"

  def __init__(self, ds: tf.data.Dataset, table: LanguageTable, vocab,
               locate: Callable[[bytes], str | None] | None = None):
    super().__init__(table, vocab, locate)
    self.iterator = iter(ds.batch(EXAMPLES_PER_TRANSFER).prefetch(2))

  def examples(self, b: dict) -> dict:
    return self._tokenize(b["targets"], self._ids(b["lang"]), self._ids(b["src_lang"]),
                          b["format"])


def _flat_batches(ds: tf.data.Dataset, n: int):
  """An iterator over batches of ``n`` elements: ``targets`` (a vector per element) as flat
  ``values`` + ``row_splits``, the other features stacked."""

  def flat(b):
    t = b.pop("targets")
    return {"values": t.values, "row_splits": t.row_splits, **b}

  return iter(ds.ragged_batch(n).map(flat).prefetch(2))


class TextGroupReader(_Reader):
  """Groups of raw lines from a grouped mixture (tasks.register_grouped), tokenized here.

  Each read takes ``ceil(examples_per_read / group_size)`` groups in one tf.data step, shuffles
  their lines together (a NumPy permutation seeded by (seed, read number), so a restored
  reader repeats it), parses them and tokenizes all texts in one multi-threaded SentencePiece
  call: no TensorFlow op and no Python tf.data step per example.
  """

  def __init__(self, ds: tf.data.Dataset, table: LanguageTable, vocab, group_size: int,
               seed: int, examples_per_read: int = EXAMPLES_PER_READ,
               locate: Callable[[bytes], str | None] | None = None):
    super().__init__(table, vocab, locate)
    self.kind = f"text_groups:{group_size}/{examples_per_read}"
    self.iterator = _flat_batches(ds, max(1, -(-examples_per_read // group_size)))
    self._seed = int(seed)
    self.reads = 0

  def fetch(self):
    """The next groups, numbered: the number seeds their permutation."""
    b = super().fetch()
    if b is not None:
      b["read"] = self.reads
      self.reads += 1
    return b

  def examples(self, b: dict) -> dict:
    sizes = np.diff(b["row_splits"])
    rng = np.random.default_rng([self._seed, b["read"]])
    order = rng.permutation(b["values"].shape[0])
    return self._tokenize(b["values"][order], np.repeat(self._ids(b["lang"]), sizes)[order],
                          np.repeat(self._ids(b["src_lang"]), sizes)[order],
                          np.repeat(b["format"], sizes)[order])

  def state(self) -> dict:
    return {"reads": self.reads}

  def load_state(self, state: dict) -> None:
    self.reads = int(state["reads"])
