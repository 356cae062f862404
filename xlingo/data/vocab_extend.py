"""Vocabulary extension: append pieces learned from a new language's text, keeping every old id.

A model pretrained with vocabulary OLD meets a language whose script OLD never saw (Greek with
the shipped 8k vocabulary): every Greek letter falls back to its two UTF-8 bytes, so the text
costs about one token per byte. ``extend_vocab`` trains a unigram SentencePiece model on the
new text alone, with OLD's settings (normaliser, digit splitting, byte fallback, special ids
pad 0 / eos 1 / unk 2 / no bos), and appends its most useful pieces that OLD lacks to OLD's
``ModelProto``. Ids ``0 .. len(OLD)-1`` keep their piece, score and type, so a checkpoint
trained with OLD stays valid: adaptation only adds embedding rows (and output rows) for the new
ids, each initialised from the old pieces its text decodes to (``new_piece_init_sources``).

A Hugging Face byte-level BPE ``tokenizer.json`` (SmolLM2, Llama 3, Qwen2) is extended the same
way by ``vocab_bpe.extend_tokenizer``: a BPE trained on the new text with OLD's pre-tokenizer,
whose new pieces are appended with their merges after OLD's (every old id and merge kept).

The module also grows a model with its vocabulary: ``extension_sources`` checks that a
config's vocabulary extends a checkpoint's and names each new id's old pieces, ``grow_rows``
appends the new embedding rows and output columns (``init_from``, training/restore.py).

Which pieces (``pieces=``):

- ``"new_chars"`` (default): only pieces holding at least one character that no OLD piece
  holds. Text without such a character has exactly the same segmentation lattice under OLD and
  NEW, so the old languages keep their token ids; the new pieces are only ever chosen where OLD
  fell back to bytes.
- ``"all"``: every new-model piece OLD lacks, also those made of old characters (for a new
  language in an old script, e.g. Irish with a Latin vocabulary). Old-language text that
  contains such a piece may then be segmented differently.

Ranking ("most useful"): by the new model's score, its unigram log-probability on the new text
(which is EM's expected frequency of the piece in that text, normalised); ties by piece.

Scores: the appended pieces carry the new model's log-probabilities shifted by one constant,
the median of ``old_score - new_score`` over the ordinary pieces both models share (``▁``,
punctuation, Latin words found in the new text). That puts the new model on OLD's scale, so the
unigram segmenter weighs a path through old pieces (``▁`` + Greek) against one through new
pieces (``▁αρχείο``) as the two models would, and segments new-language text like the new
model does. A score is never set below OLD's lowest ordinary score: the unknown-character
penalty is computed from that minimum, and keeping it fixed keeps old-text lattices unchanged.
(A uniform low score, say below every old score, is not needed for correctness with
``new_chars`` and would make the segmenter prefer the fewest, longest new pieces regardless of
their frequency; with ``all`` it would make the new pieces lose to old ones and go unused.)

Command line (``python -m xlingo.data.vocab_extend``; ``python -m xlingo.data.vocab extend``
takes the same flags)::

  python -m xlingo.data.vocab_extend --vocab xlingo/data/corpus/vocab/xlingo_8k.model \\
      --input el='xlingo/data/corpus/new/el.train.txt' --new_pieces 1024 --output /tmp/xlingo_el

writes ``/tmp/xlingo_el.model`` and ``/tmp/xlingo_el.vocab`` (piece, score per line); every path
may be ``gs://``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from xlingo import paths, stdio
from xlingo.data import sampling, vocab_bpe, vocab_facts
from xlingo.errors import CheckpointError, VocabError, XlingoError

PIECE_MODES = ("new_chars", "all")
_NORMAL = model_pb2.ModelProto.SentencePiece.NORMAL
_USER_DEFINED = model_pb2.ModelProto.SentencePiece.USER_DEFINED
# Trainer settings copied from OLD so that the new model cuts text the way OLD does.
_COPIED_TRAINER_FIELDS = (
    "character_coverage", "split_digits", "split_by_whitespace", "split_by_unicode_script",
    "split_by_number", "treat_whitespace_as_suffix", "allow_whitespace_only_pieces",
    "max_sentencepiece_length", "byte_fallback", "max_sentence_length",
)
_COPIED_NORMALIZER_FIELDS = ("add_dummy_prefix", "remove_extra_whitespaces")
# Size of the first trial model over the pieces asked for (the new model also holds the 256
# byte pieces, the specials and pieces OLD already has); doubled until enough candidates exist.
_TRIAL_MARGIN = 512
_MAX_TRIALS = 5


def load_model_proto(path: str) -> model_pb2.ModelProto:
  """The ``ModelProto`` of a SentencePiece model file (local or gs://); VocabError if unusable."""
  if not paths.isfile(path):
    raise VocabError(f"{path}: vocabulary file not found; pass --vocab an existing .model file")
  proto = model_pb2.ModelProto()
  try:
    proto.ParseFromString(paths.read_bytes(path))
  except Exception:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
    proto = None
  if proto is None or not proto.pieces:
    raise VocabError(f"{path}: not a SentencePiece model; give the .model file written by"
                     " the trainer")
  return proto


def _processor(proto: model_pb2.ModelProto, what: str = "") -> spm.SentencePieceProcessor:
  try:
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
  except (OSError, RuntimeError) as e:
    first = (str(e).strip().splitlines() or ["unknown error"])[0]
    raise VocabError(f"{what or 'model'}: sentencepiece cannot load it ({first}); give a .model"
                     " file written by `python -m xlingo.data.vocab train`") from None


def _check_old(proto: model_pb2.ModelProto, path: str) -> None:
  if proto.trainer_spec.model_type != model_pb2.TrainerSpec.UNIGRAM:
    raise VocabError(f"{path}: not a unigram model; vocabulary extension needs a unigram"
                     " SentencePiece model (train one with `python -m xlingo.data.vocab train`)")
  sp = _processor(proto, path)
  ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
  if ids != (vocab_facts.PAD_ID, vocab_facts.EOS_ID, vocab_facts.UNK_ID):
    raise VocabError(f"{path}: special ids pad={ids[0]} eos={ids[1]} unk={ids[2]}, but xlingo"
                     " needs pad=0 eos=1 unk=2; retrain it with"
                     " `python -m xlingo.data.vocab train`")


def read_examples(path: str) -> list[str]:
  """Non-empty examples of a UTF-8 file (local or gs://): lines, or the "text" of JSONL lines."""
  try:
    text = paths.read_bytes(path).decode("utf-8")
  except UnicodeDecodeError as e:
    raise VocabError(f"{path}: not valid UTF-8 (byte {e.start}); convert it, e.g. with iconv"
                     " -t UTF-8") from None
  numbered = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
  lines = [ln for _, ln in numbered]
  if path.endswith(".jsonl"):
    lines = []
    for i, ln in numbered:
      try:
        value = json.loads(ln)["text"]
      except (ValueError, KeyError, TypeError):
        raise VocabError(f"{path}:{i}: not a JSON object with a \"text\" field; give one"
                         " {\"text\": ...} object per line") from None
      if isinstance(value, str) and value.strip():
        lines.append(value.strip())
  if not lines:
    raise VocabError(f"{path}: no text; give a file with one example per line")
  return lines


def _train_new_model(
    old: model_pb2.ModelProto, lines: list[str], vocab_size: int, seed: int
) -> model_pb2.ModelProto:
  ts, ns = old.trainer_spec, old.normalizer_spec
  options = {f: getattr(ts, f) for f in _COPIED_TRAINER_FIELDS}
  options.update({f: getattr(ns, f) for f in _COPIED_NORMALIZER_FIELDS})
  writer = io.BytesIO()
  # The trainer logs dozens of lines to fd 2; its errors still arrive as RuntimeError.
  with stdio.native_stderr_silenced():
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines),
          model_writer=writer,
          model_type="unigram",
          vocab_size=vocab_size,
          hard_vocab_limit=False,  # a small text may support fewer pieces than asked for
          normalization_rule_name=ns.name,
          pad_id=vocab_facts.PAD_ID,
          eos_id=vocab_facts.EOS_ID,
          unk_id=vocab_facts.UNK_ID,
          bos_id=-1,
          input_sentence_size=0,
          shuffle_input_sentence=False,
          num_threads=1,  # deterministic
          **options,
      )
    except RuntimeError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
      raise VocabError(f"training on the new text failed: {first}; give more text or ask for"
                       " fewer --new_pieces") from None
  proto = model_pb2.ModelProto()
  proto.ParseFromString(writer.getvalue())
  return proto


def old_characters(old: model_pb2.ModelProto) -> set[str]:
  """Characters that occur in some ordinary or user-defined piece of ``old``."""
  return {ch for p in old.pieces if p.type in (_NORMAL, _USER_DEFINED) for ch in p.piece}


def candidate_pieces(
    old: model_pb2.ModelProto, new: model_pb2.ModelProto, pieces: str = "new_chars"
) -> list[tuple[str, float]]:
  """(piece, new-model score) of ``new``'s ordinary pieces that ``old`` lacks, best first."""
  if pieces not in PIECE_MODES:
    raise VocabError(f"pieces={pieces!r}; use one of {', '.join(PIECE_MODES)}")
  have = {p.piece for p in old.pieces}
  chars = old_characters(old)
  out = []
  for p in new.pieces:
    if p.type != _NORMAL or p.piece in have:
      continue
    if pieces == "new_chars" and set(p.piece) <= chars:
      continue
    out.append((p.piece, p.score))
  out.sort(key=lambda x: (-x[1], x[0]))
  return out


def score_offset(old: model_pb2.ModelProto, new: model_pb2.ModelProto) -> float:
  """Median of ``old_score - new_score`` over the ordinary pieces both models hold (0 if none)."""
  old_scores = {p.piece: p.score for p in old.pieces if p.type == _NORMAL}
  diffs = [old_scores[p.piece] - p.score for p in new.pieces
           if p.type == _NORMAL and p.piece in old_scores]
  return statistics.median(diffs) if diffs else 0.0


def read_sample(lang_to_files: dict[str, list[str]], max_sentences: int, temperature: float,
                seed: int) -> list[str]:
  """The new languages' examples, mixed with temperature sampling as in ``vocab train``, in a
  seeded order."""
  lang_to_lines = {}
  for lang, files in lang_to_files.items():
    if not files:
      raise VocabError(f"language {lang!r} has no input files; give --input {lang}='GLOB'")
    lang_to_lines[lang] = [ln for f in files for ln in read_examples(f)]
  total = sum(len(v) for v in lang_to_lines.values())
  sample = sampling.balanced_sample(lang_to_lines, temperature, min(max_sentences, total), seed)
  lines = [ln for lang in sorted(sample) for ln in sample[lang]]
  random.Random(seed).shuffle(lines)
  return lines


def extend_vocab(
    old_model_path: str,
    lang_to_files: dict[str, list[str]],
    new_pieces: int,
    output_prefix: str,
    pieces: str = "new_chars",
    temperature: float = 3.33,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> dict:
  """Writes ``output_prefix``.model/.vocab: OLD plus up to ``new_pieces`` pieces; returns a report.

  For a Hugging Face byte-level BPE (OLD a ``tokenizer.json``), ``output_prefix`` is a
  directory and the work is ``vocab_bpe.extend_tokenizer``'s. ``lang_to_files`` maps each new language to its text files (one example per line, or JSONL
  with a "text" field); several languages are mixed with temperature sampling as in
  ``vocab train``. The report holds ``old_size``, ``new_size``, ``added`` (fewer than asked
  when the text supports no more useful pieces: ``candidates`` says how many there were),
  ``score_offset``, ``clamped`` (scores raised to OLD's minimum) and the output paths.
  """
  if new_pieces < 1:
    raise VocabError(f"--new_pieces must be at least 1, got {new_pieces}")
  if pieces not in PIECE_MODES:
    raise VocabError(f"pieces={pieces!r}; use one of {', '.join(PIECE_MODES)}")
  if vocab_facts.kind_of(old_model_path) == "hf":
    vocab_bpe.load_spec(old_model_path)  # a bad tokenizer fails before the text is read
    lines = read_sample(lang_to_files, max_sentences, temperature, seed)
    return vocab_bpe.extend_tokenizer(old_model_path, lines, new_pieces, output_prefix, pieces)
  old = load_model_proto(old_model_path)
  _check_old(old, old_model_path)
  out_model = output_prefix + ".model"
  if paths.resolve(out_model) == paths.resolve(old_model_path):
    raise VocabError(f"--output {output_prefix} would overwrite --vocab {old_model_path};"
                     " choose another output prefix")
  lines = read_sample(lang_to_files, max_sentences, temperature, seed)

  # The new model also spends pieces on bytes, specials and pieces OLD has, and must hold every
  # character it keeps (about a thousand Hangul syllables for Korean): grow it until it yields
  # enough candidates or the text supports no more pieces.
  n_chars = len(set("".join(lines)))
  size = max(new_pieces, n_chars) + _TRIAL_MARGIN
  for _ in range(_MAX_TRIALS):
    new = _train_new_model(old, lines, size, seed)
    candidates = candidate_pieces(old, new, pieces)
    if len(candidates) >= new_pieces or len(new.pieces) < size:
      break
    size *= 2

  chosen = candidates[:new_pieces]
  offset = score_offset(old, new)
  floor = min(p.score for p in old.pieces if p.type == _NORMAL)
  merged = model_pb2.ModelProto()
  merged.CopyFrom(old)
  clamped = 0
  for piece, score in chosen:
    entry = merged.pieces.add()
    entry.piece = piece
    entry.score = max(score + offset, floor)
    entry.type = _NORMAL
    clamped += score + offset < floor
  merged.trainer_spec.vocab_size = len(merged.pieces)
  _processor(merged, out_model)  # a broken model (a duplicate piece) fails before any write

  paths.write_bytes(out_model, merged.SerializeToString())
  vocab_text = "".join(f"{p.piece}\t{p.score:g}\n" for p in merged.pieces)
  paths.write_text(output_prefix + ".vocab", vocab_text)
  return {
      "old_size": len(old.pieces),
      "new_size": len(merged.pieces),
      "requested": new_pieces,
      "added": len(chosen),
      "candidates": len(candidates),
      "new_model_size": len(new.pieces),
      "score_offset": offset,
      "clamped": int(clamped),
      "pieces": pieces,
      "model": paths.resolve(out_model),
      "vocab": paths.resolve(output_prefix + ".vocab"),
  }


def sentencepiece_init_sources(old_model: str, new_model: str) -> dict[int, list[int]]:
  """``{new_id: [old ids]}``: the OLD ids each appended piece's text encodes to under OLD.

  The adaptation step initialises new embedding row ``i`` as the mean of the old rows listed
  for ``i``. The piece's text is encoded as it stands in the piece (``▁`` is a space; no space
  is prepended to a piece that does not start with one), so characters OLD lacks come out as
  their byte pieces. VocabError unless NEW starts with exactly OLD's pieces.
  """
  old = load_model_proto(old_model)
  new = load_model_proto(new_model)
  n_old = len(old.pieces)
  same = len(new.pieces) >= n_old and all(
      (a.piece, a.type) == (b.piece, b.type) for a, b in zip(old.pieces, new.pieces[:n_old])
  )
  if not same:
    raise VocabError(f"{new_model} does not start with the {n_old} pieces of {old_model};"
                     " give the model that `vocab extend` wrote from this --vocab")
  # OLD without its dummy prefix and space trimming, so that a piece's text maps to itself.
  bare = model_pb2.ModelProto()
  bare.CopyFrom(old)
  bare.normalizer_spec.add_dummy_prefix = False
  bare.normalizer_spec.remove_extra_whitespaces = False
  sp = _processor(bare)
  out = {}
  for i in range(n_old, len(new.pieces)):
    text = new.pieces[i].piece.replace("\u2581", " ")
    out[i] = sp.EncodeAsIds(text)
  return out


def new_piece_init_sources(old_model: str, new_model: str) -> dict[int, list[int]]:
  """``{new_id: [old ids]}`` for either kind: each appended piece and the OLD ids its text
  encodes to under OLD (``sentencepiece_init_sources``, ``vocab_bpe.init_sources``)."""
  if vocab_facts.kind_of(old_model) != vocab_facts.kind_of(new_model):
    raise VocabError(f"{new_model} and {old_model} are different kinds of vocabulary; give the "
                     "vocabulary that `vocab extend` wrote from the old one")
  if vocab_facts.kind_of(old_model) == "hf":
    return vocab_bpe.init_sources(old_model, new_model)
  return sentencepiece_init_sources(old_model, new_model)


# --- growing a model with its vocabulary ------------------------------------------------------


def grow_rows(old, sources: dict, axis: int, out_sharding):
  """``old`` with one row (``axis`` 0) or column (1) appended per new piece, in id order: the
  mean of the old rows of the pieces the new piece's text encodes to (``sources``). The
  embedding table and output kernel of a model whose vocabulary was extended."""
  import jax

  ids = sorted(sources)
  width = max(1, max(len(sources[i]) for i in ids))
  idx = np.zeros((len(ids), width), np.int32)
  weight = np.zeros((len(ids), width), np.float32)
  for r, i in enumerate(ids):
    src = sources[i]
    idx[r, :len(src)] = src
    weight[r, :len(src)] = 1.0 / len(src) if src else 0.0

  def grow(o):
    table = o if axis == 0 else o.T
    new = jax.numpy.einsum("nm,nmd->nd", weight, table[idx].astype(jax.numpy.float32))
    # A piece with no old pieces (none is known to occur) gets the mean of all old rows.
    empty = (weight.sum(1) == 0)[:, None]
    new = jax.numpy.where(empty, table.astype(jax.numpy.float32).mean(0), new)
    out = jax.numpy.concatenate([table, new.astype(table.dtype)], axis=0)
    return out if axis == 0 else out.T

  return jax.jit(grow, out_shardings=out_sharding)(old)


def extension_sources(meta: dict, config, where: str) -> dict[int, list[int]] | None:
  """None when ``config`` uses the checkpoint's vocabulary; ``{new id: [old ids]}`` when its
  ``data.vocab_path`` extends it (the checkpoint's pieces first, piece by piece, then new ones,
  as ``python -m xlingo.data.vocab extend`` writes); CheckpointError for anything else."""
  new_path, want_sha = vocab_facts.configured(config.data)
  have_sha = meta.get("vocab_sha1")
  old_size, new_size = meta.get("vocab_size"), int(config.model.vocab_size)
  if old_size == new_size and (not have_sha or not want_sha or have_sha == want_sha):
    return None
  if old_size == new_size:
    raise CheckpointError(
        f"{where}: the checkpoint was trained with a different vocabulary (vocabulary file "
        f"SHA-1 {have_sha[:12]} vs {want_sha[:12]} of data.vocab_path); set data.vocab_path to "
        "the checkpoint's vocabulary (or to an extension of it, with model.vocab_size its size)")
  if have_sha and have_sha == want_sha and isinstance(old_size, int):
    raise CheckpointError(
        f"{where}: data.vocab_path={new_path} is the checkpoint's own vocabulary of {old_size} "
        f"pieces, but model.vocab_size={new_size}; set --config.model.vocab_size={old_size}")
  old = meta.get("vocab_path")
  if not (have_sha and old and isinstance(old_size, int)):
    raise CheckpointError(
        f"{where}: vocabulary size {old_size} differs from model.vocab_size={new_size} and the "
        "checkpoint does not record its vocabulary file; the checkpoint needs its own vocabulary")
  old_path = paths.resolve(old)
  if vocab_facts.file_sha1(old_path) != have_sha:
    raise CheckpointError(
        f"{where} was trained with {old} (vocabulary SHA-1 {have_sha[:12]}), which is not on "
        "this machine; it is needed to check and initialise the extended data.vocab_path: copy "
        "it there")
  try:
    sources = new_piece_init_sources(old_path, new_path)
  except VocabError:
    sources = None
  if not sources or old_size + len(sources) != new_size:
    raise CheckpointError(
        f"{where}: data.vocab_path={new_path} is neither the checkpoint's vocabulary {old} nor "
        f"an extension of it (its first {old_size} pieces, then new ones); use the "
        "checkpoint's vocabulary or a model written by `python -m xlingo.data.vocab extend "
        f"--vocab {old}` (with model.vocab_size set to its size)")
  return sources


def _parse_inputs(values: list[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for value in values:
    lang, sep, pattern = value.partition("=")
    if not sep or not lang or not pattern:
      raise VocabError(f"--input {value!r} must look like LANG=GLOB, e.g. el='data/el*.txt'")
    out.setdefault(lang, []).append(pattern)
  return out


def build_parser(prog: str = "python -m xlingo.data.vocab_extend") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--vocab", required=True,
                      help="the OLD .model (or Hugging Face byte-level BPE tokenizer.json) to extend")
  parser.add_argument("--input", action="append", required=True,
                      help="LANG=GLOB of the new language's text, repeatable")
  parser.add_argument("--new_pieces", type=int, required=True, help="pieces to add (at most)")
  parser.add_argument("--output", required=True,
                      help="output prefix; writes PREFIX.model/.vocab (for a tokenizer.json: a "
                      "directory; writes DIR/tokenizer.json and its tokenizer_config.json)")
  parser.add_argument("--pieces", default="new_chars", choices=PIECE_MODES,
                      help="new_chars: only pieces with a character OLD lacks (old languages keep"
                      " their ids); all: any piece OLD lacks")
  parser.add_argument("--temperature", type=float, default=3.33)
  parser.add_argument("--max_sentences", type=int, default=2_000_000)
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv=None, prog: str = "python -m xlingo.data.vocab_extend") -> int:
  """``--vocab OLD.model --input LANG='GLOB' --new_pieces N --output NEW`` (argv without prog)."""

  args = build_parser(prog).parse_args(argv)

  try:
    vocab_facts.check_outputs(args.output, vocab_facts.kind_of(args.vocab))
    files = sampling.expand_globs(_parse_inputs(args.input))
    report = extend_vocab(args.vocab, files, args.new_pieces, args.output, pieces=args.pieces,
                          temperature=args.temperature, max_sentences=args.max_sentences,
                          seed=args.seed)
  except XlingoError as e:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"xlingo: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code) from None
  short = "" if report["added"] == report["requested"] else (
      f" (only {report['candidates']} useful pieces in the text)")
  print(f"added {report['added']} of {report['requested']} pieces{short}: "
        f"{report['old_size']} -> {report['new_size']}; wrote {report['model']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
