"""What maps to what: a Hugging Face Llama-family config and tensors <-> xlingo's model section
and parameter tree.

One table (``TENSORS``) names each xlingo parameter, its Hugging Face tensor and the layout
change between them (``kind``); the importer reads it one way (a slice of the HF tensor for a
slice of the xlingo array), the exporter the other (whole arrays). Kinds:

- ``same``: identical layout (embeddings, norm scales).
- ``t``: transposed (HF's ``nn.Linear`` weight is [out, in]; xlingo's kernel is [in, out]).
- ``heads_in``: HF [heads * head_dim, d] -> xlingo [d, heads, head_dim] (q, k, v projections).
- ``heads_out``: HF [d, heads * head_dim] -> xlingo [heads, head_dim, d] (o projection).
- ``heads_bias``: HF [heads * head_dim] -> xlingo [heads, head_dim] (Qwen2's q/k/v biases).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xlingo.errors import CheckpointError

# architecture -> model_type written back on export.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}


@dataclasses.dataclass(frozen=True)
class Tensor:
  path: str  # xlingo parameter path below 'blocks/layers' (per layer) or at the top
  hf: str  # Hugging Face name; {i} is the layer
  kind: str
  per_layer: bool = True
  when: str = ""  # model key that must be true for the tensor to exist ('!key': false)


TENSORS = (
    Tensor("token_embedding", "model.embed_tokens.weight", "same", per_layer=False),
    Tensor("output_kernel", "lm_head.weight", "t", per_layer=False, when="!tie_embeddings"),
    Tensor("final_norm/scale", "model.norm.weight", "same", per_layer=False),
    Tensor("attn_norm/scale", "model.layers.{i}.input_layernorm.weight", "same"),
    Tensor("attn/query", "model.layers.{i}.self_attn.q_proj.weight", "heads_in"),
    Tensor("attn/key", "model.layers.{i}.self_attn.k_proj.weight", "heads_in"),
    Tensor("attn/value", "model.layers.{i}.self_attn.v_proj.weight", "heads_in"),
    Tensor("attn/query_bias", "model.layers.{i}.self_attn.q_proj.bias", "heads_bias",
           when="qkv_bias"),
    Tensor("attn/key_bias", "model.layers.{i}.self_attn.k_proj.bias", "heads_bias",
           when="qkv_bias"),
    Tensor("attn/value_bias", "model.layers.{i}.self_attn.v_proj.bias", "heads_bias",
           when="qkv_bias"),
    Tensor("attn/out", "model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
    Tensor("mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", "same"),
    Tensor("mlp/gate", "model.layers.{i}.mlp.gate_proj.weight", "t"),
    Tensor("mlp/up", "model.layers.{i}.mlp.up_proj.weight", "t"),
    Tensor("mlp/down", "model.layers.{i}.mlp.down_proj.weight", "t"),
)


def tensors_for(m) -> list[Tensor]:
  """The table's rows that exist for model section ``m``."""
  out = []
  for t in TENSORS:
    key = t.when.lstrip("!")
    if not key or bool(m[key]) != t.when.startswith("!"):
      out.append(t)
  return out


def xlingo_path(t: Tensor, m, layer: int | None = None) -> str:
  """The parameter's path in xlingo's tree (scanned: one stacked leaf for all layers)."""
  if not t.per_layer:
    return t.path
  return f"blocks/layers/{t.path}" if m["scan_layers"] else f"blocks/layers_{layer}/{t.path}"


def hf_shape(t: Tensor, m) -> tuple[int, ...]:
  d, n, k, h, f, v = (m["d_model"], m["num_heads"], m["num_kv_heads"], m["head_dim"],
                      m["mlp_dim"], m["vocab_size"])
  heads = {"attn/query": n, "attn/key": k, "attn/value": k, "attn/out": n,
           "attn/query_bias": n, "attn/key_bias": k, "attn/value_bias": k}.get(t.path)
  return {"token_embedding": (v, d), "output_kernel": (v, d), "final_norm/scale": (d,),
          "attn_norm/scale": (d,), "mlp_norm/scale": (d,), "attn/query": (n * h, d),
          "attn/key": (k * h, d), "attn/value": (k * h, d), "attn/out": (d, n * h),
          "mlp/gate": (f, d), "mlp/up": (f, d), "mlp/down": (d, f)}.get(
              t.path, (heads * h,) if heads else None)


# --- reading a slice ------------------------------------------------------------------------


def read_slice(kind: str, head_dim: int, index: tuple, read) -> np.ndarray:
  """The xlingo-layout block ``index`` (one slice per xlingo axis) of a tensor, reading only
  the rows/columns of the HF tensor it needs: ``read(hf_index)`` returns that part of the HF
  tensor."""
  h = head_dim
  if kind == "same":
    return read(index)
  if kind == "t":
    return read((index[1], index[0])).T
  if kind == "heads_in":  # [d, n, h] from [n*h, d]
    (d_sl, n_sl, h_sl) = index
    rows = slice(n_sl.start * h, n_sl.stop * h)
    block = read((rows, d_sl))
    return block.reshape(-1, h, block.shape[-1]).transpose(2, 0, 1)[:, :, h_sl]
  if kind == "heads_out":  # [n, h, d] from [d, n*h]
    (n_sl, h_sl, d_sl) = index
    block = read((d_sl, slice(n_sl.start * h, n_sl.stop * h)))
    return block.reshape(block.shape[0], -1, h).transpose(1, 2, 0)[:, h_sl, :]
  if kind == "heads_bias":  # [n, h] from [n*h]
    (n_sl, h_sl) = index
    return read((slice(n_sl.start * h, n_sl.stop * h),)).reshape(-1, h)[:, h_sl]
  raise ValueError(kind)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """A whole xlingo array in the HF layout (the inverse of ``read_slice``)."""
  if kind == "same":
    return x
  if kind == "t":
    return x.T
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":
    return x.reshape(-1, x.shape[-1]).T
  if kind == "heads_bias":
    return x.reshape(-1)
  raise ValueError(kind)


def concrete(index: tuple, shape: tuple) -> tuple:
  """``index`` with every slice's start and stop filled in (steps of 1)."""
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    if step != 1:
      raise ValueError(f"strided index {index}")
    out.append(slice(start, stop))
  return tuple(out)


# --- configs --------------------------------------------------------------------------------


def _rope(cfg: dict, where: str) -> tuple[float, tuple]:
  """(theta, xlingo rope_scaling) from a config.json: transformers 5's ``rope_parameters``
  or the older top-level ``rope_theta`` / ``rope_scaling``."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = cfg.get("rope_scaling") or {}
  theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  params = params or scaling
  kind = params.get("rope_type", params.get("type", "default"))
  if kind in ("default", None):
    return theta, ()
  if kind != "llama3":
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (xlingo computes "
                          "none or Llama 3's 'llama3'); use a model without it")
  return theta, (float(params["factor"]), float(params["low_freq_factor"]),
                 float(params["high_freq_factor"]),
                 float(params["original_max_position_embeddings"]))


def model_keys(cfg: dict, where: str, *, max_len: int) -> dict:
  """xlingo model keys for a Hugging Face config.json (a dict); CheckpointError, naming
  ``where`` and the fix, for what xlingo does not compute."""
  arch = list(cfg.get("architectures") or [])
  if len(arch) != 1 or arch[0] not in ARCHITECTURES:
    raise CheckpointError(f"{where}: architectures {arch} is not supported; xlingo.hf imports "
                          f"one of {', '.join(ARCHITECTURES)}")
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{where}: hidden_act={act!r}; xlingo's MLP is SwiGLU (silu), so "
                          "only such models import")
  if cfg.get("mlp_bias") or (arch[0] != "Qwen2ForCausalLM" and cfg.get("attention_bias")):
    raise CheckpointError(f"{where}: biases on the MLP or the attention output are not "
                          "supported (only Qwen2's q/k/v biases); use a model without them")
  window = cfg.get("sliding_window")
  if arch[0] == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window"):
    window = None
  if window is not None and int(window) < max_len:
    raise CheckpointError(f"{where}: sliding_window={window} is shorter than --max_len="
                          f"{max_len}, and xlingo attends over the whole row; import with "
                          f"--max_len {window} (and keep model.max_len <= {window})")
  n = int(cfg["num_attention_heads"])
  d = int(cfg["hidden_size"])
  theta, scaling = _rope(cfg, where)
  return dict(
      vocab_size=int(cfg["vocab_size"]), d_model=d, num_layers=int(cfg["num_hidden_layers"]),
      num_heads=n, num_kv_heads=int(cfg.get("num_key_value_heads") or n),
      head_dim=int(cfg.get("head_dim") or d // n), mlp_dim=int(cfg["intermediate_size"]),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta,
      rope_scaling=scaling, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      qkv_bias=arch[0] == "Qwen2ForCausalLM", tied_output_scale="none",
      bos_id=int(_first(cfg.get("bos_token_id")) or 0))


def _first(value):
  return value[0] if isinstance(value, list) else value


def hf_config(m, *, tie: bool, eos_id, max_positions: int) -> dict:
  """A config.json for model section ``m`` (exported tied only when ``tie``)."""
  arch = "Qwen2ForCausalLM" if m["qkv_bias"] else "LlamaForCausalLM"
  cfg = {
      "architectures": [arch], "model_type": ARCHITECTURES[arch], "hidden_act": "silu",
      "vocab_size": int(m["vocab_size"]), "hidden_size": int(m["d_model"]),
      "intermediate_size": int(m["mlp_dim"]), "num_hidden_layers": int(m["num_layers"]),
      "num_attention_heads": int(m["num_heads"]), "num_key_value_heads": int(m["num_kv_heads"]),
      "head_dim": int(m["head_dim"]), "rms_norm_eps": float(m["norm_eps"]),
      "max_position_embeddings": int(max_positions), "tie_word_embeddings": bool(tie),
      "bos_token_id": int(m["bos_id"]), "eos_token_id": eos_id, "dtype": "float32",
      "attention_bias": False, "mlp_bias": False, "use_cache": True}
  rope = {"rope_type": "default", "rope_theta": float(m["rope_theta"])}
  if m["rope_scaling"]:
    factor, low, high, original = m["rope_scaling"]
    rope |= {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
             "high_freq_factor": high, "original_max_position_embeddings": int(original)}
  cfg["rope_parameters"] = rope
  # transformers 4 reads these two top-level keys instead.
  cfg["rope_theta"] = rope["rope_theta"]
  if m["rope_scaling"]:
    cfg["rope_scaling"] = dict(rope)
  if m["qkv_bias"]:
    cfg |= {"use_sliding_window": False, "sliding_window": None}
  return cfg
