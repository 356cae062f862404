"""Byte-level BPE tokenizers in Hugging Face's ``tokenizer.json`` format: training one.

The layout is the one SmolLM2, Llama 3 and Qwen2 ship: a BPE model over the byte-level
alphabet (vocabulary.byte_to_unicode), a byte-level pre-tokenizer (GPT-2's splitting regex,
no prefix space) and decoder, and special tokens as added tokens. A ``tokenizer_config.json``
beside the ``tokenizer.json`` names the end-of-text token, as a Hugging Face model directory
does, so that ``xlingo.data.vocab.load_vocab`` and ``transformers`` both find it.
"""

from __future__ import annotations

import json

from xlingo import paths
from xlingo.data import vocabulary
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
  paths.write_text(paths.join(directory, vocabulary.HF_CONFIG), json.dumps(config, indent=2))
  return path
