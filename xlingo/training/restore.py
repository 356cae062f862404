"""The one restore path: checkpoint metadata, finding step directories, restoring parameters.

Every restore reads a step directory that ``step_dirs`` names (a workdir's checkpoints newest
first, or one step directory: a run's step, ``best/``, a merged export) and tells two failures
apart: bytes that cannot be read (``Unreadable``: use the previous checkpoint) and a checkpoint
that does not fit the config (``CheckpointError``: stop, touch nothing). The checkpoint manager
(``checkpoints.Checkpoints``) resumes training through the same metadata and checks; tools
(generate, evaluate, a distillation teacher, adaptation's report, ``init_from``) restore
parameters through ``load_params``.

A step directory's ``meta/metadata`` (``checkpoint_meta``) holds the model's shape keys, the
language table, the vocabulary (path and SHA-1), the parameter-efficient parts the model carries
(``peft``: LoRA, adapters, prefixes; tools build the model with them), the settings that shape
the saved optimizer and data state, and the step.

``init_from`` may start a model that is larger than the checkpoint's in three ways, each filled
in here: appended languages (new language-embedding rows, fresh), an extended vocabulary (new
token rows and output columns, each the mean of the old rows of the pieces its text encodes to
under the old vocabulary), and parameter-efficient parameters the checkpoint lacks (fresh; a
LoRA checkpoint's factors are merged when the new model has none).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from xlingo import paths
from xlingo.data import vocab as xvocab
from xlingo.data import vocab_extend
from xlingo.errors import CheckpointError, ConfigError, VocabError
from xlingo.model import peft
from xlingo.training import state as state_lib

# The model keys that fix its parameter shapes (and tools read from a checkpoint's metadata).
MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "num_languages", "use_lang_emb", "tie_embeddings", "lid_head",
              "scan_layers")


def model_fingerprint(config) -> dict:
  """What must match for a state to be restored into this model."""
  m = config.model
  return {k: m[k] for k in MODEL_KEYS} | {
      "languages": list(config.data.languages), "vocab_sha1": vocab_sha1(config)}


# Parameters with a language axis (name -> axis): a checkpoint with fewer languages grows them.
LANGUAGE_AXES = {"lang_embedding": 0, "lid_kernel": 1, "lid_bias": 0}
# Parameters with a vocabulary axis (name -> axis): an extended vocabulary grows them.
VOCAB_AXES = {"token_embedding": 0, "output_kernel": 1}
# Fingerprint keys that may differ for init_from: languages may be appended, the vocabulary
# extended (checked piece by piece: ``vocab_extension``).
_GROWABLE = ("languages", "num_languages", "vocab_size", "vocab_sha1")


def vocab_sha1(config) -> str | None:
  """SHA-1 of the SentencePiece model file the config uses (None if it cannot be read)."""
  return _file_sha1(vocab_path(config))


@functools.lru_cache(maxsize=8)
def _file_sha1(path: str) -> str | None:
  try:
    return hashlib.sha1(paths.read_bytes(path)).hexdigest()
  except OSError:
    return None


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


def vocab_path(config) -> str:
  return paths.resolve(config.data.get("vocab_path", "") or xvocab.embedded_vocab_path())


def checkpoint_meta(config, step: int, restore_step: int | None = None) -> dict:
  """A training checkpoint's ``meta/``: the model fingerprint, where its vocabulary was, the
  parameter-efficient parts of the model, the settings that shape its saved state, its step
  (and the restore_step it descends from)."""
  spec = peft.spec_from_config(config)
  meta = model_fingerprint(config) | {"step": int(step), "vocab_path": vocab_path(config),
                                      "peft": spec.to_meta() if spec else None,
                                      "settings": state_settings(config)}
  if restore_step:
    meta["restore_step"] = int(restore_step)
  return meta


def export_meta(config, step: int | None) -> dict:
  """The ``meta/`` of exported plain parameters (no optimizer or data state to describe)."""
  meta = model_fingerprint(config) | {"vocab_path": vocab_path(config)}
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
  ck = paths.join(path, "checkpoints")
  ck = ck if paths.isdir(ck) else path
  if not paths.isdir(ck):
    raise ConfigError(f"{_named(what, path)} does not exist; give a workdir or a checkpoint "
                      "step directory")
  steps = sorted((s for s in ocp.utils.checkpoint_steps(ck) if paths.isdir(paths.join(ck, str(s)))),
                 reverse=True)
  if not steps:
    aside = [n for n in paths.listdir(ck) if ".unreadable-" in n]
    note = f" (only checkpoints set aside as unreadable: {', '.join(aside[:3])})" if aside else ""
    raise ConfigError(f"{_named(what, path)} holds no checkpoint{note}; train first "
                      "(python -m xlingo.train ...) or give a checkpoint step directory")
  return [(s, paths.join(ck, str(s))) for s in steps]


def _step_of(step_dir: str) -> int | None:
  """A step directory's step: its name, ``best/``'s ``step`` file, or its metadata."""
  name = paths.basename(step_dir)
  if name.isdigit():
    return int(name)
  try:
    if paths.exists(paths.join(step_dir, "step")):
      return int(paths.read_text(paths.join(step_dir, "step")).strip())
    step = read_meta(step_dir).get("step")
  except (Unreadable, OSError, ValueError):
    return None
  return int(step) if isinstance(step, int) else None


def newest_meta(path: str, what: str) -> tuple[str, dict]:
  """(step directory, metadata) of the newest checkpoint ``path`` names whose metadata reads."""
  for _, step_dir in step_dirs(path, what):
    try:
      return step_dir, read_meta(step_dir)
    except Unreadable as e:
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
        paths.join(parent, "checkpoints")) else []
  except ConfigError:  # no checkpoint beside it
    candidates = []
  for _, d in candidates:
    try:
      return {k: v for k, v in read_meta(d).items() if k not in ("step", "restore_step")}
    except Unreadable:
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
  ``data.vocab_path`` may extend its vocabulary (``vocab_extension``), and the target may hold
  parameter-efficient parameters (``xlingo.model.peft``) that the checkpoint lacks.
  ``init_fresh(keys) -> {key: array}`` gives freshly initialised parameters for the new
  languages' rows and the new parameter-efficient ones; everything else is loaded.
  """
  candidates = step_dirs(path, what)
  for i, (step, step_dir) in enumerate(candidates):
    try:
      meta = read_meta(step_dir) or _workdir_meta(step_dir)
      saved = {k[len("params/"):]: v for k, v in saved_shapes(paths.join(step_dir, "state")).items()
               if k.startswith("params/")}
      abstract = (abstract_params(step_dir, meta, saved) if callable(abstract_params)
                  else abstract_params)
      sources = None
      if config is not None and meta:
        sources = _check_init_from_meta(meta, config, f"{what} {step_dir}")
      params = _restore_params_at(step_dir, abstract, saved, meta, init_fresh, what, sources)
    except Unreadable as e:
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
  for name, axis in LANGUAGE_AXES.items():
    if name in abstract_params and name in saved:
      want, have = abstract_params[name].shape, saved[name]
      if len(want) == len(have) and have[axis] < want[axis] and (
          old_langs is None or have[axis] == old_langs):
        grow[name] = (axis, have)
  grow_vocab = {}  # name -> (axis, saved shape): new token rows / output columns
  for name, axis in VOCAB_AXES.items():
    if vocab_sources and name in abstract_params and name in saved:
      want, have = abstract_params[name].shape, saved[name]
      if len(want) == len(have) and have[axis] + len(vocab_sources) == want[axis]:
        grow_vocab[name] = (axis, have)
  for key, have in saved.items():
    want = _get_path(abstract_params, key)
    if (want is not None and key not in grow and key not in grow_vocab
        and tuple(want.shape) != tuple(have)):
      raise CheckpointError(
          f"{where}: parameter {key} has shape {tuple(have)} in the checkpoint but "
          f"{tuple(want.shape)} in this model; set model.* (or adapt.*) to match the checkpoint")
  missing = [k for k in tree_shapes(abstract_params) if k not in saved]
  fresh = [k for k in missing if peft.PEFT_PARAM.search(k)]
  missing = [k for k in missing if k not in fresh]
  if missing:
    raise CheckpointError(f"{where}: the checkpoint has no {', '.join(missing[:3])}; check that "
                          "model.* matches the checkpoint's model")
  if (grow or fresh) and init_fresh is None:
    raise CheckpointError(f"{where}: the checkpoint lacks {(list(grow) + fresh)[0]} (fewer "
                          "languages, or no adapters) and no initialiser was given for it")
  target = _without(abstract_params, set(grow) | set(grow_vocab) | set(fresh))
  params = _restore_tree(step_dir, {"params": target})["params"]
  new = init_fresh(list(grow) + fresh) if (grow or fresh) else {}
  for key in fresh:
    params = _with(params, key, new[key])

  def saved_part(name, have):
    full = abstract_params[name]
    sds = jax.ShapeDtypeStruct(have, full.dtype, sharding=full.sharding)
    return _restore_tree(step_dir, {"params": {name: sds}})["params"][name]

  for name, (axis, have) in grow.items():
    idx = [slice(None)] * len(have)
    idx[axis] = slice(have[axis], None)
    params[name] = jax.jit(lambda o, f, a=axis, i=tuple(idx): jax.numpy.concatenate(
        [o, f[i]], axis=a), out_shardings=abstract_params[name].sharding)(
            saved_part(name, have), new[name])
  for name, (axis, have) in grow_vocab.items():
    params[name] = _grow_vocab(saved_part(name, have), vocab_sources, axis,
                               abstract_params[name].sharding)
  return params


def _grow_vocab(old, sources: dict, axis: int, out_sharding):
  """``old`` with one row (``axis`` 0) or column (1) appended per new piece, in id order: the
  mean of the old rows of the pieces the new piece's text encodes to (``sources``)."""
  ids = sorted(sources)
  width = max(1, max(len(sources[i]) for i in ids))
  idx = np.zeros((len(ids), width), np.int32)
  weight = np.zeros((len(ids), width), np.float32)
  for r, i in enumerate(ids):
    src = sources[i]
    idx[r, :len(src)] = src
    weight[r, :len(src)] = 1.0 / len(src) if src else 0.0

  def grow(o):
    table = o if axis == 0 else o.T
    new = jax.numpy.einsum("nm,nmd->nd", weight, table[idx].astype(jax.numpy.float32))
    # A piece with no old pieces (none is known to occur) gets the mean of all old rows.
    empty = (weight.sum(1) == 0)[:, None]
    new = jax.numpy.where(empty, table.astype(jax.numpy.float32).mean(0), new)
    out = jax.numpy.concatenate([table, new.astype(table.dtype)], axis=0)
    return out if axis == 0 else out.T

  return jax.jit(grow, out_shardings=out_sharding)(old)


def vocab_extension(meta: dict, config, where: str) -> dict[int, list[int]] | None:
  """None when ``config`` uses the checkpoint's vocabulary; ``{new id: [old ids]}`` when its
  ``data.vocab_path`` extends it (the checkpoint's pieces first, piece by piece, then new ones,
  as ``python -m xlingo.data.vocab extend`` writes); CheckpointError for anything else."""
  have_sha, want_sha = meta.get("vocab_sha1"), vocab_sha1(config)
  old_size, new_size = meta.get("vocab_size"), int(config.model.vocab_size)
  if old_size == new_size and (not have_sha or not want_sha or have_sha == want_sha):
    return None
  if old_size == new_size:
    raise CheckpointError(
        f"{where}: the checkpoint was trained with a different vocabulary (SentencePiece model "
        f"SHA-1 {have_sha[:12]} vs {want_sha[:12]} of data.vocab_path); set data.vocab_path to "
        "the checkpoint's vocabulary (or to an extension of it, with model.vocab_size its size)")
  old = meta.get("vocab_path")
  if not (have_sha and old and isinstance(old_size, int)):
    raise CheckpointError(
        f"{where}: vocabulary size {old_size} differs from model.vocab_size={new_size} and the "
        "checkpoint does not record its vocabulary file; the checkpoint needs its own vocabulary")
  old_path = paths.resolve(old)
  if _file_sha1(old_path) != have_sha:
    raise CheckpointError(
        f"{where} was trained with {old} (SentencePiece SHA-1 {have_sha[:12]}), which is not on "
        "this machine; it is needed to check and initialise the extended data.vocab_path: copy "
        "it there")
  new_path = vocab_path(config)
  try:
    sources = vocab_extend.new_piece_init_sources(old_path, new_path)
  except VocabError:
    sources = None
  if not sources or old_size + len(sources) != new_size:
    raise CheckpointError(
        f"{where}: data.vocab_path={new_path} is neither the checkpoint's vocabulary {old} nor "
        f"an extension of it (its first {old_size} pieces, then new ones); use the "
        "checkpoint's vocabulary or a model written by `python -m xlingo.data.vocab extend "
        f"--vocab {old}` (with model.vocab_size set to its size)")
  return sources


def _check_init_from_meta(meta: dict, config, where: str) -> dict | None:
  """CheckpointError unless ``config``'s model can start from the checkpoint's; returns the
  vocabulary extension's sources (``vocab_extension``)."""
  sources = vocab_extension(meta, config, where)
  want = model_fingerprint(config)
  diff = {k: (meta[k], want[k]) for k in want
          if k in meta and k not in _GROWABLE and meta[k] != want[k]}
  if diff:
    first = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    raise CheckpointError(f"{where} is from a different model ({first}); set model.* to match "
                          "the checkpoint")
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


def saved_shapes(item_dir: str) -> dict[str, tuple]:
  """'params/blocks/...' -> shape of every array saved in a pytree item, from Orbax's metadata
  alone (no array is read); Unreadable when the metadata cannot be read."""
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(paths.as_path(item_dir))
    leaves = jax.tree_util.tree_leaves_with_path(getattr(md, "tree", md))
  except Exception as e:  # noqa: BLE001 - whatever Orbax raises on metadata it cannot parse
    raise Unreadable(f"state metadata {first_line(e)}") from None
  shapes = {_key(p): tuple(leaf.shape) for p, leaf in leaves
            if getattr(leaf, "shape", None) is not None}
  if not shapes:
    raise Unreadable("state metadata lists no arrays")
  return shapes


def tree_shapes(tree) -> dict[str, tuple]:
  return {_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


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


def _get_path(tree, key: str):
  for part in key.split("/"):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _restore_tree(step_dir: str, target):
  """The arrays of ``target`` (a subtree of the saved state); the caller has checked the
  structure, so a failure here is in the bytes (Unreadable)."""
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = ckptr.restore(
        paths.as_path(step_dir), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(_restore_arg, target),
            partial_restore=True)))
  except Exception as e:  # noqa: BLE001 - any read failure: the caller falls back or reports
    raise Unreadable(first_line(e)) from None
  return restored["state"]


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
