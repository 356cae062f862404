"""SeqIO task builders: one LM task per language, one conditional task per parallel pair.

``data_tasks/`` calls these to register tasks; this module holds the logic.

Every task emits, per example:
  targets      int32 token ids, EOS appended (for conditional tasks: source then target tokens)
  lang         the language code of the target text (a string; the pipeline maps it to an id
               through the config's language table, so tasks stay independent of that order)
  src_lang     the source language code for conditional tasks, "" for LM tasks
  prefix_len   how many leading tokens are the source (no loss there); 0 for LM tasks

Each task also has a *grouped* twin (:func:`register_grouped`, used by training mixtures when
``data.group_size`` = k > 0) over the same files or TFDS dataset, whose elements are groups of
up to k untokenized examples of that task (for line files, k lines of one block of 16k lines,
shuffled within the block when the dataset is):
  targets      [n] strings: the raw lines (text, source<TAB>target, or JSON records)
  lang         the target language code (one per group)
  src_lang     the source language code, "" for LM tasks
  format       how a line becomes an example: "" (text), "tsv", or "json:<field>"
The mixture samples groups, not examples, and the host parses and tokenizes
``data.examples_per_read`` examples at once (xlingo/data/pipeline.py, ``TextGroupReader``):
seqio/tf.data do work per group, not per example. Each block's last group is short; the
training mixture's rates account for that (:func:`mean_group_size`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from xlingo.errors import DataError

PASSTHROUGH_FEATURES = ("lang", "src_lang", "prefix_len")




def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}


def lm_task_name(prefix: str, lang: str) -> str:
  return f"{prefix}.lm.{lang}"


def mt_task_name(prefix: str, src: str, tgt: str) -> str:
  return f"{prefix}.mt.{src}_{tgt}"


def count_lines(paths: Sequence[str]) -> int:
  """Non-blank lines (the examples of a line task) in the files."""
  return sum(file_line_counts(p)[0] for p in paths)


def expand_pattern(pattern: str, what: str) -> list[str]:
  """Glob a pattern; a pattern matching nothing or only empty files is a DataError."""
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise DataError(f"{what}: no file matches {pattern!r}; check the path or glob in the config")
  for p in paths:
    if os.path.getsize(p) == 0:
      raise DataError(f"{what}: file {p} is empty; remove it or point the glob elsewhere")
  return paths


def check_utf8(paths: Sequence[str], what: str, max_bytes: int = 64 << 20) -> None:
  """Fail early, naming the file and line, on text that is not valid UTF-8."""
  for p in paths:
    with open(p, "rb") as f:
      data = f.read(max_bytes)
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      if e.start >= len(data) - 4 and len(data) == max_bytes:
        continue  # cut mid-character by max_bytes
      line = data[: e.start].count(b"\n") + 1
      raise DataError(
          f"{what}: {p} line {line} is not valid UTF-8 (byte offset {e.start}); "
          "re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
      ) from None


# --- preprocessors -------------------------------------------------------------------------


def _lm_fields(lang: str, text_key: str | None):
  """Line or JSONL record -> {targets: text, lang, src_lang, prefix_len}."""

  @seqio.map_over_dataset
  def fn(ex):
    text = ex["text"] if text_key is None else ex[text_key]
    return {
        "targets": text,
        "lang": tf.constant(lang),
        "src_lang": tf.constant(""),
        "prefix_len": tf.constant(0, tf.int32),
    }

  return fn


def _line_to_text(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.map(lambda line: {"text": line}, num_parallel_calls=tf.data.AUTOTUNE)


def _jsonl_to_text(text_field: str):
  def parse(line):
    def py(b):
      if not b.strip():
        return ""
      obj = json.loads(b.decode("utf-8"))
      text = obj.get(text_field, "") if isinstance(obj, dict) else ""
      return text if isinstance(text, str) else ""

    text = tf.numpy_function(py, [line], tf.string, stateful=False)
    text.set_shape([])
    return {"text": text}

  def fn(ds):
    # numpy_function is not checkpointable by tf.data; JSONL corpora resume by replay.
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

  return fn


def _drop_empty(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.filter(lambda ex: tf.strings.length(tf.strings.strip(ex["text"])) > 0)


def _tsv_to_pair(src: str, tgt: str):
  @seqio.map_over_dataset
  def fn(line):
    parts = tf.strings.split(line, "\t", maxsplit=1)
    parts = tf.pad(parts, [[0, 2 - tf.shape(parts)[0]]])
    return {"inputs": parts[0], "targets": parts[1], "src": src, "tgt": tgt}

  return fn


def _pair_to_prefix_lm(output_features, sequence_length=None):  # noqa: ARG001
  """Tokenize source and target; targets = source + target + EOS, no loss on the source."""
  vocab = output_features["targets"].vocabulary

  def fn(ex):
    src_ids = tf.cast(vocab.encode_tf(ex["inputs"]), tf.int32)
    tgt_ids = tf.cast(vocab.encode_tf(ex["targets"]), tf.int32)
    ids = tf.concat([src_ids, tgt_ids, [vocab.eos_id]], axis=0)
    return {
        "targets": ids,
        "lang": ex["tgt"],
        "src_lang": ex["src"],
        "prefix_len": tf.size(src_ids, out_type=tf.int32),
    }

  return fn


# Lines are tokenized this many at a time: one SentencePiece op call per batch instead of one
# per line (about 3-4x the per-line rate on 2 CPU cores; docs/PERFORMANCE.md, "Data pipeline").
TOKENIZE_BATCH = 1024


def tokenize_batched(ds, output_features, sequence_length=None, batch_size=TOKENIZE_BATCH):  # noqa: ARG001
  """Tokenize ``targets`` and append EOS, ``batch_size`` examples per SentencePiece call.

  The same examples, in the same order, as ``seqio.preprocessors.tokenize`` followed by
  ``append_eos`` (lines are batched, encoded as one ragged batch, and unbatched again), so
  seqio's shuffling and mixture sampling still see single examples. The other features pass
  through unchanged.
  """
  vocab = output_features["targets"].vocabulary
  eos = tf.constant(vocab.eos_id, tf.int32)

  def encode(b):
    ids = tf.cast(vocab.encode_tf(b["targets"]), tf.int32)
    ids = tf.concat([ids, tf.RaggedTensor.from_tensor(tf.fill([ids.nrows(), 1], eos))], axis=1)
    return {**b, "targets": ids}

  def dense(ex):
    t = ex["targets"]
    return {**ex, "targets": t if isinstance(t, tf.Tensor) else t.to_tensor()}

  ds = ds.batch(batch_size).map(encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return ds.map(dense)


def _lines_to_lm_examples(lang: str):
  """Text lines -> tokenized LM examples, all in batches: one tf.data step per batch.

  Equivalent to ``_line_to_text``, ``_drop_empty``, ``_lm_fields`` and
  :func:`tokenize_batched` in turn (same examples, same order), with no per-line map or filter
  before the batch is split up again.
  """

  def fn(ds, output_features, sequence_length=None, batch_size=TOKENIZE_BATCH):  # noqa: ARG001
    vocab = output_features["targets"].vocabulary
    eos = tf.constant(vocab.eos_id, tf.int32)

    def encode(lines):
      lines = tf.boolean_mask(lines, tf.strings.length(tf.strings.strip(lines)) > 0)
      ids = tf.cast(vocab.encode_tf(lines), tf.int32)
      n = ids.nrows()
      ids = tf.concat([ids, tf.RaggedTensor.from_tensor(tf.fill([n, 1], eos))], axis=1)
      return {"targets": ids, "lang": tf.fill([n], lang), "src_lang": tf.fill([n], ""),
              "prefix_len": tf.zeros([n], tf.int32)}

    def dense(ex):
      t = ex["targets"]
      return {**ex, "targets": t if isinstance(t, tf.Tensor) else t.to_tensor()}

    ds = ds.batch(batch_size).map(encode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return ds.map(dense)

  return fn


def _prefix_lm_preprocessor(ds, output_features, sequence_length=None):
  return ds.map(_pair_to_prefix_lm(output_features, sequence_length),
                num_parallel_calls=tf.data.AUTOTUNE)


# --- grouped twins: k untokenized examples per element --------------------------------------

GROUP_PASSTHROUGH = ("lang", "src_lang", "format")

# ``format`` of a group: how the host turns each line into an example (pipeline.py).
FORMAT_TEXT = ""  # the line is the text
FORMAT_TSV = "tsv"  # source<TAB>target
FORMAT_JSON = "json:"  # + field name: a JSON record, the text in that field


def grouped_output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Raw lines: parsing and tokenization happen on the host, after the mixture (pipeline.py)."""
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.string, rank=1)}


def _nonblank(lines: tf.Tensor) -> tf.Tensor:
  return tf.strings.length(tf.strings.strip(lines)) > 0


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
                                "format": tf.constant(FORMAT_TEXT)})

  return fn


class _GroupedLineSource(seqio.FileDataSource):
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
  with open(path, "rb") as f:
    for lines in iter(lambda: list(itertools.islice(f, block)), []):
      n = sum(1 for line in lines if line.strip())
      nonblank += n
      groups += -(-n // group_size)
  return nonblank, groups


def file_line_counts(path: str, group_size: int = 1) -> tuple[int, int]:
  """(non-blank lines, groups of ``group_size``) of a text file."""
  st = os.stat(path)
  return _file_lines(path, st.st_size, st.st_mtime, group_size)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How a per-example task was built, so that its grouped twin can be built alike."""

  kind: str  # lines | jsonl | tsv | tfds
  source: seqio.DataSource
  vocab: seqio.Vocabulary
  lang: str
  src_lang: str = ""
  field: str = ""


_SPECS: dict[str, _Spec] = {}


def task_spec(name: str) -> _Spec:
  """How task ``name`` was registered (kind, source, languages, JSONL field)."""
  return _SPECS[name]


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
    fmt = {"lines": FORMAT_TEXT, "tsv": FORMAT_TSV}.get(spec.kind, FORMAT_JSON + spec.field)
    src = spec.source
    source = _GroupedLineSource(
        read_file_fn=_read_line_groups(group_size, spec.lang, spec.src_lang, fmt),
        split_to_filepattern={s: list(src.list_shards(s)) for s in src.splits},
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
  for path in spec.source.list_shards(split):
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
  if num_examples is None:
    num_examples = {s: count_lines(f) for s, f in split_to_files.items()}
  source = seqio.TextLineDataSource(
      {s: list(f) for s, f in split_to_files.items()}, num_input_examples=dict(num_examples))
  if jsonl_field is None:
    preprocessors = [_lines_to_lm_examples(lang)]
  else:
    preprocessors = [_jsonl_to_text(jsonl_field), _drop_empty, _lm_fields(lang, None),
                     tokenize_batched]
  _remove(name)
  _SPECS[name] = _Spec("lines" if jsonl_field is None else "jsonl", source, vocab, lang,
                       field=jsonl_field or "")
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=preprocessors,
      output_features=output_features(vocab),
  )


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
  source = seqio.TfdsDataSource(tfds_name=tfds_name, splits=dict(splits),
                                tfds_data_dir=tfds_data_dir)
  _remove(name)
  _SPECS[name] = _Spec("tfds", source, vocab, lang, field=text_field)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          seqio.map_over_dataset(lambda ex: {"text": ex[text_field]}),
          _drop_empty,
          _lm_fields(lang, None),
          tokenize_batched,
      ],
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
  if num_examples is None:
    num_examples = {s: count_lines(f) for s, f in split_to_files.items()}
  source = seqio.TextLineDataSource(
      {s: list(f) for s, f in split_to_files.items()}, num_input_examples=dict(num_examples))
  _remove(name)
  _SPECS[name] = _Spec("tsv", source, vocab, tgt, src_lang=src)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[_tsv_to_pair(src, tgt), _prefix_lm_preprocessor],
      output_features=output_features(vocab),
  )
