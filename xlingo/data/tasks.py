"""SeqIO task builders: one LM task per language, one conditional task per parallel pair.

``data_tasks/`` calls these to register tasks; this module holds the logic.

Tasks deliver raw examples: parsing and tokenization happen on the host, after the mixture, in
one place for training and evaluation alike (readers.py). Every task emits, per example:
  targets      the raw line (a string: text, source<TAB>target, or a JSON record)
  lang         the language code of the target text (a string; the readers map it to an id
               through the config's language table, so tasks stay independent of that order)
  src_lang     the source language code for conditional tasks, "" for LM tasks
  format       how the line is an example: "" (text), "tsv", or "json:<field>" (readers.py)
Blank lines are dropped here (cheap tf.data ops on batches of lines).

Training with ``data.group_size`` = k > 0 reads a line task's files in a global permutation
on the host (lineindex.PermutedLines, built by inputs.train_iterator) and a TFDS task through
its *grouped* twin. Each task also has a grouped twin (:func:`register_grouped`; for a line
task only its file list is used in training, to decide the hosts' shares) over the same files
or TFDS dataset, whose elements are groups of
up to k examples of that task (for line files, k lines of one block of 16k lines, shuffled
within the block when the dataset is), with the same features (``targets`` a vector of lines).
The host takes groups from the tasks' twins at the rates, and parses and tokenizes
``data.examples_per_read`` examples at once (readers.GroupReader): seqio/tf.data do work
per group, not per example. Each block's last group is short; the group rates account for
that (:func:`mean_group_size`).

File lists are expanded, sized, counted and checked through the path layer (xlingo/paths.py),
so ``gs://`` globs work; the lines themselves are read by tf.data (tf.io.gfile), which reaches
real GCS but not a GCS emulator.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from xlingo import paths
from xlingo.data import readers
from xlingo.errors import DataError

PASSTHROUGH_FEATURES = ("lang", "src_lang", "format")


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """A task's raw lines: tokenization happens on the host, after the mixture (readers.py)."""
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.string, rank=0)}


def grouped_output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """A grouped task's vectors of raw lines."""
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.string, rank=1)}


def lm_task_name(prefix: str, lang: str) -> str:
  return f"{prefix}.lm.{lang}"


def mt_task_name(prefix: str, src: str, tgt: str) -> str:
  return f"{prefix}.mt.{src}_{tgt}"


def count_lines(files: Sequence[str]) -> int:
  """Non-blank lines (the examples of a line task) in the files."""
  return sum(file_line_counts(p)[0] for p in files)


def expand_pattern(pattern: str, what: str) -> list[str]:
  """Glob a pattern (local or gs://); one matching nothing or only empty files is a DataError."""
  files = paths.glob(pattern)
  if not files:
    raise DataError(f"{what}: no file matches {pattern!r}; check the path or glob in the config")
  for p in files:
    if paths.size(p) == 0:
      raise DataError(f"{what}: file {p} is empty; remove it or point the glob elsewhere")
  return files


def check_utf8(files: Sequence[str], what: str, max_bytes: int = 64 << 20) -> None:
  """Fail early, naming the file and line, on text that is not valid UTF-8."""
  for p in files:
    with paths.open(p, "rb") as f:
      data = f.read(max_bytes)
    try:
      readers.decode_utf8(data, p, complete=len(data) < max_bytes)
    except DataError as e:
      raise DataError(f"{what}: {e}") from None


def check_pair_lines(files: Sequence[str], what: str, max_bytes: int = 64 << 20) -> None:
  """Fail early, naming the file and line, on a line of a pair file that is not
  source<TAB>target: no tab (a sentence without its other side, e.g. two columns pasted out of
  step) or several (another layout, e.g. id<TAB>source<TAB>target)."""
  for p in files:
    seen = 0
    for n, line in enumerate(readers.file_lines(p), 1):
      seen += len(line) + 1
      if seen > max_bytes:
        break
      tabs = line.count(b"\t")
      if tabs != 1 and not readers.is_blank(line):
        raise DataError(f"{what}: {p} line {n} has {tabs} tabs; each line of a pair file must "
                        "be source<TAB>target with exactly one tab (fix that line or the file's "
                        "layout)")


# --- per-example preprocessors: raw lines, blank ones dropped --------------------------------

# Lines pass through tf.data this many at a time on their way to the task's examples: a few
# ops per batch instead of a map and a filter per line (docs/PERFORMANCE.md, "Data pipeline").
LINES_PER_BATCH = 1024


def _nonblank(lines: tf.Tensor) -> tf.Tensor:
  return tf.strings.length(tf.strings.strip(lines)) > 0


def _raw_examples(lang: str, src_lang: str, fmt: str, text_field: str | None = None):
  """Lines (or TFDS records' ``text_field``) -> raw examples (module docstring), in batches."""

  def fn(ds):
    if text_field is not None:
      ds = ds.map(lambda ex: ex[text_field], num_parallel_calls=tf.data.AUTOTUNE)

    def fields(lines):
      lines = tf.boolean_mask(lines, _nonblank(lines))
      n = tf.size(lines)
      return {"targets": lines, "lang": tf.fill([n], lang), "src_lang": tf.fill([n], src_lang),
              "format": tf.fill([n], fmt)}

    return ds.batch(LINES_PER_BATCH).map(fields, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

  return fn


# --- sources ---------------------------------------------------------------------------------


class _ListedFiles:
  """A file source over explicit file lists (globbed by the path layer): seqio would glob each
  name again through tf.io.gfile."""

  def list_shards(self, split: str) -> Sequence[str]:
    return list(self._split_to_filepattern[split])


class _LineSource(_ListedFiles, seqio.TextLineDataSource):
  """One example per line (seqio's line source)."""


class TfdsSource(seqio.TfdsDataSource):
  """seqio's TFDS source that reads only this process's share of a split.

  With ``shard_info`` for n processes: whole files when the split has at least n (TFDS's
  ``input_context``, as seqio does), else an even slice of its examples
  (``tfds.even_splits``), so that no process reads what another one reads.
  """

  def __init__(self, tfds_name: str, splits: Mapping[str, str], tfds_data_dir: str | None):
    super().__init__(tfds_name=tfds_name, splits=dict(splits), tfds_data_dir=tfds_data_dir)
    self._tfds_splits = dict(splits)  # our split name -> the TFDS split

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # every shard_info comes here, however few files the split has

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    n = shard_info.num_shards if shard_info else 1
    if n <= 1 or len(self.list_shards(split)) >= n:
      return super().get_dataset(split, shuffle, seed, shard_info if n > 1 else None, **kwargs)
    loader = self.tfds_dataset
    part = tfds.even_splits(self._tfds_splits[split], n)[shard_info.index]
    return tfds.load(loader.name, split=part, data_dir=loader.data_dir, shuffle_files=shuffle,
                     download=True, try_gcs=True,
                     read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True))


# --- grouped twins: k untokenized examples per element --------------------------------------

# A file is read this many groups at a time: one tf.data element per block of lines, cut into
# groups in one op. About 1.5 CPU-us per line; a tf.data element per line costs 4-10 us
# (docs/PERFORMANCE.md).
GROUPS_PER_BLOCK = 16


def _read_line_groups(group_size: int, lang: str, src_lang: str, fmt: str):
  """A file -> its lines in groups of ``group_size`` (the grouped line source's reader).

  The file is read in blocks of ``group_size * GROUPS_PER_BLOCK`` lines; each block's blank
  lines are dropped, the rest shuffled when a seed is given (so that a group is not a run of
  consecutive lines) and cut into groups, all in a few ops per block. A block's last group may
  be short (:func:`mean_group_size` counts the groups). The lines are otherwise raw: the host
  splits TSV and parses JSON (no per-line TensorFlow op).
  """

  def split(lines):
    n = tf.size(lines, out_type=tf.int64)
    bounds = tf.concat([tf.range(0, n, group_size, dtype=tf.int64), [n]], 0)
    k = tf.size(bounds) - 1
    return {"targets": tf.RaggedTensor.from_row_splits(lines, bounds),
            "lang": tf.fill([k], lang), "src_lang": tf.fill([k], src_lang),
            "format": tf.fill([k], fmt)}

  def read(path, seed=None):
    """``seed``: None (file order) or an int64 [2] tensor, one per file of a pass."""
    blocks = tf.data.TextLineDataset(path).batch(group_size * GROUPS_PER_BLOCK)
    blocks = blocks.map(lambda lines: tf.boolean_mask(lines, _nonblank(lines)))
    if seed is not None:
      blocks = blocks.enumerate().map(lambda j, lines: tf.random.experimental.stateless_shuffle(
          lines, seed=tf.stack([seed[0], seed[1] * (1 << 24) + j])))
    return blocks.map(split).unbatch()

  return read


def _tfds_groups(group_size: int, lang: str, text_field: str):
  def fn(ds, output_features=None, sequence_length=None):  # noqa: ARG001
    texts = ds.map(lambda ex: ex[text_field], num_parallel_calls=tf.data.AUTOTUNE)
    texts = texts.filter(_nonblank).batch(group_size)
    return texts.map(lambda t: {"targets": t, "lang": tf.constant(lang),
                                "src_lang": tf.constant(""),
                                "format": tf.constant(readers.FORMAT_TEXT)})

  return fn


class _GroupedLineSource(_ListedFiles, seqio.FileDataSource):
  """The files of a grouped line task, read by :func:`_read_line_groups`.

  Files are interleaved sequentially: seqio's parallel interleave runs a thread pool per task,
  which with one small element per group costs more CPU than it saves (docs/PERFORMANCE.md).
  When shuffling, each block's lines are shuffled too, seeded by (seed, file position, block).
  ``read_file_fn`` is :func:`_read_line_groups`'s reader.
  """

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
    del kwargs
    files = self.list_shards(split)
    if not files:
      raise DataError(f"no file for split {split!r}: {self._split_to_filepattern[split]}")
    files_ds = tf.data.Dataset.from_tensor_slices(np.array(files, dtype=str))
    if shard_info:
      files_ds = files_ds.shard(shard_info.num_shards, shard_info.index)
    if not shuffle:
      return files_ds.interleave(self._reader, cycle_length=self._cycle_length,
                                 block_length=self._block_length)
    base = int(np.random.randint(1 << 31)) if seed is None else int(seed)
    files_ds = files_ds.shuffle(len(files), seed=seed).enumerate()
    return files_ds.interleave(
        lambda i, path: self._reader(path, tf.stack([tf.constant(base, tf.int64), i])),
        cycle_length=self._cycle_length, block_length=self._block_length)


@functools.lru_cache(maxsize=4096)
def _file_lines(path: str, size: int, mtime: float, group_size: int) -> tuple[int, int]:  # noqa: ARG001
  """(non-blank lines, groups of :func:`_read_line_groups`) of a file; cached per
  (path, size, mtime)."""
  nonblank = groups = 0
  block = group_size * GROUPS_PER_BLOCK
  lines = readers.file_lines(path)
  for chunk in iter(lambda: list(itertools.islice(lines, block)), []):
    n = sum(1 for line in chunk if not readers.is_blank(line))
    nonblank += n
    groups += -(-n // group_size)
  return nonblank, groups


def file_line_counts(path: str, group_size: int = 1) -> tuple[int, int]:
  """(non-blank lines, groups of ``group_size``) of a text file."""
  return _file_lines(path, paths.size(path), paths.mtime(path), group_size)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How a per-example task was built, so that its grouped twin can be built alike."""

  kind: str  # lines | jsonl | tsv | tfds
  source: seqio.DataSource
  vocab: seqio.Vocabulary
  lang: str
  src_lang: str = ""
  field: str = ""
  fmt: str = readers.FORMAT_TEXT  # how a line is an example (readers.py)
  files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)  # line files


_SPECS: dict[str, _Spec] = {}


def task_spec(name: str) -> _Spec:
  """How task ``name`` was registered (kind, source, languages, format, files)."""
  return _SPECS[name]


def find_line(line: bytes) -> str | None:
  """"PATH line N" of the first registered line file holding ``line`` (for error messages)."""
  for spec in list(_SPECS.values()):
    for files in spec.files.values():
      for path in files:
        for n, got in enumerate(readers.file_lines(path), 1):
          if got == line:
            return f"{path} line {n}"
  return None


def grouped_task_name(name: str, group_size: int, shuffle_buffer: int) -> str:
  return f"{name}.g{group_size}.b{shuffle_buffer}"


def register_grouped(name: str, group_size: int, shuffle_buffer: int) -> str:
  """Register (once) the grouped twin of task ``name``; returns its name.

  Same files (or TFDS dataset) and language(s); elements are groups of up to ``group_size``
  texts (module docstring). Line files are cut into groups block by block, so each block's
  last group is short (:func:`mean_group_size`). seqio shuffles the groups with a
  buffer of ``ceil(shuffle_buffer / group_size)`` groups, so about ``shuffle_buffer`` examples
  are held per task, as with per-example shuffling.
  """
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1")
  spec = _SPECS.get(name)
  if spec is None:
    raise KeyError(f"task {name!r} was not registered through xlingo.data.tasks")
  gname = grouped_task_name(name, group_size, shuffle_buffer)
  if gname in seqio.TaskRegistry.names():
    return gname
  if spec.kind == "tfds":
    source, pre = spec.source, [_tfds_groups(group_size, spec.lang, spec.field)]
  else:
    src = spec.source
    source = _GroupedLineSource(
        read_file_fn=_read_line_groups(group_size, spec.lang, spec.src_lang, spec.fmt),
        split_to_filepattern={s: list(f) for s, f in spec.files.items()},
        num_input_examples={s: src.num_input_examples(s) for s in src.splits})
    pre = []
  seqio.TaskRegistry.add(
      gname, source=source, preprocessors=pre,
      output_features=grouped_output_features(spec.vocab),
      shuffle_buffer_size=max(1, -(-shuffle_buffer // group_size)))
  return gname


def mean_group_size(name: str, group_size: int, split: str = "train") -> float:
  """Examples per group in one pass over task ``name``'s split, grouped by ``group_size``.

  Line files: non-blank lines / the groups their blocks are cut into. TFDS tasks are
  grouped after seqio's repeat (blank texts filtered first), so their groups are full.
  The training mixture divides each task's example rate by this, so that it still draws
  examples at that rate.
  """
  spec = _SPECS[name]
  if spec.kind == "tfds":
    return float(group_size)
  examples = groups = 0
  for path in spec.files[split]:
    nonblank, g = file_line_counts(path, group_size)
    examples += nonblank
    groups += g
  return examples / max(groups, 1)


# --- registration ---------------------------------------------------------------------------


def _remove(name: str) -> None:
  """Drop a task (and its grouped twins) before it is registered again."""
  for n in [n for n in seqio.TaskRegistry.names() if n == name or n.startswith(name + ".g")]:
    seqio.TaskRegistry.remove(n)
  _SPECS.pop(name, None)


def _register_lines(name: str, kind: str, lang: str, src_lang: str, fmt: str,
                    split_to_files: Mapping[str, Sequence[str]], vocab: seqio.Vocabulary,
                    num_examples: Mapping[str, int] | None, field: str = "") -> seqio.Task:
  files = {s: list(f) for s, f in split_to_files.items()}
  if num_examples is None:
    num_examples = {s: count_lines(f) for s, f in files.items()}
  source = _LineSource(files, num_input_examples=dict(num_examples))
  _remove(name)
  _SPECS[name] = _Spec(kind, source, vocab, lang, src_lang=src_lang, field=field, fmt=fmt,
                       files=files)
  return seqio.TaskRegistry.add(name, source=source,
                                preprocessors=[_raw_examples(lang, src_lang, fmt)],
                                output_features=output_features(vocab))


def register_lm_task(
    name: str,
    lang: str,
    split_to_files: Mapping[str, Sequence[str]],
    vocab: seqio.Vocabulary,
    *,
    jsonl_field: str | None = None,
    num_examples: Mapping[str, int] | None = None,
) -> seqio.Task:
  """One language's LM task over plain-text lines (or JSONL records with a text field)."""
  if jsonl_field is None:
    return _register_lines(name, "lines", lang, "", readers.FORMAT_TEXT, split_to_files, vocab,
                           num_examples)
  return _register_lines(name, "jsonl", lang, "", readers.FORMAT_JSON + jsonl_field,
                         split_to_files, vocab, num_examples, field=jsonl_field)


def register_tfds_lm_task(
    name: str,
    lang: str,
    tfds_name: str,
    splits: Mapping[str, str],
    vocab: seqio.Vocabulary,
    *,
    text_field: str = "text",
    tfds_data_dir: str | None = None,
) -> seqio.Task:
  """One language's LM task over a TFDS dataset (e.g. wiki40b/de, c4/multilingual's de)."""
  source = TfdsSource(tfds_name, splits, tfds_data_dir)
  _remove(name)
  _SPECS[name] = _Spec("tfds", source, vocab, lang, field=text_field)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[_raw_examples(lang, "", readers.FORMAT_TEXT, text_field)],
      output_features=output_features(vocab),
  )


def register_translation_task(
    name: str,
    src: str,
    tgt: str,
    split_to_files: Mapping[str, Sequence[str]],
    vocab: seqio.Vocabulary,
    *,
    num_examples: Mapping[str, int] | None = None,
) -> seqio.Task:
  """A conditional task over TSV lines ``source<TAB>target`` (packed prefix-LM)."""
  return _register_lines(name, "tsv", tgt, src, readers.FORMAT_TSV, split_to_files, vocab,
                         num_examples)
