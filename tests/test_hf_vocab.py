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


@pytest.fixture(scope="module")
def el_bpe(bpe, tmp_path_factory):
  """``bpe`` with 64 Greek pieces appended (``vocab extend``); its report."""
  from xlingo.data import vocab_extend

  out = str(tmp_path_factory.mktemp("el") / "el")
  return vocab_extend.extend_vocab(bpe, {"el": [os.path.join(CORPUS, "new", "el.train.txt")]},
                                   64, out)


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
  # a tokenizer that puts a begin-of-text token first (Llama 3) starts every segment with it
  from tokenizers import Tokenizer, processors

  tok = Tokenizer.from_file(bpe)
  tok.add_special_tokens(["<|begin_of_text|>"])
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 512)])
  llama = vocab_lib.load_vocab(vocab_bpe.save(tok, os.path.dirname(bpe) + "/bot",
                                              bos="<|begin_of_text|>"))
  assert (llama.vocab_size, llama.bos_id, llama.start_id, llama.eos_id) == (513, 512, 512, 0)
  assert llama.piece_bytes()[512] == 0 and llama.encode("Köln") == vocab.encode("Köln")
  from xlingo.data import packing
  from xlingo.data.languages import LanguageTable

  examples = [{"targets": [5, 6, 0], "lang": "de"}, {"targets": [7, 0], "lang": "de"}]
  (b,) = packing.pack_examples(examples, LanguageTable(("de",)), 1, 8, start_id=llama.start_id)
  assert b["inputs"][0].tolist() == [512, 5, 6, 512, 7, 0, 0, 0]  # padding stays 0, masked
  assert b["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
  flat, lens = vocab.encode_flat(["Hallo", b"Welt"])
  assert lens.tolist() == [len(vocab.encode("Hallo")), len(vocab.encode("Welt"))]
  assert flat.tolist() == vocab.encode("Hallo") + vocab.encode("Welt")
  # seqio's TensorFlow side, and the parity report
  import tensorflow as tf

  assert vocab.encode_tf(tf.constant("Köln")).numpy().tolist() == vocab.encode("Köln")
  assert vocab.decode_tf(tf.constant(vocab.encode("Köln"))).numpy().decode() == "Köln"
  texts = {"de": _lines("de", "validation", 20), "ja": _lines("ja", "validation", 20)}
  rows = vocab_lib.parity_report(bpe, texts)
  assert [r["tokens"] for r in rows] == [sum(len(vocab.encode(t)) for t in texts[k])
                                         for k in ("de", "ja")]


def test_train_bpb_generate_and_grow(bpe, el_bpe, tmp_path):
  from xlingo import decode, evaluate, scoring
  from xlingo.training import loop
  from xlingo.training.load import load_model

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
  free = decode.generate_ids(lm.model, lm.params, prompt, de, max_len=12, eos_id=-1,
                               start_id=vocab.start_id)[0]
  assert len(free) == 12
  stop = free[5]
  out = decode.generate_ids(lm.model, lm.params, prompt, de, max_len=12, eos_id=stop,
                              start_id=vocab.start_id)[0]
  assert out == free[:free.index(stop)]
  # ... and generate() gives it the vocabulary's, and decodes with it
  ids_eos = decode.generate_ids(lm.model, lm.params, prompt, de, max_len=12,
                                  eos_id=vocab.eos_id, start_id=vocab.start_id)[0]
  text = decode.generate(lm.model, lm.params, vocab, ["Die"], de, max_len=12)[0]
  assert isinstance(text, str) and text == vocab.decode(ids_eos)
  # evaluate's translation scores decode with it too
  scores = scoring.translate_scores(lm, [("Good morning.", "Guten Morgen.")], "en", "de",
                                     max_examples=1, max_new=8)
  assert scores["examples"] == 1 and 0.0 <= scores["bleu"] <= 100.0
  assert isinstance(scores["samples"][0]["output"], str)

  # init_from with the extended tokenizer: old rows kept, new rows the mean of their sources
  from xlingo.data import vocab_extend

  cfg.data.vocab_path = el_bpe["model"]
  cfg.model.vocab_size = el_bpe["new_size"]
  grown = load_model(cfg, workdir, what="checkpoint.init_from", model_from="config")
  old_rows = np.asarray(jax.device_get(lm.params["token_embedding"]))
  new_rows = np.asarray(jax.device_get(grown.params["token_embedding"]))
  np.testing.assert_array_equal(new_rows[:512], old_rows)
  for i, src in vocab_extend.new_piece_init_sources(bpe, el_bpe["model"]).items():
    np.testing.assert_allclose(new_rows[i], old_rows[src].mean(0), rtol=1e-6, atol=1e-7)


def test_extend_keeps_old_ids_and_tokens(bpe, el_bpe):
  """A new script (Greek) appended to the BPE: old ids, old merges and the tokens of old text
  unchanged, Greek text shorter, each new piece initialised from the old pieces of its bytes."""
  from xlingo.data import vocab_extend, vocab_facts

  report = el_bpe
  assert (report["old_size"], report["added"], report["new_size"]) == (512, 64, 576)
  old, new = vocab_lib.load_vocab(bpe), vocab_lib.load_vocab(report["model"])
  assert new.vocab_size == 576 and new.eos_id == old.eos_id
  for text in _lines("de", "validation", 50) + _lines("ja", "validation", 50):
    assert new.encode(text) == old.encode(text)
  greek = vocab_lib.read_lines(os.path.join(CORPUS, "new", "el.validation.txt"))[:50]
  before = sum(len(old.encode(t)) for t in greek)
  after = sum(len(new.encode(t)) for t in greek)
  assert after < 0.8 * before
  for t in greek[:5]:
    assert new.decode(new.encode(t)) == t
    assert int(new.piece_bytes()[new.encode(t)].sum()) == len(t.encode("utf-8"))
  sources = vocab_extend.new_piece_init_sources(bpe, report["model"])
  assert sorted(sources) == list(range(512, 576))
  for i, src in sources.items():
    piece = new.tokenizer.id_to_token(i)
    assert all(s < 512 for s in src) and len(src) >= 2
    assert b"".join(vocab_facts.piece_to_bytes(old.tokenizer.id_to_token(s)) for s in src) == \
        vocab_facts.piece_to_bytes(piece)


def test_utf8_table_of_a_byte_level_vocabulary(bpe):
  """Byte-level BPE: every byte is a piece and pieces may hold part of a character; the UTF-8
  table follows the bytes, so the pieces of "語" chain from READY back to READY."""
  from xlingo import decode
  from xlingo.data import vocab_facts as v

  vocab = vocab_lib.load_vocab(bpe)
  table = decode.utf8_table(vocab, vocab.vocab_size)
  strings = vocab.piece_byte_strings()
  lone = [i for i, b in enumerate(strings) if len(b) == 1 and 0x80 <= b[0] <= 0xBF]
  assert lone and all(table[v.UTF8_READY, i] == v.UTF8_REJECT for i in lone)
  states = decode._utf8_walk(table, vocab.encode("語"))
  assert states[-1] == v.UTF8_READY and v.UTF8_REJECT not in states
  assert table[v.UTF8_NEED1, vocab.eos_id] == v.UTF8_REJECT
