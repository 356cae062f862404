"""A llama.cpp GGUF file as a Hugging Face model: its config, its tensors (dequantized to
float32 by the ``gguf`` package) and its byte-level BPE tokenizer as a ``tokenizer.json``.

llama.cpp's converter permutes the rows of each head of the q and k projections (its RoPE
rotates interleaved pairs, Hugging Face's rotates halves); ``unpermute`` puts them back, so the
tensors this source hands out are the Hugging Face ones. Quantized tensors are dequantized
whole (a GGUF is a small model's format) and kept, so every device's block comes from one pass.
"""

from __future__ import annotations

import json

import numpy as np

from xlingo import paths
from xlingo.errors import CheckpointError

# Hugging Face name (layer as {i}) -> GGUF name.
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
# Pre-tokenizers whose Hugging Face form is known: GGUF 'tokenizer.ggml.pre' -> split digits.
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


def _short(value) -> float:
  """A float32 field as the shortest decimal that reads back to it (GGUF stores 1e-5 as
  9.99999975e-06; configs write 1e-5, and init_from compares the two)."""
  return float(str(np.float32(value)))


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of llama.cpp's q/k row permutation (per head: interleaved pairs -> halves)."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufSource:
  """A GGUF file's config (``config``, shaped like a config.json), tensors and tokenizer."""

  def __init__(self, path: str):
    import gguf

    self.path = paths.resolve(path)
    if not paths.isfile(self.path):
      raise CheckpointError(f"--model {path!r} does not exist; give a .gguf file or a Hugging "
                            "Face model directory")
    try:
      self.reader = gguf.GGUFReader(paths.local_copy(self.path))
      self.fields = {k: f.contents() for k, f in self.reader.fields.items()}
    except Exception as e:  # noqa: BLE001 - whatever gguf raises on a torn or foreign file
      raise CheckpointError(f"{self.path} is not a readable GGUF file ({str(e)[:160]}); "
                            "download it again") from None
    self.tensors = {t.name: t for t in self.reader.tensors}
    self._cache: dict[str, np.ndarray] = {}
    arch = self.fields.get("general.architecture")
    if arch != "llama":
      raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                            "xlingo.hf imports GGUF files of the 'llama' architecture")
    if "rope_freqs.weight" in self.tensors or self.fields.get("llama.rope.scaling.type") not in (
        None, "none"):
      raise CheckpointError(f"{self.path}: RoPE scaling in a GGUF is not supported; import the "
                            "Hugging Face directory of this model instead")
    f = self.fields
    self.heads = int(f["llama.attention.head_count"])
    self.kv_heads = int(f.get("llama.attention.head_count_kv", self.heads))
    d = int(f["llama.embedding_length"])
    self.config = {
        "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": d,
        "intermediate_size": int(f["llama.feed_forward_length"]),
        "num_hidden_layers": int(f["llama.block_count"]), "num_attention_heads": self.heads,
        "num_key_value_heads": self.kv_heads,
        "head_dim": int(f.get("llama.rope.dimension_count", d // self.heads)),
        "rms_norm_eps": _short(f["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _short(f.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(f.get("llama.vocab_size", len(f["tokenizer.ggml.tokens"]))),
        "tie_word_embeddings": "output.weight" not in self.tensors,
        "max_position_embeddings": int(f.get("llama.context_length", 2048)),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id")}

  def file_of(self, name: str) -> str:
    return self.path

  def _gguf_name(self, name: str) -> tuple[str | None, int | None]:
    parts = name.split(".")
    layer = int(parts[2]) if name.startswith("model.layers.") else None
    template = ".".join(parts[:2] + ["{i}"] + parts[3:]) if layer is not None else name
    g = NAMES.get(template)
    return (g.format(i=layer) if g else None), layer

  def shape(self, name: str) -> tuple[int, ...] | None:
    g, _ = self._gguf_name(name)
    if g not in self.tensors:
      return None
    return tuple(int(n) for n in reversed(self.tensors[g].shape))  # GGUF lists dims inner first

  def read(self, name: str, index: tuple) -> np.ndarray:
    if name not in self._cache:
      import gguf

      g, _ = self._gguf_name(name)
      t = self.tensors[g]
      try:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
      except Exception as e:  # noqa: BLE001 - a truncated file's tensor data
        raise CheckpointError(f"{self.path}: tensor {g} cannot be read ({str(e)[:120]}); "
                              "download the file again") from None
      w = w.reshape(self.shape(name))
      if name.endswith("q_proj.weight"):
        w = unpermute(w, self.heads)
      elif name.endswith("k_proj.weight"):
        w = unpermute(w, self.kv_heads)
      self._cache[name] = w
    return self._cache[name][index]

  def tokenizer_files(self) -> dict[str, str]:
    """{file name: text}: a ``tokenizer.json`` (byte-level BPE built with the ``tokenizers``
    library from the GGUF's tokens and merges) and a ``tokenizer_config.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = self.fields
    if f.get("tokenizer.ggml.model") != "gpt2":
      raise CheckpointError(f"{self.path}: tokenizer model {f.get('tokenizer.ggml.model')!r} is "
                            "not supported (only byte-level BPE, 'gpt2'); import the Hugging Face "
                            "directory of this model instead")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
      raise CheckpointError(f"{self.path}: pre-tokenizer {pre!r} is not supported (known: "
                            f"{', '.join(PRE_TOKENIZERS)}); import the Hugging Face directory of "
                            "this model instead")
    tokens = list(f["tokenizer.ggml.tokens"])
    types = list(f.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's token type of special (control) tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])

    def name_of(key):
      i = f.get(f"tokenizer.ggml.{key}_token_id")
      return tokens[int(i)] if i is not None else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
              "model_max_length": self.config["max_position_embeddings"]}
    for key in ("bos", "eos", "unk"):
      if name_of(key) is not None:
        config[f"{key}_token"] = name_of(key)
    if name_of("padding") is not None:
      config["pad_token"] = name_of("padding")
    if f.get("tokenizer.chat_template"):
      config["chat_template"] = f["tokenizer.chat_template"]
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}
