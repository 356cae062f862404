"""The vocabulary: one face over SentencePiece models and Hugging Face ``tokenizer.json`` files.

``load(path)`` gives either kind; callers need only

  kind            "sentencepiece" or "hf"
  path, checksum  where it was loaded from and the SHA-1 of that file's bytes
  vocab_size      ids 0 .. vocab_size - 1
  eos_id          ends every example; generation stops there
  bos_id          the tokenizer's beginning-of-text id, or None
  start_id        the model input at a segment's start (the targets are shifted right by it)
  encode(text)    ids of one text, no special token added; decode(ids) the text back
  encode_flat     ids of many texts at once: (all ids concatenated, length of each)
  piece_bytes()   UTF-8 bytes each id stands for (0 for special ids): bits per byte
  piece_byte_strings()  those bytes themselves (sampling's UTF-8 mask, xlingo.decode)

and never SentencePiece or the ``tokenizers`` library themselves. Both kinds are
``seqio.Vocabulary`` subclasses, so seqio tasks take them as they are.

SentencePiece (``*.model``) keeps seqio's ids: pad 0, eos 1, unk 2, no bos; the start id is
0. A Hugging Face ``tokenizer.json`` (byte-level BPE as SmolLM2, Llama 3 and Qwen2 ship it, or
a SentencePiece-style BPE with byte fallback as Llama 2 and Mistral do) keeps its own ids: its
eos and bos come from the ``tokenizer_config.json`` beside it (``eos_token``/``bos_token``).
Its start id is what a text follows in the model's pretraining: the special token its
post-processor puts first (Llama 3's ``<|begin_of_text|>``), else its bos where the config sets
``add_bos_token``, else ``<|endoftext|>`` (the document separator of SmolLM2 and Qwen2, also
where their instruct versions end turns with ``<|im_end|>``), else its eos. Its checksum covers
the ``tokenizer_config.json`` too, since that decides the eos. Text is encoded with special tokens read as plain text, so a
corpus that contains ``<|endoftext|>`` cannot inject a control id. Nothing in xlingo treats an
id as padding: masks come from segment ids.

Which file a config names, checksums and ids are in ``vocab_facts`` (no seqio, no TensorFlow).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import seqio
import tensorflow as tf

from xlingo import paths
from xlingo.data import vocab_facts as v
from xlingo.errors import VocabError

# --- SentencePiece ---------------------------------------------------------------------------


def sentencepiece_processor(path: str):
  """The SentencePiece processor of the model at ``path`` (local or remote), checked."""
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(v.local_model(path))
  except (OSError, RuntimeError):
    raise VocabError(
        f"{path}: not a SentencePiece model; give the .model file written by the trainer (or a"
        " Hugging Face tokenizer.json)"
    ) from None
  if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (v.PAD_ID, v.EOS_ID, v.UNK_ID):
    raise VocabError(
        f"{path}: special ids pad={sp.pad_id()} eos={sp.eos_id()} unk={sp.unk_id()}, but seqio"
        " needs pad=0 eos=1 unk=2; retrain it with `python -m xlingo.data.vocab train`"
    )
  return sp


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary with the face (module docstring); ``tokenizer`` is the
  SentencePiece processor."""

  kind = "sentencepiece"
  start_id = v.PAD_ID

  def __init__(self, path: str):
    sentencepiece_processor(path)  # clear errors before seqio's own
    self.path = paths.resolve(path)
    super().__init__(v.local_model(path))
    self._piece_bytes = None
    self._piece_strings = None

  @property
  def checksum(self) -> str:
    return v.file_sha1(self.path)

  @property
  def bos_id(self) -> int | None:
    return None

  def encode_flat(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` (str or bytes) as (all ids concatenated, length of each).

    One multi-threaded batch call. sentencepiece 0.2.3's numpy output builds one array per
    text in Python (about a fifth of the encode time, holding the GIL); its C++ buffers are
    joined here in one step instead, falling back to the public call if that method is not
    there.
    """
    sp = self.tokenizer
    batch = getattr(getattr(sp, "_processor", None), "_EncodeAsBufferBatch", None)
    if batch is not None:
      bufs = batch(texts, -1, None, False, 0, 0.0, False, False, False)
      lens = np.fromiter((memoryview(b).nbytes for b in bufs), np.int64, count=len(bufs)) // 4
      return np.frombuffer(b"".join(bufs), np.int32), lens
    arrs = sp.Encode(texts, return_type="numpy")
    lens = np.fromiter(map(len, arrs), np.int64, count=len(arrs))
    return (np.concatenate(arrs) if arrs else np.zeros(0, np.int32)), lens

  def piece_bytes(self) -> np.ndarray:
    """UTF-8 bytes of the normalised text each piece stands for ("▁" as a space, a byte piece
    1, control and unknown pieces 0)."""
    if self._piece_bytes is None:
      self._piece_bytes = v.byte_counts(self.piece_byte_strings())
    return self._piece_bytes

  def piece_byte_strings(self) -> tuple[bytes, ...]:
    """The bytes each id stands for: a ``<0xNN>`` byte piece its byte, another piece its text
    with "▁" as a space, control and unknown pieces none."""
    if self._piece_strings is None:
      self._piece_strings = self._byte_strings()
    return self._piece_strings

  def _byte_strings(self) -> tuple[bytes, ...]:
    sp = self.tokenizer
    out = []
    for i in range(sp.get_piece_size()):
      if sp.is_control(i) or sp.is_unknown(i):
        out.append(b"")
      elif sp.is_byte(i):
        out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
      else:
        out.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return tuple(out)


# --- Hugging Face tokenizer.json ------------------------------------------------------------


def _has_type(node, name: str) -> bool:
  """Whether a tokenizer.json component (or a Sequence of them) is of type ``name``."""
  if not isinstance(node, dict):
    return False
  if node.get("type") == name:
    return True
  subs = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
  return any(_has_type(s, name) for s in subs)


def _token_name(value) -> str | None:
  """A tokenizer_config.json token entry: a string or ``{"content": ...}``."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class HFVocabulary(seqio.Vocabulary):
  """A Hugging Face ``tokenizer.json`` behind the face (module docstring); ``tokenizer`` is
  the ``tokenizers.Tokenizer``, ``spec`` its parsed JSON."""

  kind = "hf"

  def __init__(self, path: str):
    import tokenizers

    super().__init__(extra_ids=0)
    if not paths.isfile(path):
      v.local_model(path)  # its one-line error
    self.path = paths.resolve(path)
    text = paths.read_text(self.path)
    try:
      self.spec = json.loads(text)
      self.tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - json and the Rust library raise their own types
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
      raise VocabError(f"{path}: not a Hugging Face tokenizer.json ({first}); give the "
                       "tokenizer.json of a Hugging Face model directory") from None
    # Corpus text is text: "<|endoftext|>" written in a file is not the control id.
    self.tokenizer.encode_special_tokens = True
    ids = self.tokenizer.get_vocab(with_added_tokens=True)
    self._size = max(ids.values()) + 1 if ids else 0
    config = self._config()
    self._eos = self._special_id(config, "eos_token", required=True)
    self._bos = self._special_id(config, "bos_token", required=False)
    self._start = self._start_of_text(config)
    self._unk = self.spec.get("model", {}).get("unk_token")
    self._unk = None if self._unk is None else self.tokenizer.token_to_id(self._unk)
    self.byte_level = _has_type(self.spec.get("pre_tokenizer"), "ByteLevel") or _has_type(
        self.spec.get("decoder"), "ByteLevel")
    self._piece_bytes = None
    self._piece_strings = None

  def _config(self) -> dict:
    where = paths.join(paths.dirname(self.path), v.HF_CONFIG)
    if not paths.isfile(where):
      return {}
    try:
      config = json.loads(paths.read_text(where))
    except ValueError:
      raise VocabError(f"{where}: not valid JSON; fix it or remove it (the eos token is then "
                       "guessed from the tokenizer's special tokens)") from None
    return config if isinstance(config, dict) else {}

  def _special_id(self, config: dict, key: str, required: bool) -> int | None:
    name = _token_name(config.get(key))
    if name is None and required:
      name = next((n for n in v.EOS_NAMES if self.tokenizer.token_to_id(n) is not None), None)
    if name is None:
      if required:
        raise VocabError(f"{self.path}: no end-of-text token; put a {v.HF_CONFIG} with "
                         "\"eos_token\" beside it (as Hugging Face model directories have)")
      return None
    i = self.tokenizer.token_to_id(name)
    if i is None:
      raise VocabError(f"{self.path}: {v.HF_CONFIG} names {key} {name!r}, which the tokenizer "
                       "does not have; give the tokenizer_config.json of the same model")
    return int(i)

  def _start_of_text(self, config: dict) -> int:
    """The id a text follows (module docstring): the special token the tokenizer's own
    post-processor puts before a text (Llama 3's ``<|begin_of_text|>``), else its bos when
    ``add_bos_token`` asks for it, else ``<|endoftext|>``, the document separator of GPT-2-style
    pretraining (SmolLM2, Qwen2), else its eos."""
    bare = self.tokenizer.encode("x", add_special_tokens=False).ids
    full = self.tokenizer.encode("x", add_special_tokens=True).ids
    if len(full) > len(bare) and full[len(full) - len(bare):] == bare:
      return int(full[0])
    if self._bos is not None and config.get("add_bos_token") is True:
      return self._bos
    separator = self.tokenizer.token_to_id(v.EOS_NAMES[0])
    return self._eos if separator is None else int(separator)

  @property
  def checksum(self) -> str:
    return v.file_sha1(self.path)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def start_id(self) -> int:
    return self._start

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._size

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s):
    # A scalar string, as seqio's tokenize preprocessors give one example at a time (xlingo's
    # own readers tokenize on the host, in batches: encode_flat).
    def enc(x):
      return np.asarray(self._encode(x.item().decode("utf-8")), np.int32)

    out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
    out.set_shape([None])
    return out

  def _decode_tf(self, ids):
    def dec(x):
      return np.asarray(self._decode(x.tolist()).encode("utf-8"), object)

    out = tf.numpy_function(dec, [ids], tf.string, stateful=False)
    out.set_shape([])
    return out

  def encode_flat(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` (str or bytes) as (all ids concatenated, length of each), in one
    multi-threaded batch call."""
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    encs = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in encs), np.int64, count=len(encs))
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int32,
                       count=int(lens.sum()))
    return flat, lens

  def piece_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for: a byte-level piece's bytes through the byte alphabet,
    a ``<0xNN>`` byte-fallback piece 1, another piece's text with "▁" as a space, an added
    token's content; special tokens and unused ids 0."""
    if self._piece_bytes is None:
      self._piece_bytes = v.byte_counts(self.piece_byte_strings())
    return self._piece_bytes

  def piece_byte_strings(self) -> tuple[bytes, ...]:
    """The bytes each id stands for (``piece_bytes`` counts them); special and unused ids
    none."""
    if self._piece_strings is None:
      self._piece_strings = self._byte_strings()
    return self._piece_strings

  def _byte_strings(self) -> tuple[bytes, ...]:
    out = [b""] * self._size
    added = {int(i): t for i, t in self.tokenizer.get_added_tokens_decoder().items()}
    byte_fallback = bool(self.spec.get("model", {}).get("byte_fallback"))
    for piece, i in self.tokenizer.get_vocab(with_added_tokens=False).items():
      if i in added or i == self._unk:
        continue
      if self.byte_level:
        out[i] = v.piece_to_bytes(piece)
      elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece[-1] == ">":
        out[i] = bytes([int(piece[3:5], 16)])
      else:
        out[i] = piece.replace("\u2581", " ").encode("utf-8")
    for i, t in added.items():
      out[i] = b"" if t.special else t.content.encode("utf-8")
    return tuple(out)

  def __eq__(self, other):
    return isinstance(other, HFVocabulary) and other.checksum == self.checksum

  def __hash__(self):
    return hash(self.checksum)


# --- loading --------------------------------------------------------------------------------


def load(path: str):
  """The vocabulary at ``path``: :class:`HFVocabulary` for a ``*.json`` file, else
  :class:`SentencePieceVocabulary`; VocabError (one line) for a missing or unusable file."""
  if v.kind_of(path) == "hf":
    return HFVocabulary(path)
  return SentencePieceVocabulary(path)


def load_configured(data_cfg, model_vocab_size: int | None = None):
  """(absolute path, vocabulary) of ``data.vocab_path`` (``configured``), checked against the
  model's ``model.vocab_size`` when given."""
  path, _ = v.configured(data_cfg)
  vocab = load(path)
  if model_vocab_size is not None:
    v.check_size(vocab, model_vocab_size)
  return path, vocab


def recorded(data_cfg, meta: dict, model_vocab_size: int, where: str):
  """(absolute path, vocabulary) a checkpoint was trained with, for the tools: ``data.vocab_path``
  when set, else the path in the checkpoint's metadata, else the shipped one; each checked
  against the recorded SHA-1 (``meta["vocab_sha1"]``). CheckpointError when none matches."""
  from xlingo.errors import CheckpointError

  want = meta.get("vocab_sha1")
  given = data_cfg.vocab_path
  candidates = [given] if given else [meta.get("vocab_path"), v.embedded_path()]
  for path in filter(None, candidates):
    path = paths.resolve(path)
    if not want or v.file_sha1(path) == want:
      vocab = load(path)
      v.check_size(vocab, model_vocab_size)
      return path, vocab
  trained = meta.get("vocab_path") or "its vocabulary"
  if given:
    raise CheckpointError(f"{where}: data.vocab_path={given!r} is not the vocabulary the "
                          f"checkpoint was trained with (SHA-1 {want[:12]}, {trained}); set "
                          "data.vocab_path to that vocabulary")
  raise CheckpointError(f"{where} was trained with {trained} (vocabulary SHA-1 {want[:12]}), "
                        "which is not on this machine; copy it here and pass "
                        "--config.data.vocab_path=COPY")
