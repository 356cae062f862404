"""Load a trained model for the tools: parameters, model, vocabulary and language table.

``load_model(config, checkpoint)`` serves ``generate``, ``evaluate``, a distillation teacher,
adaptation's report and export, ``checkpoint.init_from`` and the demo's samples. It reads what it
can from the checkpoint's metadata (the model's shape keys, the language table, the vocabulary's
path and SHA-1) and takes the rest (dtype, max_len, mesh) from the config; it never builds the
training data plan or an optimizer, so it works on a machine that has the checkpoint and the
vocabulary but not the corpus. A workdir's newest readable checkpoint is used (one whose bytes
cannot be read is reported and the previous one is tried), through ``load_params``: the one
restore of parameters (``init_from``, the tools, a teacher, ``best/``, an export), which checks
the checkpoint's metadata with ``restore.py`` and reads its arrays with ``checkpoints.py``.

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
from flax import linen as nn

from xlingo import config as xconfig
from xlingo import paths, sharding
from xlingo.data import vocab_extend, vocab_facts, vocabulary
from xlingo.data.languages import LanguageTable
from xlingo.errors import CheckpointError, ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import layout
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
      languages, an extended vocabulary, adapters it lacks: ``load_params``), new
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

  r = load_params(checkpoint, abstract_for, config if grow else None,
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


def adopt_init_from_model(config) -> list[str]:
  """Takes the model's shape from ``checkpoint.init_from``'s metadata, as the tools take it
  from a checkpoint (in place, before the run builds its model); returns the keys taken.

  The rule: a shape key the config leaves at ``base_config``'s value says nothing, so the
  checkpoint's value is taken (a run pretrained with ``model.lid_head=True`` adapts with
  configs/adapt_tiny.py as it is); a key the config file or the command line set to something
  else is meant, and a checkpoint that disagrees stays the one-line error of the init_from
  check, naming the key. ``vocab_size`` and ``num_languages`` are the config's always: they
  may grow past the checkpoint's (an extended vocabulary, appended languages).
  """
  if not config.checkpoint.init_from:
    return []
  try:
    _, meta = newest_meta(config.checkpoint.init_from, "checkpoint.init_from")
  except (CheckpointError, ConfigError):
    # Nothing to take: the restore itself reports the unreadable init_from in its place, after
    # the config and data checks that need no checkpoint.
    return []
  base = xconfig.base_config().model
  taken = []
  for k in restore_lib.MODEL_KEYS:
    if k in restore_lib.GROWABLE or k not in meta or config.model[k] != base[k]:
      continue
    value = type(base[k])(meta[k])
    if value != config.model[k]:
      config.model[k] = value
      taken.append(k)
  return taken


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
  return ckpt_lib.export_params(out_dir, params, lm.config, lm.step)


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


# --- the one restore of parameters ---------------------------------------------------------


def _named(what: str, path: str) -> str:
  return f"{what} {path!r}" if what.startswith("--") else f"{what}={path!r}"


def step_dirs(path: str, what: str) -> list[tuple[int | None, str]]:
  """(step, step directory) that ``path`` names, newest first: itself when it is one (a run's
  step, ``best/``, a merged export), else the finalized steps of a workdir (or of its
  ``checkpoints/``). ``what`` is the flag or config key that gave ``path``, for the messages."""
  if not path:
    raise ConfigError(f"{what} is empty; give a workdir or a checkpoint step directory")
  path = paths.resolve(path)
  if paths.isdir(paths.join(path, "state")):
    return [(_step_of(path), path)]
  ck = paths.join(path, layout.CHECKPOINTS)
  ck = ck if paths.isdir(ck) else path
  if not paths.isdir(ck):
    raise ConfigError(f"{_named(what, path)} does not exist; give a workdir or a checkpoint "
                      "step directory")
  steps = sorted((s for s in ckpt_lib.step_numbers(ck) if paths.isdir(paths.join(ck, str(s)))),
                 reverse=True)
  if not steps:
    aside = [n for n in paths.listdir(ck) if ".unreadable-" in n]
    note = f" (only checkpoints set aside as unreadable: {', '.join(aside[:3])})" if aside else ""
    raise ConfigError(f"{_named(what, path)} holds no checkpoint{note}; train first "
                      "(python -m xlingo.train ...) or give a checkpoint step directory")
  return [(s, paths.join(ck, str(s))) for s in steps]


def _step_of(step_dir: str) -> int | None:
  """A step directory's step: its name, else its metadata's (``best/``, an export)."""
  name = paths.basename(step_dir)
  if name.isdigit():
    return int(name)
  try:
    step = restore_lib.read_meta(step_dir).get("step")
  except restore_lib.Unreadable:
    return None
  return int(step) if isinstance(step, int) else None


def newest_meta(path: str, what: str) -> tuple[str, dict]:
  """(step directory, metadata) of the newest checkpoint ``path`` names whose metadata reads."""
  for _, step_dir in step_dirs(path, what):
    try:
      return step_dir, restore_lib.read_meta(step_dir)
    except restore_lib.Unreadable as e:
      print(f"xlingo: checkpoint {step_dir} is unreadable ({e}); trying the previous one",
            flush=True)
  raise CheckpointError(f"{_named(what, path)}: no checkpoint with readable metadata; give "
                        "another checkpoint")


def _workdir_meta(step_dir: str) -> dict:
  """For a step directory without metadata inside a workdir (``WORKDIR/best``): the model
  and settings of the workdir's newest readable checkpoint (not its step)."""
  parent = paths.dirname(step_dir)
  try:
    candidates = step_dirs(parent, "the workdir") if paths.isdir(
        paths.join(parent, layout.CHECKPOINTS)) else []
  except ConfigError:  # no checkpoint beside it
    candidates = []
  for _, d in candidates:
    try:
      return {k: v for k, v in restore_lib.read_meta(d).items() if k not in ("step", "restore_step")}
    except restore_lib.Unreadable:
      continue
  return {}


@dataclasses.dataclass
class Restored:
  params: Any
  step: int | None
  step_dir: str
  meta: dict


def restore_params(path: str, abstract_params, config=None, init_fresh=None, *,
                   what: str = "checkpoint.init_from"):
  """Parameters only (``load_params``'s ``.params``)."""
  return load_params(path, abstract_params, config, init_fresh, what=what).params


def load_params(path: str, abstract_params, config=None, init_fresh=None, *,
                what: str = "checkpoint.init_from") -> Restored:
  """Parameters from a workdir or a step directory: the one restore of parameters (init_from,
  generate, evaluate, a teacher, adaptation's report, ``best/``, a merged export).

  ``abstract_params`` is the target tree, or a function ``(step_dir, meta, saved shapes) ->
  tree`` for a caller that builds its model from the checkpoint. A workdir's newest readable
  checkpoint is used: one whose bytes cannot be read is reported and the previous one is tried
  (and left as it is: a tool does not rename another run's files). With ``config``
  (``init_from``), the checkpoint's model must match ``config.model`` except where it may grow:
  ``config.data.languages`` may append languages to the checkpoint's (never reorder them),
  ``data.vocab_path`` may extend its vocabulary (``vocab_extend.extension_sources``), and the
  target may hold parameter-efficient parameters (``xlingo.model.peft``) that the checkpoint
  lacks.
  ``init_fresh(keys) -> {key: array}`` gives freshly initialised parameters for the new
  languages' rows and the new parameter-efficient ones; everything else is loaded.
  """
  candidates = step_dirs(path, what)
  for i, (step, step_dir) in enumerate(candidates):
    try:
      meta = restore_lib.read_meta(step_dir) or _workdir_meta(step_dir)
      saved = {k[len("params/"):]: v for k, v in ckpt_lib.saved_shapes(paths.join(step_dir, "state")).items()
               if k.startswith("params/")}
      abstract = (abstract_params(step_dir, meta, saved) if callable(abstract_params)
                  else abstract_params)
      sources = None
      if config is not None and meta:
        sources = restore_lib.check_init_from_meta(meta, config, f"{what} {step_dir}")
      params = _restore_params_at(step_dir, abstract, saved, meta, init_fresh, what, sources)
    except restore_lib.Unreadable as e:
      if i + 1 == len(candidates):
        older = "" if len(candidates) == 1 else " (and no older checkpoint reads)"
        raise CheckpointError(f"{_named(what, path)}: {step_dir} is unreadable ({e}){older}; give "
                              "another checkpoint") from None
      print(f"xlingo: checkpoint {step_dir} is unreadable ({e}); using {candidates[i + 1][1]} "
            "instead (left as it is)", flush=True)
      continue
    return Restored(params, step if step is not None else meta.get("step"), step_dir, meta)
  raise AssertionError("unreachable: step_dirs returns at least one candidate")


def _restore_params_at(step_dir: str, abstract_params, saved: dict, meta: dict, init_fresh,
                       what: str, vocab_sources: dict | None = None):
  where = f"{what} {step_dir}"
  old_langs = meta.get("num_languages")
  grow = {}  # name -> (axis, saved shape): new language rows
  for name, axis in restore_lib.LANGUAGE_AXES.items():
    if name in abstract_params and name in saved:
      want, have = abstract_params[name].shape, saved[name]
      if len(want) == len(have) and have[axis] < want[axis] and (
          old_langs is None or have[axis] == old_langs):
        grow[name] = (axis, have)
  grow_vocab = {}  # name -> (axis, saved shape): new token rows / output columns
  for name, axis in restore_lib.VOCAB_AXES.items():
    if vocab_sources and name in abstract_params and name in saved:
      want, have = abstract_params[name].shape, saved[name]
      if len(want) == len(have) and have[axis] + len(vocab_sources) == want[axis]:
        grow_vocab[name] = (axis, have)
  for key, have in saved.items():
    want = get_path(abstract_params, key)
    if (want is not None and key not in grow and key not in grow_vocab
        and tuple(want.shape) != tuple(have)):
      raise CheckpointError(
          f"{where}: parameter {key} has shape {tuple(have)} in the checkpoint but "
          f"{tuple(want.shape)} in this model; set model.* (or adapt.*) to match the checkpoint")
  missing = [k for k in restore_lib.tree_shapes(abstract_params) if k not in saved]
  fresh = [k for k in missing
           if peft.PEFT_PARAM.search(k) or decoder_lib.TASK_HEAD_PARAM.search(k)]
  missing = [k for k in missing if k not in fresh]
  if missing:
    raise CheckpointError(f"{where}: the checkpoint has no {', '.join(missing[:3])}; check that "
                          "model.* matches the checkpoint's model")
  if (grow or fresh) and init_fresh is None:
    raise CheckpointError(f"{where}: the checkpoint lacks {(list(grow) + fresh)[0]} (fewer "
                          "languages, or no adapters) and no initialiser was given for it")
  target = _without(abstract_params, set(grow) | set(grow_vocab) | set(fresh))
  params = ckpt_lib.restore_tree(step_dir, {"params": target})["params"]
  new = init_fresh(list(grow) + fresh) if (grow or fresh) else {}
  for key in fresh:
    params = _with(params, key, new[key])

  def saved_part(name, have):
    full = abstract_params[name]
    sds = jax.ShapeDtypeStruct(have, full.dtype, sharding=full.sharding)
    return ckpt_lib.restore_tree(step_dir, {"params": {name: sds}})["params"][name]

  for name, (axis, have) in grow.items():
    idx = [slice(None)] * len(have)
    idx[axis] = slice(have[axis], None)
    params[name] = jax.jit(lambda o, f, a=axis, i=tuple(idx): jax.numpy.concatenate(
        [o, f[i]], axis=a), out_shardings=abstract_params[name].sharding)(
            saved_part(name, have), new[name])
  for name, (axis, have) in grow_vocab.items():
    params[name] = vocab_extend.grow_rows(saved_part(name, have), vocab_sources, axis,
                                          abstract_params[name].sharding)
  return params


def _without(tree: dict, keys: set, prefix: str = "") -> dict:
  """``tree`` less the leaves at ``keys`` ('a/b/c' paths), empty branches dropped."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      sub = _without(v, keys, key + "/")
      if sub:
        out[k] = sub
    elif key not in keys:
      out[k] = v
  return out


def _with(tree: dict, key: str, value) -> dict:
  """A copy of ``tree`` with ``value`` at the path ``key``."""
  head, _, rest = key.partition("/")
  out = dict(tree)
  out[head] = _with(dict(out.get(head, {})), rest, value) if rest else value
  return out


def get_path(tree, key: str):
  """The subtree of a nested dict at the ``a/b/c`` path ``key``; None where it has none."""
  for part in key.split("/"):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree
