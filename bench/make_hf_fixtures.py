"""Golden fixtures for xlingo.hf, computed by transformers itself (torch on CPU, float32).

  /work/venv-bench/bin/python bench/make_hf_fixtures.py [--out tests/fixtures/hf]
      [--gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf]

Needs the ``bench`` extra (torch, transformers). Writes, under ``--out``:

- ``<name>/``: a tiny random Hugging Face model per family (config.json, model.safetensors, a
  small byte-level BPE tokenizer.json + tokenizer_config.json trained on the embedded English
  text): ``llama`` (untied), ``llama_tied`` (tied, Llama 3 rope_scaling, bos 2), ``mistral``
  (GQA, rms eps 1e-5) and ``qwen2`` (q/k/v biases).
- ``<name>/reference.npz``: transformers' float32 logits on fixed rows (``unpacked_inputs``, BOS
  first), on a packed row (each segment run alone with its BOS, the logits concatenated: what
  a packed row must give), and greedy generation of 32 tokens (``greedy_prompt`` ->
  ``greedy_tokens``, EOS not special: the whole 32 are kept).
- ``smollm2_reference.npz`` (with ``--gguf``): transformers' logits for a few short texts on the
  GGUF (``from_pretrained(dir, gguf_file=...)``, dequantized to float32): all positions at a fixed
  subset of 512 vocabulary ids, the argmax over the full vocabulary, the token ids its own
  tokenizer gives (BOS first).

Everything is seeded: rerunning gives the same files (up to torch's CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|bos|>"]  # ids 0, 1 (EOS), 2 (BOS)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, bos_token_id=0, rope_theta=10000.0,
                   rms_norm_eps=1e-6)),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True, bos_token_id=2, rms_norm_eps=1e-5,
                        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=64))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(tie_word_embeddings=False, bos_token_id=2, rope_theta=1000000.0,
                     rms_norm_eps=1e-5, sliding_window=4096)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=False, bos_token_id=1, rope_theta=10000.0,
                   rms_norm_eps=1e-6, use_sliding_window=False)),
}
SEGMENTS = (7, 10, 7)  # one packed row of 24 positions
GREEDY_NEW = 32
GGUF_TEXTS = ("The quick brown fox jumps over the lazy dog.",
              "Debian is a free operating system.", "1 + 2 = 3, and 10 * 10 = 100")


def corpus_text() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(here, "..", "xlingo", "data", "corpus", "mono", "en.train.txt")
  with open(path, encoding="utf-8") as f:
    return f.read()


def make_tokenizer(text: str) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(text.splitlines(), trainer)
  if tok.get_vocab_size() != VOCAB:
    raise SystemExit(f"tokenizer has {tok.get_vocab_size()} pieces, want {VOCAB}")
  return tok


def write_tokenizer(tok: Tokenizer, out: str, bos_id: int) -> None:
  tok.save(os.path.join(out, "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[bos_id],
         "eos_token": SPECIALS[1], "pad_token": SPECIALS[0], "add_bos_token": False,
         "model_max_length": COMMON["max_position_embeddings"]}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=1)


@torch.no_grad()
def logits_of(model, rows: np.ndarray) -> np.ndarray:
  return model(torch.as_tensor(rows, dtype=torch.long)).logits.float().numpy()


def make_family(name: str, out_root: str, tok: Tokenizer) -> None:
  rng = np.random.default_rng(list(FAMILIES).index(name))
  config_cls, model_cls, extra = FAMILIES[name]
  torch.manual_seed(len(name))
  config = config_cls(**COMMON, **extra)
  model = model_cls(config).eval()
  if name == "qwen2":  # random biases: zero ones would prove nothing
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        torch.nn.init.normal_(proj.bias, std=0.5)
  # Larger norm scales than ones, so the norms are tested as well.
  for n, p in model.named_parameters():
    if n.endswith("norm.weight"):
      torch.nn.init.uniform_(p, 0.5, 1.5)
  out = os.path.join(out_root, name)
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out, safe_serialization=True)
  write_tokenizer(tok, out, extra["bos_token_id"])
  write_reference(model, out, extra["bos_token_id"], rng)
  print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")


def write_reference(model, out: str, bos: int, rng: np.random.Generator) -> None:
  """``out``/reference.npz: the model's logits (unpacked, packed) and greedy tokens."""
  body = rng.integers(3, VOCAB, size=(2, 23))
  unpacked = np.concatenate([np.full((2, 1), bos), body], axis=1)
  segs = [np.concatenate([[bos], rng.integers(3, VOCAB, size=n - 1)]) for n in SEGMENTS]
  packed_logits = np.concatenate([logits_of(model, s[None])[0] for s in segs], axis=0)
  prompt = np.concatenate([[bos], rng.integers(3, VOCAB, size=5)])[None]
  gen = model.generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=GREEDY_NEW,
                       min_new_tokens=0, eos_token_id=None, pad_token_id=0)
  np.savez_compressed(
      os.path.join(out, "reference.npz"), bos_id=bos, unpacked_inputs=unpacked,
      unpacked_logits=logits_of(model, unpacked), packed_inputs=np.concatenate(segs),
      packed_segment_lengths=np.asarray(SEGMENTS), packed_logits=packed_logits,
      greedy_prompt=prompt[0], greedy_tokens=gen[0, prompt.shape[1]:].numpy())


def make_gguf_reference(gguf_path: str, out_root: str) -> None:
  d, f = os.path.split(os.path.abspath(gguf_path))
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f,
                                                            dtype=torch.float32).eval()
  vocab_ids = np.random.default_rng(0).choice(model.config.vocab_size, 512, replace=False)
  vocab_ids.sort()
  rows, logits, argmax = [], [], []
  for text in GGUF_TEXTS:
    ids = [model.config.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    full = logits_of(model, np.asarray([ids]))[0]
    rows.append(np.asarray(ids))
    logits.append(full[:, vocab_ids])
    argmax.append(full.argmax(-1))
  lengths = np.asarray([len(r) for r in rows])
  np.savez_compressed(
      os.path.join(out_root, "smollm2_reference.npz"), texts=np.asarray(GGUF_TEXTS),
      lengths=lengths, token_ids=np.concatenate(rows), vocab_ids=vocab_ids,
      logits=np.concatenate(logits), argmax=np.concatenate(argmax),
      bos_id=model.config.bos_token_id, eos_id=model.config.eos_token_id)
  print(f"smollm2: bos {model.config.bos_token_id} eos {model.config.eos_token_id}, "
        f"{lengths.sum()} positions -> {out_root}/smollm2_reference.npz")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/fixtures/hf")
  ap.add_argument("--gguf", default="")
  ap.add_argument("--only", default="", help="comma-separated families (default: all)")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)
  tok = make_tokenizer(corpus_text())
  for name in FAMILIES:
    if not args.only or name in args.only.split(","):
      make_family(name, args.out, tok)
  if args.gguf:
    make_gguf_reference(args.gguf, args.out)


if __name__ == "__main__":
  main()
