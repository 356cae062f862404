"""Load a trained model for the tools: parameters, model, vocabulary and language table.

``load_model(config, checkpoint)`` serves ``generate``, ``evaluate``, a distillation teacher,
adaptation's report and export, ``checkpoint.init_from`` and the demo's samples. It reads what it
can from the checkpoint's metadata (the model's shape keys, the language table, the vocabulary's
path and SHA-1) and takes the rest (dtype, max_len, mesh) from the config; it never builds the
training data plan or an optimizer, so it works on a machine that has the checkpoint and the
vocabulary but not the corpus. A workdir's newest readable checkpoint is used (one whose bytes
cannot be read is reported and the previous one is tried), through the one restore path of
``xlingo.training.restore``.

An adaptation checkpoint's model is built as it trained: the metadata's ``peft`` (LoRA,
adapters, prefixes; ``xlingo.model.peft``) goes to the Decoder, whose side paths then run in
every tool exactly as in the run's own validation; appended languages and an extended vocabulary
are in the metadata's model keys. ``export_merged`` writes LoRA folded into the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import linen as nn

from xlingo import paths, sharding
from xlingo.data import vocab_facts, vocabulary
from xlingo.data.languages import LanguageTable
from xlingo.errors import CheckpointError, ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
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
    return jnp.asarray(vocab_facts.byte_lengths(self.vocab))


def load_model(config, checkpoint: str, *, what: str = "--workdir", mesh=None, rules=None,
               model_from: str = "checkpoint",
               model_config: Callable[[dict, str], Any] | None = None) -> LoadedModel:
  """The model in ``checkpoint`` (a workdir, a step directory, ``best/``, a merged export).

  Args:
    config: the caller's config (mesh, dtype, max_len, ...; the rest where the checkpoint's
      metadata is silent).
    checkpoint: the path; ``what`` is the flag or key that gave it, for the messages.
    mesh, rules: place the parameters there (default: from ``config.mesh``).
    model_from: ``"checkpoint"``: the model's shape keys, language table and parameter-
      efficient parts come from the metadata. ``"config"`` (``init_from``): the model is
      ``config.model`` with ``config.adapt``'s parts, the table ``config.data.languages`` and
      the vocabulary ``data.vocab_path``; they may extend the checkpoint's (appended
      languages, an extended vocabulary, adapters it lacks: ``restore.load_params``), new
      parameters starting fresh from ``train.seed`` exactly as a run from it starts them, and a
      checkpoint's LoRA factors are merged when the config's model has none.
    model_config: ``(meta, step_dir) -> model section`` instead of either (a teacher's).
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh) if rules is None else rules
  grow = model_from == "config" and model_config is None
  built: dict = {}

  def abstract_for(step_dir: str, meta: dict, saved: dict):
    cfg = _config_for(config, meta, step_dir, model_from, model_config)
    have = peft.PeftSpec.from_meta(meta)
    want = peft.spec_from_config(config) if grow else have
    spec = _restore_spec(want, have, f"{what} {step_dir}")
    model = decoder_lib.Decoder(cfg.model, spec)
    boxed = sharding.abstract_params(model, cfg.model, 8)
    shardings = sharding.param_shardings(boxed, mesh, rules)
    built.update(cfg=cfg, model=model, spec=spec, want=want, shardings=shardings)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(boxed), shardings)

  def init_fresh(keys: list[str]) -> dict:
    model = built["model"]
    shardings = {sharding.path_str(p): s for p, s in
                 jax.tree_util.tree_leaves_with_path(built["shardings"])}

    def pick(r):
      params = nn.unbox(sharding.init_variables(model, r, 8)["params"])
      flat = {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
      return {k: flat[k] for k in keys}  # XLA drops the rest of the initialisation

    with sharding.mesh_context(mesh, rules):
      return jax.jit(pick, out_shardings={k: shardings[k] for k in keys})(
          jax.random.PRNGKey(config.train.seed))

  r = restore_lib.load_params(checkpoint, abstract_for, config if grow else None,
                              init_fresh if grow else None, what=what)
  cfg, model, params = built["cfg"], built["model"], r.params
  if built["spec"] != built["want"]:  # a LoRA checkpoint, and a model without LoRA
    params = jax.jit(functools.partial(peft.merge_lora, spec=built["spec"]))(params)
    model = decoder_lib.Decoder(cfg.model, built["want"])
  if grow:  # the config's own vocabulary (load_params checked it against the checkpoint's)
    path, vocab = vocabulary.load_configured(config.data, cfg.model.vocab_size)
  else:
    path, vocab = vocabulary.recorded(cfg.data, r.meta, cfg.model.vocab_size,
                                      f"{what} {r.step_dir}")
  cfg.data.vocab_path = "" if path == paths.resolve(vocab_facts.embedded_path()) else path
  return LoadedModel(config=cfg, model=model, params=params, vocab=vocab, vocab_path=path,
                     table=LanguageTable(cfg.data.languages), mesh=mesh, rules=rules,
                     step=r.step, step_dir=r.step_dir, meta=r.meta)


def _restore_spec(want: peft.PeftSpec | None, have: peft.PeftSpec | None,
                  where: str) -> peft.PeftSpec | None:
  """The parameter-efficient parts to restore into: ``want``'s, plus the checkpoint's LoRA
  factors when ``want`` has none (they are merged afterwards). Adapters and prefixes cannot be
  merged into weights, so a checkpoint that has them needs a model that has them."""
  if have is None:
    return want
  keep = have.without_lora()
  if keep is not None and (want is None or want.without_lora() != keep):
    raise CheckpointError(
        f"{where} holds adapters or prefixes ({keep}), which cannot be folded into the "
        "weights; start from it with the same adapt.mode and adapt.adapter.*/adapt.prefix.*, "
        "or from the checkpoint it was adapted from")
  if not have.lora_rank or (want is not None and want.lora_rank):
    return want
  return dataclasses.replace(want or peft.PeftSpec(), lora_rank=have.lora_rank,
                             lora_alpha=have.lora_alpha, lora_targets=have.lora_targets)


def export_merged(lm: LoadedModel, out_dir: str) -> str:
  """Writes ``lm``'s parameters, LoRA folded into the kernels, as a step directory that
  ``checkpoint.init_from`` and every tool load as a plain model."""
  spec = lm.model.peft
  if spec is not None and spec.without_lora() is not None:
    raise ConfigError("adapt.export_merged: adapters and prefixes are not weights to merge "
                      "into; evaluate and generate load the adaptation workdir itself")
  params = lm.params if spec is None else jax.jit(
      functools.partial(peft.merge_lora, spec=spec))(lm.params)
  out_dir = paths.resolve(out_dir)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(paths.as_path(out_dir), args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}),
      meta=ocp.args.JsonSave(restore_lib.export_meta(lm.config, lm.step))), force=True)
  return out_dir


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
