"""A Hugging Face byte-level BPE tokenizer.json as the run's vocabulary: pieces and bytes,
training, bits per byte, generation."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from xlingo.data import vocab as vocab_lib
from xlingo.data import vocab_bpe

CORPUS = vocab_lib.corpus_dir()
LINES = 300  # per language: enough for a few hundred merges, trained in well under a second


def _lines(lang, split="train", n=LINES):
  return vocab_lib.read_lines(os.path.join(CORPUS, "mono", f"{lang}.{split}.txt"))[:n]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE of 512 ids trained on English, German and Japanese lines."""
  out = tmp_path_factory.mktemp("bpe")
  tok = vocab_bpe.train_tokenizer(_lines("en") + _lines("de") + _lines("ja"), 512)
  return vocab_bpe.save(tok, str(out))


def test_pieces_bytes_and_special_text(bpe):
  vocab = vocab_lib.load_vocab(bpe)
  assert vocab.kind == "hf" and vocab.vocab_size == 512
  assert (vocab.eos_id, vocab.bos_id, vocab.start_id) == (0, None, 0)
  table = vocab.piece_bytes()
  assert table[vocab.eos_id] == 0
  for text in ["Grüße aus Köln", "日本語の文章です。", _lines("de", "validation", 1)[0]]:
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    # byte-level pieces have no normaliser: their bytes add up to the raw text's exactly
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
  # a multi-byte character alone: "語" is 3 bytes, whatever pieces it became
  assert sorted(int(table[i]) for i in vocab.encode("語")) in ([3], [1, 2], [1, 1, 1], [2, 1])
  # "<|endoftext|>" written in a corpus is text, not the end-of-text id
  ids = vocab.encode("a <|endoftext|> b")
  assert vocab.eos_id not in ids and vocab.decode(ids) == "a <|endoftext|> b"
  flat, lens = vocab.encode_flat(["Hallo", b"Welt"])
  assert lens.tolist() == [len(vocab.encode("Hallo")), len(vocab.encode("Welt"))]
  assert flat.tolist() == vocab.encode("Hallo") + vocab.encode("Welt")


def test_train_bpb_and_generate(bpe, tmp_path):
  from xlingo import evaluate, generate
  from xlingo.load import load_model
  from xlingo.training import loop

  line = "Die Straße führt über die Brücke nach Köln."  # one row of seq_len 64: no chunks
  files = {}
  for lang in ("en", "de"):
    train = tmp_path / f"{lang}.train.txt"
    train.write_text("\n".join(_lines(lang, n=64)) + "\n")
    files[lang] = str(train)
  val = tmp_path / "de.valid.txt"
  val.write_text(line + "\n")
  cfg = tiny.get_config()
  cfg.data.source = "files"
  cfg.data.languages = ("en", "de")
  cfg.data.file_patterns = files
  cfg.data.file_val_patterns = {"de": str(val)}
  cfg.data.vocab_path = bpe
  cfg.data.group_size = 0
  cfg.model.vocab_size = 512
  cfg.train.steps = 2
  cfg.train.eval_every = 2
  cfg.checkpoint.every_steps = 2
  workdir = str(tmp_path / "run")
  loop.run(cfg, workdir)

  lm = load_model(cfg, workdir)
  vocab = lm.vocab
  assert vocab.kind == "hf" and lm.meta["vocab_sha1"] == vocab.checksum
  # bits per byte of the one validation line, by hand: start id, the line's tokens, EOS
  ids = vocab.encode(line)
  assert len(ids) < cfg.data.seq_len
  inputs = jnp.asarray([[vocab.start_id] + ids])
  targets = np.asarray(ids + [vocab.eos_id])
  de = lm.table.id("de")
  logits, _ = lm.model.apply({"params": lm.params}, inputs,
                             lang_ids=jnp.full(inputs.shape, de, jnp.int32))
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  nats = -float(np.sum(np.asarray(logp)[np.arange(len(targets)), targets]))
  want = nats / math.log(2) / len(line.encode("utf-8"))
  got = evaluate.validation_metrics(lm)["val/bpb/de"]
  assert got == pytest.approx(want, rel=1e-4)

  # generation stops at the EOS id it is given: any id, here one that greedy decoding emits
  prompt = [vocab.encode("Die")]
  free = generate.generate_ids(lm.model, lm.params, prompt, de, max_len=12, eos_id=-1,
                               start_id=vocab.start_id)[0]
  assert len(free) == 12
  stop = free[5]
  out = generate.generate_ids(lm.model, lm.params, prompt, de, max_len=12, eos_id=stop,
                              start_id=vocab.start_id)[0]
  assert out == free[:free.index(stop)]
  # ... and generate() gives it the vocabulary's, and decodes with it
  ids_eos = generate.generate_ids(lm.model, lm.params, prompt, de, max_len=12,
                                  eos_id=vocab.eos_id, start_id=vocab.start_id)[0]
  text = generate.generate(lm.model, lm.params, vocab, ["Die"], de, max_len=12)[0]
  assert isinstance(text, str) and text == vocab.decode(ids_eos)
