"""Translation scores, the library that ``evaluate`` and adaptation's report share.

Greedy translations of validation pairs (``translate_scores``: each source sentence continued
in the target language by ``xlingo.decode``, the source tokens carrying the source language id
as in the conditional training tasks) scored with sacrebleu (``score_translations``, the one
scorer: BLEU tokenised with ``13a``, ``zh`` for Chinese and ``ja-mecab`` for Japanese, and chrF,
each written with its sacrebleu signature).
"""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF

from xlingo import decode
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError

BATCH_ROWS = 16  # translation rows decoded together (padded, so one compiled loop serves all)


def validation_pairs(config, pair: str, tsv: dict[str, str] | None = None,
                     split: str = "validation") -> list | None:
  """[(source, reference)] of ``pair`` ("src-tgt") from a TSV file in ``tsv``, else ``split``
  of the user's pair files (``data.file_pair_val_patterns``/``file_pair_test_patterns``) or of
  the embedded corpus; None when there are none."""
  if pair.count("-") != 1:
    raise ConfigError(f"translation pair {pair!r}: give pairs as SRC-TGT, e.g. en-de")
  if tsv and pair in tsv:
    return xvocab.read_parallel(tsv[pair])
  if config.data.source == "files":
    from xlingo.data import pairs  # the data layer (TensorFlow) only when it is needed

    return pairs.file_split_pairs(config.data, pair, split)
  embedded = xvocab.embedded_parallel(split) if config.data.source == "embedded" else {}
  src, tgt = pair.split("-")
  if src == "en" and tgt in embedded:
    return embedded[tgt]
  if tgt == "en" and src in embedded:
    return [(x, e) for e, x in embedded[src]]
  return None


def bleu_tokenizer(lang: str) -> str:
  """sacrebleu's BLEU tokenizer for a target language: Chinese and Japanese have no spaces
  between words (``ja-mecab`` comes with ``sacrebleu[ja]``, a dependency of xlingo)."""
  return {"zh": "zh", "ja": "ja-mecab"}.get(lang, "13a")


def score_translations(hyps: list[str], refs: list[str], tgt: str) -> dict:
  """Corpus BLEU and chrF of ``hyps`` against ``refs`` (one reference each), with the
  sacrebleu signature of each: the one scorer of xlingo (evaluate, adaptation's report)."""
  bleu, chrf = BLEU(tokenize=bleu_tokenizer(tgt)), CHRF()
  if hyps:
    b, c = bleu.corpus_score(hyps, [refs]).score, chrf.corpus_score(hyps, [refs]).score
  else:  # the signatures name the number of references, known once something was scored
    bleu.corpus_score([""], [[""]])
    chrf.corpus_score([""], [[""]])
    b = c = float("nan")
  return {"bleu": float(b), "chrf": float(c), "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature())}


def translate_scores(lm, examples, src: str, tgt: str, *, max_examples: int,
                     max_new: int = 64) -> dict:
  """Greedy translations of up to ``max_examples`` pairs (``xlingo.decode``), scored with
  :func:`score_translations`."""
  table, vocab, model, params = lm.table, lm.vocab, lm.model, lm.params
  src_id, tgt_id = table.id(src), table.id(tgt)
  room = int(model.config.max_len) - 2  # the start id and at least one generated token
  rows, skipped = [], 0
  for source, ref in examples[:max_examples]:
    ids = list(vocab.encode(source))
    if len(ids) > room:
      skipped += 1
      continue
    rows.append((ids, ref, source))
  hyps = []
  for start in range(0, len(rows), BATCH_ROWS):
    chunk = [ids for ids, _, _ in rows[start:start + BATCH_ROWS]]
    padded = chunk + [chunk[0]] * (BATCH_ROWS - len(chunk))
    out = decode.generate_ids(model, params, padded, tgt_id, max_len=max_new,
                              prompt_lang_ids=src_id, eos_id=vocab.eos_id,
                              start_id=vocab.start_id,
                              utf8=decode.utf8_table(vocab, model.config.vocab_size))
    hyps += [vocab.decode(o) if o else "" for o in out[:len(chunk)]]
  refs = [ref for _, ref, _ in rows]
  return {**score_translations(hyps, refs, tgt), "examples": len(rows),
          "skipped_too_long": skipped,
          "samples": [{"source": rows[i][2], "reference": refs[i], "output": hyps[i]}
                      for i in range(min(3, len(rows)))]}
