"""``python -m xlingo.hf export``: an xlingo workdir -> a directory ``transformers`` loads.

Writes ``config.json`` (LlamaForCausalLM, or Qwen2ForCausalLM when the model has q/k/v
biases), ``model.safetensors``, ``generation_config.json`` and the tokenizer files of the
workdir's vocabulary (a grown tokenizer included). LoRA is merged into the kernels, or with
``peft=True`` kept as an adapter (``adapter/adapter_config.json`` +
``adapter/adapter_model.safetensors``) beside the base weights for ``peft.PeftModel``.

The chosen language's embedding row is folded into the token table: xlingo adds that row to
every token's embedding, so ``E'[v] = E[v] + lang[L]`` gives the same first residual stream
for every token. A tied model's output projection would change with the table, so then the
original table (times xlingo's tied scale) is written as an untied ``lm_head``. Bottleneck
adapters and prefixes have no Hugging Face equivalent and are refused. The directory is
written under a temporary name and renamed, so it is whole or absent.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from xlingo import paths
from xlingo.errors import ConfigError
from xlingo.hf import layout
from xlingo.model import peft as peft_lib
from xlingo.training import load as load_lib

# xlingo kernel (below a block) -> the Hugging Face module PEFT's LoRA targets.
LORA_MODULES = {"attn/query": "self_attn.q_proj", "attn/key": "self_attn.k_proj",
                "attn/value": "self_attn.v_proj", "attn/out": "self_attn.o_proj",
                "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}
NO_LANG = "none"


def _check_output(output: str) -> str:
  output = paths.resolve(output)
  if paths.exists(output) and (not paths.isdir(output) or paths.listdir(output)):
    raise ConfigError(f"--output {output} already exists and is not empty; give a new "
                      "directory (nothing was written)")
  return output


def _check_peft(meta: dict, want_peft: bool, where: str):
  spec = peft_lib.PeftSpec.from_meta(meta)
  if spec is not None and spec.without_lora() is not None:
    raise ConfigError(f"{where} holds bottleneck adapters or prefixes ({spec.without_lora()}), "
                      "which have no Hugging Face equivalent; export a full or LoRA adaptation")
  if want_peft and (spec is None or not spec.lora_rank):
    raise ConfigError(f"--peft: {where} has no LoRA factors; export without --peft")
  return spec


def _check_task_head(model_cfg, where: str) -> None:
  """A fine-tuned classifier's head (``model.task_classes``) has no place in a Llama-family
  causal LM: refuse rather than write the LM without it."""
  classes = int(model_cfg.get("task_classes", 0) or 0)
  if classes:
    raise ConfigError(f"{where} is a fine-tuned classifier (model.task_classes={classes}); its "
                      "head has no equivalent in a Hugging Face causal LM: export the LM it was "
                      "fine-tuned from, or fine-tune with finetune.head=verbalizer (an LM)")


def _language_row(params: dict, table, lang: str | None, where: str) -> np.ndarray | None:
  """The language-embedding row to fold in (None: nothing to add)."""
  rows = params.get("lang_embedding")
  if rows is None or lang == NO_LANG:
    return None
  if lang is None:
    if np.any(rows):
      raise ConfigError(f"{where} has trained language embeddings; pass --lang with one of "
                        f"{', '.join(table.codes)} (its row is folded into the token table), "
                        f"or --lang {NO_LANG}")
    return None
  if lang not in table.codes:
    raise ConfigError(f"--lang={lang} is not a language of {where} (it has "
                      f"{', '.join(table.codes)}, or {NO_LANG})")
  return rows[table.id(lang)]


def hf_tensors(params: dict, m, lang_row) -> tuple[dict, bool]:
  """({Hugging Face name: float32 array}, tied) for xlingo ``params`` (numpy, no LoRA)."""
  out = {}
  layers = int(m["num_layers"])
  for t in layout.tensors_for(m):
    for i in range(layers) if t.per_layer else [None]:
      x = load_lib.get_path(params, layout.xlingo_path(t, m, i))
      if t.per_layer and m["scan_layers"]:
        x = x[i]
      out[t.hf.format(i=i)] = np.ascontiguousarray(layout.to_hf(t.kind, x), np.float32)
  table = out["model.embed_tokens.weight"]
  tied = bool(m["tie_embeddings"])
  if lang_row is not None:
    out["model.embed_tokens.weight"] = table + lang_row[None, :].astype(np.float32)
  if tied and (lang_row is not None or m["tied_output_scale"] != "none"):
    # The output projection keeps the table as it was (and xlingo's scale): no longer tied.
    scale = float(m["d_model"]) ** -0.5 if m["tied_output_scale"] == "rsqrt_d" else 1.0
    out["lm_head.weight"] = np.ascontiguousarray(table * np.float32(scale))
    tied = False
  return out, tied


def lora_tensors(params: dict, spec, m) -> tuple[dict, list[str]]:
  """(PEFT adapter tensors, target module names) for xlingo's LoRA factors."""
  out, modules = {}, set()
  for path, module in LORA_MODULES.items():
    for i in range(int(m["num_layers"])):
      base = (f"blocks/layers/{path}" if m["scan_layers"] else f"blocks/layers_{i}/{path}")
      a = load_lib.get_path(params, base + peft_lib.LORA_A)
      if a is None:
        continue
      b = load_lib.get_path(params, base + peft_lib.LORA_B)
      if m["scan_layers"]:
        a, b = a[i], b[i]
      r = a.shape[-1]
      prefix = f"base_model.model.model.layers.{i}.{module}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T, np.float32)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T, np.float32)
      modules.add(module.split(".")[-1])
  return out, sorted(modules)


def _tokenizer_files(vocab_path: str) -> tuple[dict[str, bytes], dict]:
  """({file name: bytes}, tokenizer_config) for the workdir's vocabulary."""
  if vocab_path.endswith(".json"):
    files = {"tokenizer.json": paths.read_bytes(vocab_path)}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      p = paths.join(paths.dirname(vocab_path), name)
      if paths.exists(p):
        files[name] = paths.read_bytes(p)
    tok_cfg = json.loads(files.get("tokenizer_config.json", b"{}"))
    tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    files["tokenizer_config.json"] = json.dumps(tok_cfg, indent=1).encode()
    return files, tok_cfg
  # A SentencePiece model (xlingo's own vocabularies: pad 0, eos 1, unk 2, no BOS).
  tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
             "add_eos_token": False, "legacy": False, "pad_token": "<pad>", "eos_token": "</s>",
             "unk_token": "<unk>", "bos_token": None}
  return {"tokenizer.model": paths.read_bytes(vocab_path),
          "tokenizer_config.json": json.dumps(tok_cfg, indent=1).encode()}, tok_cfg


def _eos_id(files: dict, tok_cfg: dict):
  eos = tok_cfg.get("eos_token")
  if isinstance(eos, dict):
    eos = eos.get("content")
  if "tokenizer.json" not in files:
    return 1  # xlingo's SentencePiece EOS
  if not eos:
    return None
  from tokenizers import Tokenizer

  return Tokenizer.from_str(files["tokenizer.json"].decode()).token_to_id(eos)


def export_model(workdir: str, output: str, *, lang: str | None = None, peft: bool = False,
                 max_positions: int = 0) -> str:
  """Writes the Hugging Face directory ``output`` for ``workdir``'s newest checkpoint."""
  from safetensors.numpy import save

  from xlingo import config as config_lib

  output = _check_output(output)
  step_dir, meta = load_lib.newest_meta(workdir, "--workdir")
  spec = _check_peft(meta, peft, step_dir)
  config = config_lib.base_config()
  config.model.dtype = "float32"
  lm = load_lib.load_model(config, workdir, what="--workdir")
  m = lm.config.model
  _check_task_head(m, step_dir)
  params = jax.tree.map(np.asarray, jax.device_get(lm.params))
  row = _language_row(params, lm.table, lang, step_dir)
  adapter = None
  if spec is not None and spec.lora_rank:
    if peft:
      adapter = lora_tensors(params, spec, m)
    params = jax.tree.map(np.asarray, peft_lib.merge_lora(params, spec)) if not peft else \
        _without_lora(params)
  tensors, tied = hf_tensors(params, m, row)
  files, tok_cfg = _tokenizer_files(lm.vocab_path)
  eos = _eos_id(files, tok_cfg)
  positions = max_positions or int(tok_cfg.get("model_max_length") or 0)
  positions = positions if 0 < positions < 10**9 else int(m.max_len)
  hf_cfg = layout.hf_config(m, tie=tied, eos_id=eos, max_positions=positions)
  gen_cfg = {"bos_token_id": int(m.bos_id), "eos_token_id": eos, "do_sample": False}

  tmp = paths.join(paths.dirname(output), f".{paths.basename(output)}.tmp-{os.getpid()}")
  if paths.exists(tmp):
    paths.rmtree(tmp)
  try:
    paths.write_bytes(paths.join(tmp, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    paths.write_text(paths.join(tmp, "config.json"), json.dumps(hf_cfg, indent=1))
    paths.write_text(paths.join(tmp, "generation_config.json"), json.dumps(gen_cfg, indent=1))
    for name, data in files.items():
      paths.write_bytes(paths.join(tmp, name), data)
    if adapter is not None:
      a_tensors, modules = adapter
      paths.write_bytes(paths.join(tmp, "adapter", "adapter_model.safetensors"),
                        save(a_tensors, metadata={"format": "pt"}))
      paths.write_text(paths.join(tmp, "adapter", "adapter_config.json"), json.dumps({
          "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.lora_rank,
          "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0, "bias": "none",
          "target_modules": modules, "fan_in_fan_out": False, "base_model_name_or_path": output,
          "inference_mode": True}, indent=1))
    if paths.exists(output):
      paths.rmtree(output)  # empty (checked above)
    paths.rename(tmp, output)
  except BaseException:
    if paths.exists(tmp):
      paths.rmtree(tmp)
    raise
  return output


def _without_lora(params: dict) -> dict:
  if not isinstance(params, dict):
    return params
  return {k: _without_lora(v) for k, v in params.items()
          if not k.endswith((peft_lib.LORA_A, peft_lib.LORA_B))}

