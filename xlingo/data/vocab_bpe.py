"""Byte-level BPE tokenizers in Hugging Face's ``tokenizer.json`` format: training one.

The layout is the one SmolLM2, Llama 3 and Qwen2 ship: a BPE model over the byte-level
alphabet (vocab_facts.byte_to_unicode), a byte-level pre-tokenizer (GPT-2's splitting regex,
no prefix space) and decoder, and special tokens as added tokens. A ``tokenizer_config.json``
beside the ``tokenizer.json`` names the end-of-text token, as a Hugging Face model directory
does, so that ``xlingo.data.vocab.load_vocab`` and ``transformers`` both find it.
"""

from __future__ import annotations

import json

from xlingo import paths
from xlingo.data import vocab_facts
from xlingo.errors import VocabError

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


def _byte_level_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def train_tokenizer(lines: list[str], vocab_size: int, specials=(END_OF_TEXT,),
                    min_frequency: int = 2):
  """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``lines``: the special tokens first
  (ids 0..), then the 256 byte pieces, then merges up to ``vocab_size`` ids (fewer when the
  text supports no more)."""
  from tokenizers import pre_tokenizers, trainers

  floor = len(specials) + 256
  if vocab_size <= floor:
    raise VocabError(f"vocab_size={vocab_size} leaves no room for merges; a byte-level BPE "
                     f"needs more than {floor} ids (256 bytes and {len(specials)} specials)")
  tok = _byte_level_tokenizer()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(specials), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(lines, trainer)
  return tok


def save(tok, directory: str, eos: str = END_OF_TEXT, bos: str | None = None) -> str:
  """Writes ``directory``/tokenizer.json and a tokenizer_config.json naming ``eos`` (and
  ``bos``); returns the tokenizer.json path."""
  if tok.token_to_id(eos) is None:
    raise VocabError(f"the tokenizer has no {eos!r} token to end texts with")
  paths.makedirs(directory)
  path = paths.join(directory, TOKENIZER_FILE)
  paths.write_text(path, tok.to_str(pretty=True))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
            "bos_token": bos, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
  paths.write_text(paths.join(directory, vocab_facts.HF_CONFIG), json.dumps(config, indent=2))
  return path


# --- extension: new pieces appended, every old id kept ---------------------------------------

# Trial size over the pieces asked for (the new model also holds the 256 bytes and pieces OLD
# has); doubled until enough candidates exist.
_TRIAL_MARGIN = 512
_MAX_TRIALS = 5


def load_spec(path: str) -> dict:
  """The parsed ``tokenizer.json`` of a byte-level BPE; VocabError for anything else."""
  from xlingo.data import vocab_facts as facts

  facts.local_model(path)  # the one-line "not found"
  try:
    spec = json.loads(paths.read_text(path))
  except ValueError:
    raise VocabError(f"{path}: not valid JSON; give a Hugging Face tokenizer.json") from None
  model = spec.get("model") if isinstance(spec, dict) else None
  if not isinstance(model, dict) or model.get("type") != "BPE" or not _byte_level(spec):
    raise VocabError(f"{path}: not a byte-level BPE tokenizer (as SmolLM2, Llama 3 and Qwen2 "
                     "ship); vocabulary extension supports those and SentencePiece .model files")
  return spec


def _byte_level(spec: dict) -> bool:
  def has(node):
    if not isinstance(node, dict):
      return False
    subs = node.get("pretokenizers") or []
    return node.get("type") == "ByteLevel" or any(has(s) for s in subs)

  return has(spec.get("pre_tokenizer"))


def _merge_parts(merge) -> tuple[str, str]:
  """A merge as tokenizer.json stores it: ``[a, b]`` or (older files) ``"a b"``."""
  if isinstance(merge, str):
    a, _, b = merge.partition(" ")
    return a, b
  return merge[0], merge[1]


def _train_like(spec: dict, lines: list[str], vocab_size: int) -> dict:
  """A BPE trained on ``lines`` with OLD's normaliser and pre-tokenizer (so it cuts text into
  the same words), as a parsed tokenizer.json."""
  from tokenizers import Tokenizer, pre_tokenizers, trainers

  empty = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
           "post_processor": None, "decoder": spec.get("decoder"),
           "model": {"type": "BPE", "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None,
                     "fuse_unk": False, "byte_fallback": False, "vocab": {}, "merges": []}}
  tok = Tokenizer.from_str(json.dumps(empty))
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(lines, trainer)
  return json.loads(tok.to_str())


class _OldText:
  """What text OLD's pieces spell: the characters they hold whole, and every byte string that
  occurs inside the UTF-8 encoding of one of those characters."""

  def __init__(self, vocab: dict[str, int]):
    from xlingo.data import vocab_facts as facts

    self.chars = set()
    for piece in vocab:
      self.chars.update(facts.piece_to_bytes(piece).decode("utf-8", "ignore"))
    self.inner = set()
    for ch in self.chars:
      enc = ch.encode("utf-8")
      self.inner.update(enc[i:j] for i in range(len(enc)) for j in range(i + 1, len(enc) + 1))

  def needs_new_char(self, data: bytes) -> bool:
    """Whether every text that contains ``data`` contains a character OLD's pieces lack: a
    whole character of ``data`` is new, or a fragment of a character at either end (a piece
    may stop inside a character) is part of no old character."""
    start = 0
    while start < len(data) and data[start] & 0xC0 == 0x80:  # continuation bytes
      start += 1
    end = len(data)
    for back in range(1, min(4, len(data) - start) + 1):  # an unfinished last character
      lead = data[len(data) - back]
      if lead & 0xC0 != 0x80:
        need = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
        if need > back:
          end = len(data) - back
        break
    try:
      whole = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
      return False  # not text as UTF-8 writes it: keep the piece out
    if any(ch not in self.chars for ch in whole):
      return True
    head, tail = data[:start], data[end:]
    return bool(head and head not in self.inner) or bool(tail and tail not in self.inner)


def candidate_merges(spec: dict, new: dict, pieces: str = "new_chars") -> list[tuple[str, str]]:
  """``new``'s merges, in order, whose result OLD (``spec``) lacks and whose parts OLD or an
  earlier candidate has; with ``pieces="new_chars"`` only those that can apply to text with a
  character OLD's pieces lack, so that other text keeps its tokens."""
  from xlingo.data import vocab_facts as facts

  have = set(spec["model"]["vocab"])
  old = _OldText(spec["model"]["vocab"]) if pieces == "new_chars" else None
  out = []
  for merge in new["model"]["merges"]:
    a, b = _merge_parts(merge)
    piece = a + b
    if piece in have or a not in have or b not in have:
      continue
    if old is not None and not old.needs_new_char(facts.piece_to_bytes(piece)):
      continue
    out.append((a, b))
    have.add(piece)
  return out


def extend_tokenizer(old_path: str, lines: list[str], new_pieces: int, output: str,
                     pieces: str = "new_chars") -> dict:
  """Writes ``output``/tokenizer.json: OLD plus up to ``new_pieces`` pieces learned from
  ``lines``, each with the merge that makes it, after OLD's (ids from OLD's size on, merges of
  lower priority than every old one); the tokenizer_config.json beside OLD is copied along.
  Returns a report as ``vocab_extend.extend_vocab`` does."""
  from tokenizers import Tokenizer

  if new_pieces < 1:
    raise VocabError(f"--new_pieces must be at least 1, got {new_pieces}")
  spec = load_spec(old_path)
  out_path = paths.join(output, TOKENIZER_FILE)
  if paths.resolve(out_path) == paths.resolve(old_path):
    raise VocabError(f"--output {output} would overwrite --vocab {old_path}; choose another "
                     "output directory")
  vocab = spec["model"]["vocab"]
  ids = list(vocab.values()) + [t["id"] for t in spec.get("added_tokens", [])]
  old_size = max(ids) + 1
  size = 256 + new_pieces + _TRIAL_MARGIN
  for _ in range(_MAX_TRIALS):
    new = _train_like(spec, lines, size)
    candidates = candidate_merges(spec, new, pieces)
    if len(candidates) >= new_pieces or len(new["model"]["vocab"]) < size:
      break
    size *= 2
  chosen = candidates[:new_pieces]
  merged = json.loads(json.dumps(spec))
  as_string = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], str)
  for k, (a, b) in enumerate(chosen):
    merged["model"]["vocab"][a + b] = old_size + k
    merged["model"]["merges"].append(f"{a} {b}" if as_string else [a, b])
  text = json.dumps(merged, ensure_ascii=False, indent=2)
  try:
    Tokenizer.from_str(text)  # a broken file fails before anything is written
  except Exception as e:  # noqa: BLE001 - the Rust library raises its own type
    raise VocabError(f"the extended tokenizer does not load ({str(e)[:120]}); report this "
                     "with the old tokenizer") from None
  paths.makedirs(output)
  config = paths.join(paths.dirname(paths.resolve(old_path)), "tokenizer_config.json")
  if paths.isfile(config):
    paths.copy_file(config, paths.join(output, "tokenizer_config.json"))
  paths.write_text(out_path, text)
  return {"old_size": old_size, "new_size": old_size + len(chosen), "requested": new_pieces,
          "added": len(chosen), "candidates": len(candidates),
          "new_model_size": len(new["model"]["vocab"]), "pieces": pieces,
          "model": paths.resolve(out_path)}


def init_sources(old_path: str, new_path: str) -> dict[int, list[int]]:
  """``{new_id: [old ids]}``: the OLD ids each appended piece's bytes become under OLD's merges
  (the adaptation step initialises the new row as their mean). VocabError unless NEW is OLD
  with pieces and merges appended."""
  from tokenizers import Tokenizer

  old, new = load_spec(old_path), load_spec(new_path)
  ov, nv = old["model"]["vocab"], new["model"]["vocab"]
  om, nm = old["model"]["merges"], new["model"]["merges"]
  same = (all(nv.get(p) == i for p, i in ov.items()) and nm[:len(om)] == om
          and new.get("added_tokens") == old.get("added_tokens"))
  if not same:
    raise VocabError(f"{new_path} is not {old_path} with pieces appended; give the tokenizer "
                     "that `vocab extend` wrote from it")
  model = Tokenizer.from_str(json.dumps(old)).model
  return {i: [t.id for t in model.tokenize(p)] for p, i in sorted(nv.items(), key=lambda x: x[1])
          if p not in ov}
