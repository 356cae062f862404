"""SeqIO task builders: one LM task per language, one conditional task per parallel pair.

``data_tasks/`` calls these to register tasks; this module holds the logic.

Every task emits, per example:
  targets      int32 token ids, EOS appended (for conditional tasks: source then target tokens)
  lang         the language code of the target text (a string; the pipeline maps it to an id
               through the config's language table, so tasks stay independent of that order)
  src_lang     the source language code for conditional tasks, "" for LM tasks
  prefix_len   how many leading tokens are the source (no loss there); 0 for LM tasks
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

PASSTHROUGH_FEATURES = ("lang", "src_lang", "prefix_len")


class DataError(ValueError):
  """Bad data input: the message names the file or key and the fix."""


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}


def lm_task_name(prefix: str, lang: str) -> str:
  return f"{prefix}.lm.{lang}"


def mt_task_name(prefix: str, src: str, tgt: str) -> str:
  return f"{prefix}.mt.{src}_{tgt}"


def count_lines(paths: Sequence[str]) -> int:
  n = 0
  for p in paths:
    with open(p, "rb") as f:
      n += sum(1 for line in f if line.strip())
  return n


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
      return json.loads(b.decode("utf-8")).get(text_field, "")

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


# --- registration ---------------------------------------------------------------------------


def _remove(name: str) -> None:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)


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
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[_tsv_to_pair(src, tgt), _prefix_lm_preprocessor],
      output_features=output_features(vocab),
  )
