"""Exact token counts of a task's split, as training reads it: the numbers every rate and the
start-of-run table stand on.

A split is read and tokenized as the readers do (readers.py: one parser, one tokenizer, pairs
cut to fit ``data.seq_len``), so the counts are the tokens training will see, EOS included.

Line files are counted whole while the task's train files hold at most ``EXACT_BYTES``
(the embedded corpus, 9 MB, takes about a second). Past that, every k-th example of every file
is tokenized (k = bytes / EXACT_BYTES, so about EXACT_BYTES of text, a few seconds) and the
token count scaled by the exact example count: lines sampled across whole files, not a file's
first lines (corpus files often open with long title and contents lines, which biased the old
first-256-lines estimate by -31% to +70%). With some hundred thousand sampled examples the
estimate is within a fraction of a percent. Counts are kept per file for the process (keyed
by path, size, modification time, format, vocabulary and seq_len), so plans made again in one
process do not tokenize again. Caching them by content across runs was not chosen: it would
still read and hash every byte per run, cost the full tokenization on the first run of a large
corpus, and need a writable cache directory on every host.

TFDS splits (no files to read through) are sampled: ``TFDS_SAMPLE`` examples taken evenly
from ``TFDS_PARTS`` parts of the split, scaled by the split's example count.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import seqio

from xlingo import paths
from xlingo.data import readers, tasks
from xlingo.errors import DataError

EXACT_BYTES = 64 << 20
TFDS_SAMPLE = 4096
TFDS_PARTS = 16
_CHUNK = 8192  # examples tokenized per SentencePiece call


@dataclasses.dataclass(frozen=True)
class SplitCounts:
  """What one split holds, as training reads it."""

  examples: int  # examples (pairs dropped for a source that fills a row not among them)
  tokens: int  # their tokens, sources and EOS included
  source_tokens: int = 0  # of which a conditional task's sources
  raw_bytes: int = 0  # raw UTF-8 bytes of their target texts
  truncated: int = 0  # pairs cut in their target to fit a row
  cut_tokens: int = 0  # target tokens (EOS included) not trained: cut or in dropped pairs
  dropped: int = 0  # pairs whose source alone fills a row
  exact: bool = True  # False: scaled from a sample

  def __add__(self, o: SplitCounts) -> SplitCounts:
    f = [x.name for x in dataclasses.fields(self) if x.name != "exact"]
    return SplitCounts(**{k: getattr(self, k) + getattr(o, k) for k in f},
                       exact=self.exact and o.exact)

  def scaled(self, factor: float) -> SplitCounts:
    """Every count times ``factor`` (a sample's counts for the whole split)."""
    f = [x.name for x in dataclasses.fields(self) if x.name != "exact"]
    return SplitCounts(**{k: int(round(getattr(self, k) * factor)) for k in f}, exact=False)


def vocab_key(vocab) -> str:
  """A vocabulary's identity for the count cache: the SHA-1 of its file."""
  return vocab.checksum


def _count(vocab, table, texts: list, sources, seq_len: int) -> SplitCounts:
  enc = readers.encode_examples(vocab, int(vocab.eos_id), texts, sources, max_len=seq_len,
                                table=table)
  lens = np.diff(enc.row_splits)
  kept = int(enc.kept.sum())
  return SplitCounts(examples=kept, tokens=int(lens.sum()),
                     source_tokens=int(enc.prefix_len.sum()),
                     raw_bytes=int(enc.raw_bytes.sum()),
                     truncated=int(((enc.cut > 0) & enc.kept).sum()),
                     cut_tokens=int(enc.cut.sum()), dropped=len(texts) - kept)


def _examples(path: str, fmt: str, every: int):
  """A file's examples (text, source), every ``every``-th from the middle of the first
  stride on, and how many there were in all (the second item, once the first is used up)."""
  it = readers.file_examples(path, fmt)
  seen = itertools.count()
  counted = (ex for ex, i in zip(it, seen) if i % every == every // 2)
  return counted, seen


_CACHE: dict[tuple, SplitCounts] = {}


def _file_counts(path: str, fmt: str, vocab, seq_len: int, every: int) -> SplitCounts:
  key = (paths.resolve(path), paths.size(path), paths.mtime(path), fmt, vocab_key(vocab),
         seq_len, every)
  if key not in _CACHE:
    _CACHE[key] = _read_file_counts(path, fmt, vocab, seq_len, every)
  return _CACHE[key]


def _read_file_counts(path: str, fmt: str, vocab, seq_len: int, every: int) -> SplitCounts:
  table = readers.piece_bytes(vocab)
  total = SplitCounts(0, 0)
  examples, seen = _examples(path, fmt, every)
  while True:
    chunk = list(itertools.islice(examples, _CHUNK))
    if not chunk:
      break
    texts = [t for t, _ in chunk]
    sources = np.array([s or "" for _, s in chunk], object) if fmt == readers.FORMAT_TSV else None
    total = total + _count(vocab, table, texts, sources, seq_len)
  n = next(seen)  # examples in the file (the counter has passed them all)
  if every == 1 or not total.examples + total.dropped:
    return total
  return total.scaled(n / (total.examples + total.dropped))


def line_task_counts(name: str, split: str, vocab, seq_len: int) -> SplitCounts:
  """Counts of a line-file task's split (module docstring: whole, or every k-th example)."""
  spec = tasks.task_spec(name)
  files = spec.files.get(split) or []
  if not files:
    raise DataError(f"task {name}: no {split} files; check its file patterns")
  every = max(1, -(-sum(paths.size(p) for p in files) // EXACT_BYTES))
  total = SplitCounts(0, 0)
  for path in files:
    total = total + _file_counts(path, spec.fmt, vocab, int(seq_len), every)
  return total


def sampled_task_counts(name: str, split: str, vocab, seq_len: int,
                        sample: int = TFDS_SAMPLE, parts: int = TFDS_PARTS) -> SplitCounts:
  """Counts of a split read through its task (TFDS): ``sample`` examples taken evenly from
  ``parts`` parts of the split (the source's own sharding), scaled to its example count."""
  task = seqio.get_mixture_or_task(name)
  n = int(task.num_input_examples(split) or 0)
  texts, sources, formats = [], [], []
  for i in range(parts):
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                          shard_info=seqio.ShardInfo(i, parts), trim_output_features=False)
    for ex in ds.take(-(-sample // parts)).as_numpy_iterator():
      texts.append(ex["targets"])
      formats.append(ex["format"])
  if not texts:
    raise DataError(f"task {name}: its {split} split yields no examples; check its data")
  texts, srcs, keep = readers.parse(texts, np.array(formats, object))
  texts = [t for t, k in zip(texts, keep, strict=True) if k]
  sources = None if srcs is None else srcs[keep]
  got = _count(vocab, readers.piece_bytes(vocab), texts, sources, seq_len)
  read = len(formats)
  if not n or read == n:  # the whole split was read (or its size is unknown)
    return got
  return got.scaled(n / read)


def task_counts(name: str, split: str, vocab, seq_len: int) -> SplitCounts:
  """Counts of one task's split: exact for line files (module docstring), sampled for TFDS."""
  spec = tasks.task_spec(name)
  if spec.files.get(split):
    return line_task_counts(name, split, vocab, seq_len)
  return sampled_task_counts(name, split, vocab, seq_len)
