"""Vocabulary facts in one place: which file a config names, its kind, its checksum, the
special ids of SentencePiece models, the byte-level BPE alphabet, and loading either kind.

``load(path)`` gives a vocabulary behind one face (``xlingo.data.vocab_kinds``), whatever the
file: a SentencePiece ``*.model`` or a Hugging Face ``tokenizer.json``. Callers need only

  kind            "sentencepiece" or "hf"
  path, checksum  where it was loaded from and the SHA-1 of that file's bytes
  vocab_size      ids 0 .. vocab_size - 1
  eos_id          ends every example; generation stops there
  bos_id          the tokenizer's beginning-of-text id, or None
  start_id        the model input at a segment's start (the targets are shifted right by it)
  encode(text)    ids of one text, no special token added; decode(ids) the text back
  encode_flat     ids of many texts at once: (all ids concatenated, length of each)
  piece_bytes()   UTF-8 bytes each id stands for (0 for special ids): bits per byte

and never SentencePiece or the ``tokenizers`` library themselves. Both kinds are
``seqio.Vocabulary`` subclasses, so seqio tasks take them as they are.

SentencePiece (``*.model``) keeps seqio's ids: pad 0, eos 1, unk 2, no bos; the start id is
0. A Hugging Face ``tokenizer.json`` (byte-level BPE as SmolLM2, Llama 3 and Qwen2 ship it, or
a SentencePiece-style BPE with byte fallback as Llama 2 and Mistral do) keeps its own ids: its
eos and bos come from the ``tokenizer_config.json`` beside it (``eos_token``/``bos_token``),
and the start id is the bos id, or the eos id where it has no bos (the token that separates
documents in its pretraining). Text is encoded with special tokens read as plain text, so a
corpus that contains ``<|endoftext|>`` cannot inject a control id. Nothing in xlingo treats an
id as padding: masks come from segment ids.

This module imports neither seqio nor TensorFlow (the vocabulary command line stays quick);
``load`` does.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from xlingo import paths
from xlingo.errors import VocabError

# SentencePiece models written by ``python -m xlingo.data.vocab train`` (seqio's ids).
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
KINDS = ("sentencepiece", "hf")
HF_CONFIG = "tokenizer_config.json"
# End-of-text names tried, in order, for a tokenizer.json without a tokenizer_config.json.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
EMBEDDED_VOCAB_NAME = "xlingo_8k.model"


def embedded_path() -> str:
  """The shipped vocabulary, trained on the embedded corpus's train split."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "vocab",
                      EMBEDDED_VOCAB_NAME)


def kind_of(path: str) -> str:
  """"hf" for a ``*.json`` tokenizer file, else "sentencepiece"."""
  return "hf" if str(path).endswith(".json") else "sentencepiece"


@functools.lru_cache(maxsize=16)
def file_sha1(path: str) -> str | None:
  """SHA-1 of a vocabulary file's bytes (None if it cannot be read): its identity in
  checkpoints (``vocab_sha1``) and caches."""
  try:
    return hashlib.sha1(paths.read_bytes(path)).hexdigest()
  except OSError:
    return None


def configured(data_cfg) -> tuple[str, str | None]:
  """(absolute path, SHA-1) of the vocabulary a data config names: ``data.vocab_path``, or the
  shipped one when it is empty. The one place training, restore and the tools turn the
  setting into a file."""
  path = paths.resolve(data_cfg.vocab_path or embedded_path())
  return path, file_sha1(path)


def load_configured(data_cfg, model_vocab_size: int | None = None):
  """(absolute path, vocabulary) of ``data.vocab_path`` (``configured``), checked against the
  model's ``model.vocab_size`` when given."""
  path, _ = configured(data_cfg)
  vocab = load(path)
  if model_vocab_size is not None:
    check_size(vocab, model_vocab_size)
  return path, vocab


def local_model(path: str) -> str:
  """A local file with the model at ``path``: the path itself, or for a remote model (gs://) a
  content-addressed local copy fetched through the path layer (seqio and SentencePiece read
  models through tf.io.gfile or local files only)."""
  if not paths.isfile(path):
    raise VocabError(
        f"{path}: vocabulary file not found; train one with `python -m xlingo.data.vocab train`"
        " or point data.vocab_path at an existing .model or tokenizer.json"
    )
  return paths.local_copy(path)


def load(path: str):
  """The vocabulary at ``path``: ``vocab_kinds.HFVocabulary`` for a ``*.json`` file, else
  ``vocab_kinds.SentencePieceVocabulary``; VocabError (one line) for a missing or unusable
  file."""
  from xlingo.data import vocab_kinds

  if kind_of(path) == "hf":
    return vocab_kinds.HFVocabulary(path)
  return vocab_kinds.SentencePieceVocabulary(path)


# --- the byte-level BPE alphabet ------------------------------------------------------------


@functools.cache
def byte_to_unicode() -> dict[int, str]:
  """The byte-level BPE alphabet (GPT-2's): each byte value as the character that stands for
  it in pieces. Printable Latin-1 bytes stand for themselves; the others (controls, space,
  0x7f-0xa0, 0xad) take the characters from U+0100 on, in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


@functools.cache
def unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in byte_to_unicode().items()}


def piece_to_bytes(piece: str) -> bytes:
  """The bytes a byte-level BPE piece stands for (VocabError for a character outside the
  byte alphabet)."""
  table = unicode_to_byte()
  try:
    return bytes(table[c] for c in piece)
  except KeyError:
    raise VocabError(f"piece {piece!r} has a character outside the byte-level alphabet") from None


def bytes_to_piece(data: bytes) -> str:
  """The byte-level BPE spelling of ``data``."""
  table = byte_to_unicode()
  return "".join(table[b] for b in data)


def check_size(vocab, model_vocab_size: int) -> None:
  """VocabError unless the model has one row per id: ``vocab.vocab_size == model_vocab_size``,
  or for a Hugging Face tokenizer at least that many (models pad their tables: Qwen2's 151,936
  rows serve 151,665 ids)."""
  n = vocab.vocab_size
  if n == model_vocab_size or (getattr(vocab, "kind", "") == "hf" and model_vocab_size > n):
    return
  raise VocabError(
      f"vocabulary has {n} pieces but the model expects {model_vocab_size}; set"
      f" model.vocab_size={n} or use a vocabulary of {model_vocab_size} pieces"
  )


def byte_lengths(vocab, size: int | None = None) -> np.ndarray:
  """``vocab.piece_bytes()`` as float32, zero-padded to ``size`` rows (the model's)."""
  table = vocab.piece_bytes()
  out = np.zeros(max(size or 0, len(table)), np.float32)
  out[: len(table)] = table
  return out

