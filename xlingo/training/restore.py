"""What a checkpoint says it is, and whether a config can use it: the metadata and its checks.

Every restore tells two failures apart: bytes that cannot be read (``Unreadable``: use the
previous checkpoint) and a checkpoint that does not fit the config (``CheckpointError``: stop,
touch nothing). The checkpoint manager (``checkpoints.Checkpoints``: resume) and the one
restore of parameters (``load.load_params``: tools, ``init_from``) check through the same
metadata and the same fingerprint comparison (``fingerprint_diff``). Orbax itself is
``checkpoints.py``'s alone.

A step directory's ``meta/metadata`` (``checkpoint_meta``) holds the model's shape keys, the
language table, the vocabulary (path and SHA-1), the parameter-efficient parts the model carries
(``peft``: LoRA, adapters, prefixes; tools build the model with them), the settings that shape
the saved optimizer and data state, and the step.

``init_from`` may start a model that is larger than the checkpoint's in three ways (checked
here, filled in by ``load.load_params``): appended languages (new language-embedding rows, fresh), an extended vocabulary (new
token rows and output columns, each the mean of the old rows of the pieces its text encodes to
under the old vocabulary), and parameter-efficient parameters the checkpoint lacks (fresh; a
LoRA checkpoint's factors are merged when the new model has none).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from xlingo import paths
from xlingo.data import vocab_extend, vocab_facts
from xlingo.errors import CheckpointError
from xlingo.model import peft
from xlingo.training import state as state_lib

# The model keys that fix its parameter shapes and the function they compute (tools read them
# from a checkpoint's metadata; a key a checkpoint predates takes the config's value).
MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "num_languages", "use_lang_emb", "tie_embeddings", "lid_head",
              "scan_layers", "rope_theta", "rope_scaling", "norm_eps", "qkv_bias",
              "tied_output_scale", "bos_id", "task_classes")


def model_fingerprint(config) -> dict:
  """What must match for a state to be restored into this model."""
  m = config.model
  # Tuples as lists: the form they take in the JSON metadata they are compared with.
  return {k: list(m[k]) if isinstance(m[k], tuple) else m[k] for k in MODEL_KEYS} | {
      "languages": list(config.data.languages),
      "vocab_sha1": vocab_facts.configured(config.data)[1]}


def fingerprint_diff(meta: dict, config, allowed=()) -> str:
  """The fingerprint keys where a checkpoint's metadata and ``config`` differ (leaving out
  ``allowed``, keys that may differ), as 'key: checkpoint A vs config B, ...'; '' when none."""
  want = model_fingerprint(config)
  return ", ".join(f"{k}: checkpoint {meta[k]} vs config {want[k]}" for k in want
                   if k in meta and k not in allowed and meta[k] != want[k])


# Parameters with a language axis (name -> axis): a checkpoint with fewer languages grows them.
LANGUAGE_AXES = {"lang_embedding": 0, "lid_kernel": 1, "lid_bias": 0}
# Parameters with a vocabulary axis (name -> axis): an extended vocabulary grows them.
VOCAB_AXES = {"token_embedding": 0, "output_kernel": 1}
# Fingerprint keys that may differ for init_from: languages may be appended, the vocabulary
# extended (checked piece by piece: ``vocab_extend.extension_sources``).
# A task head (model.task_classes, xlingo.finetune) may be added: its parameters start fresh.
GROWABLE = ("languages", "num_languages", "vocab_size", "vocab_sha1", "task_classes")


# --- restoring ------------------------------------------------------------------------------


class Unreadable(Exception):
  """A checkpoint's bytes cannot be read (internal: becomes a fallback or a CheckpointError)."""


def first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


# Config values that shape what a checkpoint holds besides the model (name -> what), so that a
# resume under another value cannot use it. train.grad_clip is not one: clipping on or off is
# carried over (``Checkpoints._state_target``); adapt.lora.alpha scales, it does not shape.
# Compared in this order: adapt.mode before train.trainable, which it overwrites (so the
# message names the key that resumes the run).
STATE_SHAPING = {
    "adapt.mode": "the parameters",
    "train.optimizer": "the optimizer state",
    "train.trainable": "the optimizer state",
    "adapt.lora.rank": "the LoRA factors",
    "adapt.lora.targets": "the LoRA factors",
    "adapt.adapter.bottleneck": "the adapters",
    "adapt.adapter.per_language": "the adapters",
    "adapt.prefix.length": "the prefixes",
    "train.batch_size": "the data iterator's saved batches",
    "data.seq_len": "the data iterator's saved batches",
    "data.group_size": "the data iterator's reader",
    "data.examples_per_read": "the data iterator's reader",
    "data.train_languages": "the data iterator's mixture",
    "data.translation_pairs": "the data iterator's mixture",
}


def state_settings(config) -> dict:
  """The values of ``STATE_SHAPING`` (and the LoRA scale tools need to merge) for a config."""
  t, d = config.train, config.data
  s = {"train.optimizer": t.optimizer, "train.trainable": t.trainable,
       "train.grad_clip": float(t.grad_clip), "train.batch_size": int(t.batch_size),
       "data.seq_len": int(d.seq_len), "data.group_size": int(d.group_size),
       "data.examples_per_read": int(d.examples_per_read),
       "data.train_languages": list(d.train_languages or d.languages),
       "data.translation_pairs": list(d.translation_pairs or ())}
  if "adapt" in config:
    a = config.adapt
    s |= {"adapt.mode": a.mode, "adapt.lora.rank": int(a.lora.rank),
          "adapt.lora.alpha": float(a.lora.alpha), "adapt.lora.targets": a.lora.targets,
          "adapt.adapter.bottleneck": int(a.adapter.bottleneck),
          "adapt.adapter.per_language": bool(a.adapter.per_language),
          "adapt.prefix.length": int(a.prefix.length)}
  return s


def settings_diff(saved: dict, config) -> tuple[str, Any, Any] | None:
  """The first state-shaping setting that differs: (key, saved value, config value)."""
  now = state_settings(config)
  grouped = saved.get("data.group_size") and now["data.group_size"]
  for key in STATE_SHAPING:
    if key not in saved or key not in now or (key == "data.examples_per_read" and not grouped):
      continue
    if saved[key] != now[key]:
      return key, saved[key], now[key]
  return None


def fmt_value(value) -> str:
  """A value as a --config override writes it."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, str) else str(value)


def checkpoint_meta(config, step: int, restore_step: int | None = None) -> dict:
  """A training checkpoint's ``meta/``: the model fingerprint, where its vocabulary was, the
  parameter-efficient parts of the model, the settings that shape its saved state, its step
  (and the restore_step it descends from)."""
  spec = peft.spec_from_config(config)
  meta = model_fingerprint(config) | {"step": int(step),
                                      "vocab_path": vocab_facts.configured(config.data)[0],
                                      "peft": spec.to_meta() if spec else None,
                                      "settings": state_settings(config),
                                      "dtypes": trained_dtypes(config)}
  if restore_step:
    meta["restore_step"] = int(restore_step)
  if "finetune" in config:  # how the task was read (xlingo.finetune, evaluate --task)
    meta["finetune"] = config.finetune.to_dict()
  return meta


def trained_dtypes(config) -> dict:
  """The dtypes a model was trained in (a checkpoint's ``dtypes``: what a teacher is compared
  with; not part of the fingerprint, since any dtype restores)."""
  return {"model.dtype": str(config.model.dtype), "model.param_dtype": str(config.model.param_dtype)}


def structural_changes(meta: dict, config) -> list[str]:
  """One line per way ``config``'s model grows the init_from checkpoint's (``meta``): the
  vocabulary rows old -> new and how the new ones start, the languages appended and their ids
  (``load_params`` does the growing); a line saying so when nothing grows."""
  lines = []
  old_v, new_v = meta.get("vocab_size"), int(config.model.vocab_size)
  if isinstance(old_v, int) and old_v != new_v:
    where = ("token embedding rows" if config.model.tie_embeddings
             else "token embedding rows and output kernel columns")
    lines.append(
        f"vocabulary: {old_v:,} -> {new_v:,} pieces (+{new_v - old_v:,}, "
        f"data.vocab_path={vocab_facts.configured(config.data)[0]}); the new {where} start at "
        "the mean of the checkpoint's rows for the old pieces each new piece's text encodes to")
  old_l, new_l = list(meta.get("languages") or ()), list(config.data.languages)
  added = new_l[len(old_l):] if old_l and new_l[:len(old_l)] == old_l else []
  if added:
    ids = ", ".join(f"{c} (id {len(old_l) + i})" for i, c in enumerate(added))
    lid = " and language-ID head rows" if config.model.lid_head else ""
    lines.append(f"languages: {', '.join(old_l)} + new {ids}; their language-embedding{lid} rows "
                 "start fresh from the model's initialiser")
  if not lines:
    lines.append(f"structure as in the checkpoint: {new_v:,} vocabulary pieces, languages "
                 f"{', '.join(new_l)}")
  return lines


def export_meta(config, step: int | None) -> dict:
  """The ``meta/`` of exported plain parameters (no optimizer or data state to describe)."""
  meta = model_fingerprint(config) | {"vocab_path": vocab_facts.configured(config.data)[0]}
  return meta if step is None else meta | {"step": int(step)}


def read_meta(step_dir: str) -> dict:
  """A step directory's ``meta/metadata`` ({} when it has none); Unreadable when torn."""
  path = paths.join(step_dir, "meta", "metadata")
  if not paths.exists(path):
    return {}
  try:
    meta = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise Unreadable(f"meta/metadata {first_line(e)}") from None
  if not isinstance(meta, dict):
    raise Unreadable("meta/metadata is not a JSON object")
  return meta


def check_init_from_meta(meta: dict, config, where: str) -> dict | None:
  """CheckpointError unless ``config``'s model can start from the checkpoint's; returns the
  vocabulary extension's sources (``vocab_extend.extension_sources``)."""
  sources = vocab_extend.extension_sources(meta, config, where)
  diff = fingerprint_diff(meta, config, allowed=GROWABLE)
  if diff:
    raise CheckpointError(f"{where} is from a different model ({diff}); set model.* to match "
                          "the checkpoint")
  want = model_fingerprint(config)
  old = list(meta.get("languages") or [])
  new = list(want["languages"])
  if old and new[:len(old)] != old:
    raise CheckpointError(
        f"{where}: data.languages={tuple(new)} must start with the checkpoint's "
        f"languages {tuple(old)} in that order (languages can only be appended: a language's "
        "index is its row of the language embedding)")
  if meta.get("num_languages", 0) > want["num_languages"]:
    raise CheckpointError(
        f"{where}: the checkpoint has num_languages={meta['num_languages']} but "
        f"model.num_languages={want['num_languages']}; it can grow, not shrink")
  return sources


def tree_shapes(tree) -> dict[str, tuple]:
  return {tree_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def structure_message(where: str, saved: dict, want: dict, init_from_hint: str) -> str:
  """One line naming the first array where a saved tree and the config's differ."""
  shape = sorted(k for k in set(saved) & set(want) if saved[k] != want[k])
  only_want, only_saved = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  if shape:
    key, detail = shape[0], f"{shape[0]} is {saved[shape[0]]} there, {want[shape[0]]} here"
  elif only_want:
    key, detail = only_want[0], f"this config has {only_want[0]}, the checkpoint has not"
  else:
    key, detail = only_saved[0], f"the checkpoint has {only_saved[0]}, this config has not"
  if key.startswith("opt_state"):
    cause, way_out = "another train.optimizer or train.trainable", f" or start a new --workdir " \
        f"with {init_from_hint} (its parameters, nothing else)"
  elif peft.PEFT_PARAM.search(key):
    cause, way_out = "another adapt.mode, adapt.lora.*, adapt.adapter.* or adapt.prefix.*", ""
  else:
    cause, way_out = "another model.*", ""
  return (f"{where} does not fit this config's train state ({detail}; was it saved with "
          f"{cause}?); resume with the config it was saved with{way_out}; nothing was changed")


def clip_toggled(abstract_state, config):
  """The abstract state under the other ``train.grad_clip`` setting (on <-> off), carrying this
  state's leaves (and shardings); None when the leaves do not pair up."""
  t = ml_collections.ConfigDict(config.train.to_dict())
  t.grad_clip = 0.0 if config.train.grad_clip else 1.0
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state.params)
  alt = jax.eval_shape(state_lib.make_optimizer(t).init,
                       state_lib.trained_params(plain, t.trainable))
  leaves = jax.tree.leaves(abstract_state.opt_state)
  if len(jax.tree.leaves(alt)) != len(leaves):
    return None
  return abstract_state.replace(opt_state=jax.tree.unflatten(jax.tree.structure(alt), leaves))


def tree_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


