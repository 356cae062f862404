"""The shared multilingual vocabulary: training (SentencePiece), loading either kind, checks,
parity.

One vocabulary serves every language. Its training text is sampled with temperature, as in
mBERT/XLM/mT5: language ``l`` with ``n_l`` lines gets a share of the training text
proportional to ``n_l ** (1 / T)``, so that small languages are not drowned by large ones
(``T = 1`` keeps the natural proportions, a large ``T`` tends to uniform).

The model is a unigram SentencePiece model with byte fallback (no text is ever unknown) and
seqio's special ids: pad = 0, eos = 1, unk = 2, and no bos.

``data.vocab_path`` and ``--vocab`` take a SentencePiece ``.model`` or a Hugging Face
``tokenizer.json`` (xlingo/data/vocabulary.py: one face over both).

Command line::

  python -m xlingo.data.vocab train --input en='corpus/en*.txt' --input de='corpus/de*.txt' \\
      --output /tmp/my_vocab --vocab_size 8192 --temperature 3.33
  python -m xlingo.data.vocab parity [--vocab PATH] [--split validation] [--markdown FILE]

Input files are read as training reads them (readers.py): ``*.jsonl``/``*.json`` give each
record's ``--jsonl_field`` (default ``text``), other files one text per line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import numpy as np
import sentencepiece as spm

from xlingo import paths
from xlingo.data import readers, sampling, vocab_facts
from xlingo.data.sampling import balanced_sample, sampling_rates
from xlingo.errors import VocabError, XlingoError

PAD_ID, EOS_ID, UNK_ID = vocab_facts.PAD_ID, vocab_facts.EOS_ID, vocab_facts.UNK_ID
local_model = vocab_facts.local_model
EMBEDDED_VOCAB_NAME = vocab_facts.EMBEDDED_VOCAB_NAME


def corpus_dir() -> str:
  """Directory of the embedded corpus (``xlingo/data/corpus``)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def embedded_vocab_path() -> str:
  """Path of the shipped vocabulary, trained on the embedded corpus's train split."""
  return vocab_facts.embedded_path()


def embedded_files(split: str = "train", languages=None) -> dict[str, list[str]]:
  """``{lang: [path]}`` of the embedded monolingual corpus for ``split``."""
  from xlingo.config import EMBEDDED_LANGUAGES

  if split not in ("train", "validation"):
    raise VocabError(f"unknown split {split!r}; use 'train' or 'validation'")
  langs = EMBEDDED_LANGUAGES if languages is None else languages
  return {lang: [os.path.join(corpus_dir(), "mono", f"{lang}.{split}.txt")] for lang in langs}


def read_lines(path: str, jsonl_field: str = "text") -> list[str]:
  """The texts of a UTF-8 text file, stripped, as training reads them (readers.file_examples):
  one per non-blank line, or for ``*.jsonl``/``*.json`` each record's ``jsonl_field``
  (readers.format_of); VocabError for a missing, empty or non-UTF-8 file."""
  if not paths.isfile(path):
    raise VocabError(f"{path}: no such file; check the path or glob")
  try:
    lines = [t.strip() for t, _ in readers.file_examples(path, readers.format_of(path,
                                                                                 jsonl_field))]
  except readers.NotUtf8 as e:
    raise VocabError(f"{path}: not valid UTF-8 (line {e.line}, byte {e.offset} of the line); "
                     "convert it, e.g. with iconv -t UTF-8") from None
  lines = [ln for ln in lines if ln]
  if not lines:
    raise VocabError(f"{path}: file is empty; give a file with one example per line")
  return lines


def train_vocab(
    lang_to_files: dict[str, list[str]],
    output_prefix: str,
    vocab_size: int = 8192,
    temperature: float = 3.33,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 1,
    jsonl_field: str = "text",
) -> str:
  """Trains a unigram SentencePiece model on temperature-balanced text; returns the .model path.

  The training text holds ``min(max_sentences, total lines)`` lines, language ``l`` taking a
  share ``n_l ** (1/T) / sum_k n_k ** (1/T)``. The result depends only on the inputs and the
  seed (``num_threads=1`` keeps the trainer itself deterministic). JSONL files give their
  records' ``jsonl_field``, as training reads them.
  """
  lang_to_lines = {}
  for lang, files in lang_to_files.items():
    if not files:
      raise VocabError(f"language {lang!r} has no input files")
    lang_to_lines[lang] = [ln for path in files for ln in read_lines(path, jsonl_field)]
  total = sum(len(v) for v in lang_to_lines.values())
  sample = balanced_sample(lang_to_lines, temperature, min(max_sentences, total), seed)
  lines = [ln for lang in sorted(sample) for ln in sample[lang]]
  random.Random(seed).shuffle(lines)
  output_prefix = paths.resolve(output_prefix)
  paths.makedirs(paths.dirname(output_prefix))
  # The trainer reads and writes local files only: train in a local temporary directory, then
  # copy the model (and its piece list) to the output through the path layer.
  with tempfile.TemporaryDirectory(prefix="xlingo-vocab-") as tmp:
    text_path = os.path.join(tmp, "train.txt")
    paths.write_text(text_path, "".join(ln + "\n" for ln in lines))
    prefix = os.path.join(tmp, paths.basename(output_prefix))
    with paths.open(os.path.join(tmp, "trainer.log"), "w") as log:
      _train(text_path, prefix, output_prefix, vocab_size, num_threads, log)
    for ext in (".model", ".vocab"):
      paths.copy_file(prefix + ext, output_prefix + ext)
  return output_prefix + ".model"


def _train(text_path, model_prefix, output_prefix, vocab_size, num_threads, log):
  try:
    spm.SentencePieceTrainer.train(
        input=text_path,
        model_prefix=model_prefix,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        split_digits=True,
        num_threads=num_threads,
        logstream=log,
    )
  except RuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
    hint = "; lower --vocab_size for a small corpus" if "ocab_size" in first else ""
    raise VocabError(f"sentencepiece training for {output_prefix} failed: {first}{hint}") from None


def load_vocab(path: str | None = None):
  """The vocabulary at ``path`` (default: the shipped one): a SentencePiece ``.model`` or a
  Hugging Face ``tokenizer.json``, behind one face (``xlingo.data.vocabulary``)."""
  from xlingo.data import vocabulary

  return vocabulary.load(embedded_vocab_path() if path is None else path)


def check_vocab_matches(vocab, expected_size: int) -> None:
  """VocabError unless the vocabulary fits a model of ``expected_size`` rows
  (``vocab_facts.check_size``)."""
  vocab_facts.check_size(vocab, expected_size)


def parity_report(
    vocab_path: str,
    lang_to_texts: dict[str, list[str]],
    parallel: dict[str, list[tuple[str, str]]] | None = None,
) -> list[dict]:
  """Per-language tokenisation cost: tokens per byte/char, bytes per token, ratio to English.

  ``ratio_to_en`` is the language's tokens per byte divided by English's (1.0 for English;
  None without English): above 1, the language's bytes are split more finely than English's.
  Bytes per character differ between scripts, so for a fair comparison give ``parallel``
  (``{lang: [(english, translation), ...]}``): ``parallel_ratio`` is then the tokens of the
  translations over the tokens of their English sources, the "tokenisation parity" of the same
  content (1.0 for English, None for a language without pairs).
  """
  vocab = load_vocab(vocab_path)
  rows = []
  for lang, texts in lang_to_texts.items():
    ids, _ = vocab.encode_flat(list(texts))
    tokens = len(ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    chars = sum(len(t) for t in texts)
    unk = 0 if vocab.unk_id is None else int((ids == vocab.unk_id).sum())
    rows.append({
        "language": lang,
        "examples": len(texts),
        "tokens": tokens,
        "bytes": n_bytes,
        "chars": chars,
        "tokens_per_byte": tokens / max(n_bytes, 1),
        "tokens_per_char": tokens / max(chars, 1),
        "bytes_per_token": n_bytes / max(tokens, 1),
        "unk": unk,
    })
  en = next((r for r in rows if r["language"] == "en"), None)
  for r in rows:
    r["ratio_to_en"] = r["tokens_per_byte"] / en["tokens_per_byte"] if en else None
    r["parallel_ratio"] = 1.0 if r["language"] == "en" else None
    pairs = (parallel or {}).get(r["language"])
    if pairs:
      en_tokens = len(vocab.encode_flat([e for e, _ in pairs])[0])
      x_tokens = len(vocab.encode_flat([x for _, x in pairs])[0])
      r["parallel_ratio"] = x_tokens / max(en_tokens, 1)
  return rows


def read_parallel(path: str) -> list[tuple[str, str]]:
  """(English, translation) pairs of a two-column TSV file."""
  pairs = []
  for i, line in enumerate(read_lines(path), 1):
    cols = line.split("\t")
    if len(cols) != 2:
      raise VocabError(f"{path}:{i}: expected 2 tab-separated columns, got {len(cols)}")
    pairs.append((cols[0], cols[1]))
  return pairs


def embedded_parallel(split: str = "validation") -> dict[str, list[tuple[str, str]]]:
  """``{lang: [(english, translation)]}`` of the embedded parallel corpus for ``split``."""
  out = {}
  for path in paths.glob(os.path.join(corpus_dir(), "parallel", f"en-*.{split}.tsv")):
    lang = paths.basename(path)[len("en-") :].split(".")[0]
    out[lang] = read_parallel(path)
  return out


def format_parity_table(rows: list[dict]) -> str:
  """A Markdown table of :func:`parity_report` rows (readable as plain text too)."""
  head = (
      "| lang | examples | bytes | tokens | tokens/byte | tokens/char | bytes/token"
      " | tokens/byte vs en | parallel tokens vs en |"
  )
  lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

  def fmt(x):
    return "-" if x is None else f"{x:.2f}"

  for r in rows:
    lines.append(
        f"| {r['language']} | {r['examples']} | {r['bytes']} | {r['tokens']} |"
        f" {r['tokens_per_byte']:.3f} | {r['tokens_per_char']:.3f} |"
        f" {r['bytes_per_token']:.2f} | {fmt(r['ratio_to_en'])} |"
        f" {fmt(r.get('parallel_ratio'))} |"
    )
  return "\n".join(lines)


def vocab_byte_lengths(vocab, size: int | None = None) -> np.ndarray:
  """UTF-8 bytes each piece stands for in normalised text; control pieces count 0, rows past
  the vocabulary (up to ``size``) too. Bits per byte count the raw text's bytes instead (the
  batches' ``raw_bytes``, readers.py); this table serves batches that carry none."""
  return vocab_facts.byte_lengths(vocab, size)


def _parse_inputs(values: list[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for value in values:
    lang, sep, pattern = value.partition("=")
    if not sep or not lang or not pattern:
      raise VocabError(f"--input {value!r} must look like lang=GLOB, e.g. de='data/de*.txt'")
    out.setdefault(lang, []).append(pattern)
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["extend"]:
    from xlingo.data import vocab_extend

    return vocab_extend.main(argv[1:], prog="python -m xlingo.data.vocab extend")
  fmt = argparse.ArgumentDefaultsHelpFormatter
  parser = argparse.ArgumentParser(prog="python -m xlingo.data.vocab", formatter_class=fmt,
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a vocabulary on your own corpus", formatter_class=fmt)
  t.add_argument("--input", action="append", required=True, help="lang=GLOB, repeatable")
  t.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
  t.add_argument("--vocab_size", type=int, default=8192, help="pieces")
  t.add_argument("--temperature", type=float, default=3.33, help="language sampling temperature")
  t.add_argument("--max_sentences", type=int, default=2_000_000, help="training lines at most")
  t.add_argument("--seed", type=int, default=0, help="sampling seed")
  t.add_argument("--jsonl_field", default="text", help="the text field of *.jsonl files")
  p = sub.add_parser("parity", help="tokens per byte/char per language", formatter_class=fmt)
  p.add_argument("--vocab", default=None,
                 help="a .model or tokenizer.json file (default: the shipped one)")
  p.add_argument("--split", default="validation", choices=("train", "validation"),
                 help="split of the embedded corpus")
  p.add_argument("--input", action="append", default=[], help="lang=GLOB instead of the corpus")
  p.add_argument("--markdown", default="", help="also write the table to this file")
  p.add_argument("--jsonl_field", default="text", help="the text field of *.jsonl files")
  sub.add_parser("extend", help="add pieces for a new language without changing any id "
                 "(python -m xlingo.data.vocab extend --help)")
  args = parser.parse_args(argv)
  try:
    if args.command == "train":
      vocab_facts.check_outputs(args.output)
      files = sampling.expand_globs(_parse_inputs(args.input))
      path = train_vocab(
          files, args.output, args.vocab_size, args.temperature, args.max_sentences, args.seed,
          jsonl_field=args.jsonl_field)
      counts = {lang: sum(len(read_lines(f, args.jsonl_field)) for f in fs)
                for lang, fs in files.items()}
      rates = sampling_rates(counts, args.temperature)
      for lang in files:
        print(f"{lang}: {counts[lang]} lines, share {rates[lang]:.3f}")
      print(f"wrote {path}")
    else:
      vocab_path = args.vocab or embedded_vocab_path()
      if args.input:
        files, parallel = sampling.expand_globs(_parse_inputs(args.input)), None
      else:
        files, parallel = embedded_files(args.split), embedded_parallel(args.split)
      texts = {lang: [ln for f in fs for ln in read_lines(f, args.jsonl_field)]
               for lang, fs in files.items()}
      table = format_parity_table(parity_report(vocab_path, texts, parallel))
      print(table)
      if args.markdown:
        paths.write_text(args.markdown, table + "\n")
  except XlingoError as e:
    print(f"xlingo: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main())
