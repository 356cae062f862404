"""Tokens per byte of a new script before and after vocabulary extension.

  .venv/bin/python bench/bench_vocab_extend.py [--lang el] [--new_pieces 256,1024,2048]

For each N, ``xlingo.data.vocab_extend.extend_vocab`` extends the shipped 8k vocabulary with N
pieces learned from ``xlingo/data/corpus/new/<lang>.train.txt`` (Greek or Korean from Debian's
message catalogs), in a temporary directory. Measured on ``new/<lang>.validation.txt``
(text the pieces were not learned from): tokens per UTF-8 byte with the old and the extended
vocabulary, how many of the new ids the validation text uses, and the tokens of the
translations in ``new/en-<lang>.validation.tsv`` over the tokens of their English sources
(``parallel_tokens_vs_en``: the same content's cost relative to English). Also checked on every line
of the embedded corpus's validation split (``mono/*.validation.txt``): how many encode to other
ids than under the old vocabulary (0 expected with the default ``pieces="new_chars"``).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402

from xlingo.data import vocab as vocab_lib  # noqa: E402
from xlingo.data import vocab_extend  # noqa: E402


def _lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [ln for ln in f.read().splitlines() if ln]


def tokens_per_byte(sp, lines: list[str]) -> float:
  return sum(len(x) for x in sp.EncodeAsIds(lines)) / sum(len(s.encode("utf-8")) for s in lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lang", default="el")
  parser.add_argument("--new_pieces", default="256,1024,2048")
  parser.add_argument("--pieces", default="new_chars", choices=vocab_extend.PIECE_MODES)
  args = parser.parse_args(argv)
  corpus = vocab_lib.corpus_dir()
  old_path = vocab_lib.embedded_vocab_path()
  train = os.path.join(corpus, "new", f"{args.lang}.train.txt")
  valid = _lines(os.path.join(corpus, "new", f"{args.lang}.validation.txt"))
  embedded = [ln for p in sorted(glob.glob(os.path.join(corpus, "mono", "*.validation.txt")))
              for ln in _lines(p)]
  tsv = os.path.join(corpus, "new", f"en-{args.lang}.validation.tsv")
  pairs = [ln.split("\t") for ln in _lines(tsv)]
  old = spm.SentencePieceProcessor(model_file=old_path)
  old_embedded = old.EncodeAsIds(embedded)

  def parallel_ratio(sp):
    en = sum(len(x) for x in sp.EncodeAsIds([e for e, _ in pairs]))
    return sum(len(x) for x in sp.EncodeAsIds([t for _, t in pairs])) / en
  out = {
      "lang": args.lang,
      "pieces": args.pieces,
      "validation_lines": len(valid),
      "validation_bytes": sum(len(s.encode("utf-8")) for s in valid),
      "old_vocab_size": old.GetPieceSize(),
      "tokens_per_byte_old": tokens_per_byte(old, valid),
      "parallel_tokens_vs_en_old": parallel_ratio(old),
      "runs": [],
  }
  with tempfile.TemporaryDirectory() as tmp:
    for n in (int(x) for x in args.new_pieces.split(",")):
      start = time.perf_counter()
      report = vocab_extend.extend_vocab(
          old_path, {args.lang: [train]}, n, os.path.join(tmp, f"ext{n}"), pieces=args.pieces
      )
      seconds = time.perf_counter() - start
      sp = spm.SentencePieceProcessor(model_file=report["model"])
      used = {i for ids in sp.EncodeAsIds(valid) for i in ids if i >= report["old_size"]}
      changed = sum(a != b for a, b in zip(old_embedded, sp.EncodeAsIds(embedded)))
      tpb = tokens_per_byte(sp, valid)
      out["runs"].append({
          "new_pieces": n,
          "added": report["added"],
          "vocab_size": report["new_size"],
          "tokens_per_byte": tpb,
          "ratio_to_old": tpb / out["tokens_per_byte_old"],
          "parallel_tokens_vs_en": parallel_ratio(sp),
          "new_ids_used_in_validation": len(used),
          "embedded_validation_lines_changed": changed,
          "embedded_validation_lines": len(embedded),
          "score_offset": report["score_offset"],
          "seconds": round(seconds, 2),
      })
  print(json.dumps(out))


if __name__ == "__main__":
  main()
