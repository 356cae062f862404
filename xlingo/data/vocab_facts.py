"""Vocabulary facts in one place, without seqio or TensorFlow: which file a config names
(``configured``), its kind and checksum, the special ids of SentencePiece models, the
byte-level BPE alphabet, and whether a vocabulary fits a model. The vocabulary itself (either
kind behind one face) is ``xlingo.data.vocabulary``.
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
  """A vocabulary's identity in checkpoints (``vocab_sha1``) and caches (None if it cannot be
  read): the SHA-1 of its file's bytes, and for a ``tokenizer.json`` also of the
  ``tokenizer_config.json`` beside it (it names the eos)."""
  try:
    h = hashlib.sha1(paths.read_bytes(path))
    config = paths.join(paths.dirname(path), HF_CONFIG)
    if kind_of(path) == "hf" and paths.isfile(config):
      h.update(b"\0" + paths.read_bytes(config))
    return h.hexdigest()
  except OSError:
    return None


def configured(data_cfg) -> tuple[str, str | None]:
  """(absolute path, SHA-1) of the vocabulary a data config names: ``data.vocab_path``, or the
  shipped one when it is empty. The one place training, restore and the tools turn the
  setting into a file."""
  path = paths.resolve(data_cfg.vocab_path or embedded_path())
  return path, file_sha1(path)


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


def byte_counts(byte_strings) -> np.ndarray:
  """The length of each id's bytes (``piece_bytes()`` of both kinds of vocabulary), read-only."""
  out = np.fromiter(map(len, byte_strings), np.int32, count=len(byte_strings))
  out.setflags(write=False)
  return out


# --- UTF-8 validity of sampled pieces -------------------------------------------------------

# The states of a UTF-8 reader between pieces: what the bytes so far still need. A lead byte
# fixes how many continuation bytes (0x80-0xBF) follow; after E0, ED, F0 and F4 the first one
# has a narrower range, which rules out overlong forms (E0 80, F0 80), UTF-16 surrogates (ED A0)
# and code points past U+10FFFF (F4 90). REJECT: no valid text has this prefix.
UTF8_READY, UTF8_NEED1, UTF8_NEED2, UTF8_NEED3 = 0, 1, 2, 3
UTF8_AFTER_E0, UTF8_AFTER_ED, UTF8_AFTER_F0, UTF8_AFTER_F4 = 4, 5, 6, 7
UTF8_STATES = 8
UTF8_REJECT = 8


def _utf8_step(state: int, b: int) -> int:
  if state == UTF8_READY:
    if b < 0x80:
      return UTF8_READY
    if 0xC2 <= b <= 0xDF:
      return UTF8_NEED1
    if b == 0xE0:
      return UTF8_AFTER_E0
    if b == 0xED:
      return UTF8_AFTER_ED
    if 0xE1 <= b <= 0xEF:
      return UTF8_NEED2
    if b == 0xF0:
      return UTF8_AFTER_F0
    if b == 0xF4:
      return UTF8_AFTER_F4
    if 0xF1 <= b <= 0xF3:
      return UTF8_NEED3
    return UTF8_REJECT  # a lone continuation byte, C0/C1 (overlong) or F5-FF
  lo, hi, then = {
      UTF8_NEED1: (0x80, 0xBF, UTF8_READY), UTF8_NEED2: (0x80, 0xBF, UTF8_NEED1),
      UTF8_NEED3: (0x80, 0xBF, UTF8_NEED2), UTF8_AFTER_E0: (0xA0, 0xBF, UTF8_NEED1),
      UTF8_AFTER_ED: (0x80, 0x9F, UTF8_NEED1), UTF8_AFTER_F0: (0x90, 0xBF, UTF8_NEED2),
      UTF8_AFTER_F4: (0x80, 0x8F, UTF8_NEED2)}[state]
  return then if lo <= b <= hi else UTF8_REJECT


def utf8_transitions(byte_strings, size: int | None = None) -> np.ndarray:
  """``[UTF8_STATES, size]`` int8: the reader's state after each id's bytes, from each state
  (UTF8_REJECT where they cannot follow). An id with no bytes (EOS, other special ids, and the
  model's rows past the vocabulary) keeps a complete text complete and is rejected inside an
  unfinished character, so a row cannot stop in the middle of one."""
  size = max(size or 0, len(byte_strings))
  out = np.full((UTF8_STATES, size), UTF8_REJECT, np.int8)
  out[UTF8_READY] = UTF8_READY
  step = [[_utf8_step(s, b) for b in range(256)] for s in range(UTF8_REJECT)] + [
      [UTF8_REJECT] * 256]
  for i, data in enumerate(byte_strings):
    for start in range(UTF8_STATES):
      state = start
      for b in data:
        state = step[state][b]
        if state == UTF8_REJECT:
          break
      out[start, i] = state if data or start == UTF8_READY else UTF8_REJECT
  return out


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


def check_outputs(output: str, kind: str = "sentencepiece") -> None:
  """VocabError before any training when a vocabulary cannot be written at ``output``: a
  SentencePiece PREFIX gets PREFIX.model and PREFIX.vocab, a Hugging Face tokenizer the
  directory OUTPUT with tokenizer.json and tokenizer_config.json. Catches a read-only place, a
  file where a directory should be and a directory where a file should be."""
  if kind == "hf":
    files = [paths.join(output, "tokenizer.json"), paths.join(output, "tokenizer_config.json")]
  else:
    files = [output + ".model", output + ".vocab"]
  parent = paths.dirname(files[0])
  try:
    paths.makedirs(parent)
  except OSError as e:
    raise VocabError(f"--output {output}: cannot create the directory {parent} "
                     f"({e.strerror or e}); choose a writable place") from None
  for f in files:
    try:
      paths.check_writable(f)
    except OSError as e:
      raise VocabError(f"--output {output}: {f} cannot be written ({e.strerror or e}); choose "
                       "a writable place") from None
