"""Load a trained model for the tools: parameters, model, vocabulary and language table.

``load_model(config, checkpoint)`` serves ``generate``, ``evaluate``, a distillation teacher,
adaptation's report and export, ``checkpoint.init_from`` and the demo's samples. It reads what it
can from the checkpoint's metadata (the model's shape keys, the language table, the vocabulary's
path and SHA-1) and takes the rest (dtype, max_len, mesh) from the config; it never builds the
training data plan or an optimizer, so it works on a machine that has the checkpoint and the
vocabulary but not the corpus. A workdir's newest readable checkpoint is used (one whose bytes
cannot be read is reported and the previous one is tried), through the one restore path of
``xlingo.training.checkpoints``.

A LoRA-adapted checkpoint holds its factors beside the base weights; they are merged here
(``_plain_params``), so every caller gets plain Decoder parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from xlingo import paths, sharding
from xlingo.data import vocab as xvocab
from xlingo.data.languages import LanguageTable
from xlingo.errors import CheckpointError
from xlingo.model import decoder as decoder_lib
from xlingo.model import lora
from xlingo.training import restore as restore_lib


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: ``config`` is the caller's with the model section and
  ``data.languages`` (and ``data.vocab_path``) the checkpoint was trained with."""

  config: Any
  model: decoder_lib.Decoder
  params: Any
  vocab: Any
  vocab_path: str
  table: LanguageTable
  mesh: Any
  rules: Any
  step: int | None
  step_dir: str
  meta: dict

  @functools.cached_property
  def byte_table(self) -> jax.Array:
    """UTF-8 bytes per vocabulary piece (bits per byte)."""
    return jnp.asarray(xvocab.vocab_byte_lengths(self.vocab))


def load_model(config, checkpoint: str, *, what: str = "--workdir", mesh=None, rules=None,
               model_from: str = "checkpoint",
               model_config: Callable[[dict, str], Any] | None = None) -> LoadedModel:
  """The model in ``checkpoint`` (a workdir, a step directory, ``best/``, a merged export).

  Args:
    config: the caller's config (mesh, dtype, max_len, ...; the rest where the checkpoint's
      metadata is silent).
    checkpoint: the path; ``what`` is the flag or key that gave it, for the messages.
    mesh, rules: place the parameters there (default: from ``config.mesh``).
    model_from: ``"checkpoint"``: the model's shape keys and language table come from the
      metadata. ``"config"``: the model is ``config.model`` and the table
      ``config.data.languages``, which must match the checkpoint's except for appended languages,
      whose rows start fresh exactly as ``checkpoint.init_from`` starts them (the same seed).
    model_config: ``(meta, step_dir) -> model section`` instead of either (a teacher's).
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh) if rules is None else rules
  built: dict = {}

  def abstract_for(step_dir: str, meta: dict, saved: dict):
    cfg = _config_for(config, meta, step_dir, model_from, model_config)
    model = decoder_lib.Decoder(cfg.model)
    boxed = sharding.abstract_params(model, cfg.model, 8)
    lora_cfg = None
    if any(k.startswith(lora.KEY + "/") for k in saved):
      lora_cfg = _lora_config(config, meta, what)
      boxed = {**boxed, lora.KEY: lora.abstract_factors(boxed, lora_cfg)}
    shardings = sharding.param_shardings(boxed, mesh, rules)
    built.update(cfg=cfg, model=model, lora=lora_cfg, shardings=shardings)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(boxed), shardings)

  def init_fresh(name: str):
    model = built["model"]
    with sharding.mesh_context(mesh, rules):
      return jax.jit(lambda r: nn.unbox(sharding.init_variables(model, r, 8)["params"])[name],
                     out_shardings=built["shardings"][name])(
                         jax.random.PRNGKey(config.train.seed))

  grow = model_from == "config" and model_config is None
  r = restore_lib.load_params(checkpoint, abstract_for, config if grow else None,
                           init_fresh if grow else None, what=what)
  cfg = built["cfg"]
  path, vocab = _vocabulary(cfg, r.meta, f"{what} {r.step_dir}")
  cfg.data.vocab_path = "" if path == paths.resolve(xvocab.embedded_vocab_path()) else path
  return LoadedModel(config=cfg, model=built["model"], params=_plain_params(r.params, built["lora"]),
                     vocab=vocab, vocab_path=path, table=LanguageTable(cfg.data.languages),
                     mesh=mesh, rules=rules, step=r.step, step_dir=r.step_dir, meta=r.meta)


def _config_for(config, meta: dict, step_dir: str, model_from: str, model_config):
  """A copy of ``config`` with the model section and language table the restore targets."""
  if model_from not in ("checkpoint", "config"):
    raise ValueError(f"model_from={model_from!r}")
  cfg = ml_collections.ConfigDict(config.to_dict())
  if model_config is not None:
    cfg.model = ml_collections.ConfigDict(model_config(meta, step_dir).to_dict())
  elif model_from == "checkpoint":
    for k in restore_lib.MODEL_KEYS:
      if k in meta:
        cfg.model[k] = type(cfg.model[k])(meta[k])
    if meta.get("languages"):
      cfg.data.languages = tuple(meta["languages"])
  return cfg


def _lora_config(config, meta: dict, what: str):
  """The LoRA rank, scale and targets the checkpoint's factors were trained with."""
  s = meta.get("settings") or {}
  if "adapt.lora.rank" in s:
    return ml_collections.ConfigDict({"rank": s["adapt.lora.rank"], "alpha": s["adapt.lora.alpha"],
                                      "targets": s["adapt.lora.targets"]})
  if "adapt" in config:
    return config.adapt.lora
  raise CheckpointError(f"{what}: the checkpoint holds LoRA factors but its metadata does not "
                        "give their rank and scale; pass the adapt config it was trained with "
                        "(--config configs/adapt_*.py)")


def _plain_params(params, lora_cfg):
  """Plain Decoder parameters: LoRA factors merged into the kernels they adapt."""
  return params if lora_cfg is None else lora.merge(params, lora_cfg)


def _vocabulary(cfg, meta: dict, where: str):
  """(path, vocabulary) the checkpoint was trained with: ``data.vocab_path`` when set, else the
  path in its metadata, else the shipped one; checked against the recorded SHA-1."""
  want = meta.get("vocab_sha1")
  given = cfg.data.get("vocab_path", "")
  candidates = [given] if given else [meta.get("vocab_path"), xvocab.embedded_vocab_path()]
  for path in filter(None, candidates):
    path = paths.resolve(path)
    if not want or restore_lib._file_sha1(path) == want:
      vocab = xvocab.load_vocab(path)
      xvocab.check_vocab_matches(vocab, cfg.model.vocab_size)
      return path, vocab
  trained = meta.get("vocab_path") or "its vocabulary"
  if given:
    raise CheckpointError(f"{where}: data.vocab_path={given!r} is not the vocabulary the "
                          f"checkpoint was trained with (SHA-1 {want[:12]}, {trained}); set "
                          "data.vocab_path to that vocabulary")
  raise CheckpointError(f"{where} was trained with {trained} (SentencePiece SHA-1 {want[:12]}), "
                        "which is not on this machine; copy it here and pass "
                        "--config.data.vocab_path=COPY")
