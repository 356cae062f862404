"""Orbax checkpoints: train state + data-iterator state + metadata in one step directory.

Layout of ``WORKDIR/checkpoints/<step>/``:
  state/   the TrainState (Orbax StandardSave: sharded, written collectively by every host)
  data/    each process's data-iterator state (``process_<i>/``), written by that process
  meta/    JSON: model config, vocabulary size, language table (checked on restore)

Resume order (``restore_or_init`` in the loop): the workdir's own latest checkpoint, then
``checkpoint.init_from`` (parameters only), then from scratch. A latest checkpoint that cannot
be read is reported and the previous one is used; nothing is ever deleted by a restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from xlingo import paths
from xlingo.errors import CheckpointError, ConfigError

# --- the data-iterator item ------------------------------------------------------------------


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an object with ``save(dir)``/``restore(dir)`` (a PackedIterator), per process.

  Every file goes through ``xlingo.paths``, so a ``gs://`` checkpoint holds its data state too.
  """

  def save(self, directory: epath.Path, args: DataIteratorSave):
    d = paths.join(os.fspath(directory), f"process_{jax.process_index()}")
    args.iterator.save(d)
    paths.write_text(paths.join(d, "layout.json"), json.dumps(
        {"num_processes": jax.process_count(),
         "replicated": bool(getattr(args.iterator, "replicated", False))}))

  def restore(self, directory: epath.Path, args: DataIteratorRestore):
    """This process's saved state; across a change of process count, see below.

    A replicated stream (``inputs.RowSlice``: every process packs the same global batches)
    has one state for all, so process 0's restores exactly under any process count. A
    file-sharded stream's states belong to their process count; with another count the
    iterator starts afresh and skips as many batches as were trained (not the same examples
    as an uninterrupted run, but no example is re-seen in order from the start).
    """
    base = os.fspath(directory)
    it = args.iterator
    own = paths.join(base, f"process_{jax.process_index()}")
    first = paths.join(base, "process_0")
    layout = _json_or_none(paths.join(first, "layout.json")) or {}
    same_count = layout.get("num_processes", jax.process_count()) == jax.process_count()
    if paths.isdir(own) and same_count:
      it.restore(own)
    elif layout.get("replicated") and getattr(it, "replicated", False):
      it.restore(first)
    elif paths.isdir(first):
      batches = int((_json_or_none(paths.join(first, "state.json")) or {}).get("batches", 0))
      if jax.process_index() == 0:
        print(f"xlingo: the data state in {directory} is from {layout.get('num_processes', '?')} "
              f"process(es), this run has {jax.process_count()}; skipping {batches} batches of "
              "a fresh data stream instead", flush=True)
      for _ in range(batches):
        next(it)
    else:
      raise CheckpointError(f"no data-iterator state in {directory}; move the checkpoint aside "
                            "or start a new workdir")
    return it


def _json_or_none(path: str) -> dict | None:
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# --- manager ----------------------------------------------------------------------------------


def model_fingerprint(config) -> dict:
  """What must match for a state to be restored into this model."""
  m = config.model
  return {k: m[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                            "head_dim", "mlp_dim", "num_languages", "use_lang_emb",
                            "tie_embeddings", "lid_head", "scan_layers")} | {
      "languages": list(config.data.languages), "vocab_sha1": vocab_sha1(config)}


class Checkpoints:
  """A thin layer over ``ocp.CheckpointManager`` with xlingo's items and checks."""

  def __init__(self, workdir: str, config, *, read_only: bool = False):
    # Absolute: Orbax's OCDBT writer rejects relative paths (in its background save thread, so
    # the error would surface only after the step was lost). Orbax writes gs:// itself.
    self.workdir = paths.resolve(workdir)
    self.directory = paths.join(self.workdir, "checkpoints")
    self._state_bytes: int | None = None
    self.config = config
    c = config.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep, enable_async_checkpointing=c.async_save and not read_only,
        create=not read_only, read_only=read_only)
    if jax.default_backend() == "cpu":
      # Replica-parallel saving slices each replicated array per replica, compiling one small
      # program per distinct shape (~9 s for a tiny model on 8 fake devices) for no gain on a
      # host whose devices share one disk.
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "meta"))
    _quiet_disk_full_logs()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, iterator=None, *, force: bool = False) -> bool:
    """Save ``step`` (asynchronously when configured). A full disk, here or in the previous
    asynchronous save, is one line naming the workdir and the space a checkpoint needs; Orbax
    removes old steps only after a save succeeded, so the previous checkpoint is kept."""
    if self._state_bytes is None:
      self._state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(model_fingerprint(self.config) | {"step": int(step)})}
    if iterator is not None:
      items["data"] = DataIteratorSave(iterator)
    with self._disk_full_is_one_line():
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  @contextlib.contextmanager
  def _disk_full_is_one_line(self):
    try:
      yield
    except Exception as e:
      if paths.is_disk_full(e):
        self._remove_partial_saves()
        raise disk_full_error(self.workdir, self._state_bytes) from None
      raise

  def _remove_partial_saves(self) -> None:
    """A save that ran out of space leaves Orbax's temporary step directory: no checkpoint, and
    it would keep the disk full (the workdir lock rules out another trainer's save here)."""
    if jax.process_index() != 0:
      return
    for name in paths.listdir(self.directory):
      if "orbax-checkpoint-tmp" in name:
        paths.rmtree(paths.join(self.directory, name))

  def read_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def check_compatible(self, step: int, source: str) -> None:
    meta = self.read_meta(step)
    want = model_fingerprint(self.config)
    diff = {k: (meta[k], want[k]) for k in want if k in meta and meta[k] != want[k]}
    if diff:
      first = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
      raise CheckpointError(
          f"{source} step {step} is from an incompatible model ({first}); use a workdir of its "
          "own for a new model, or set the config to match the checkpoint")

  def restore(self, step: int, abstract_state, iterator=None):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = DataIteratorRestore(iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def restore_latest(self, abstract_state, iterator=None) -> tuple[Any, int] | None:
    """The newest readable checkpoint, falling back to older ones with a message."""
    steps = self.all_steps()
    for step in reversed(steps):
      self.check_compatible(step, f"checkpoint {self.directory}")
      try:
        return self.restore(step, abstract_state, iterator), step
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means 'try the previous one'
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.warning("checkpoint step %d is unreadable (%s); trying the previous one",
                        step, msg[:300])
        aside = self._set_aside(step)
        print(f"xlingo: checkpoint step {step} in {self.directory} is unreadable ({msg[:200]}); "
              f"falling back to the previous checkpoint (kept the unreadable one as {aside})",
              flush=True)
    if steps:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps}); "
                            "move the directory aside to start from scratch")
    return None

  def _set_aside(self, step: int) -> str:
    """Rename an unreadable step so a resumed run can write that step again; nothing is lost."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
      os.replace(src, dst)
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("xlingo_set_aside")
    self.manager.reload()
    return os.path.basename(dst)

  def wait(self) -> None:
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()
    self.manager.close()


class _DropDiskFullRecords(logging.Filter):
  """Orbax logs a failed background save with its traceback (six chained ones for a full
  disk) before the error reaches the loop, which reports a full disk as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and paths.is_disk_full(exc))
                or "No space left on device" in record.getMessage())


def _quiet_disk_full_logs() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropDiskFullRecords) for f in absl_logger.filters):
    absl_logger.addFilter(_DropDiskFullRecords())


def disk_full_error(workdir: str, need_bytes: int | None = None) -> CheckpointError:
  """The one line for 'no space left on device' while a run writes to its workdir."""
  wd = paths.resolve(workdir)
  ck = paths.join(wd, "checkpoints")
  steps = sorted(int(n) for n in paths.listdir(ck) if n.isdigit())
  if steps:  # the state alone undercounts: the data state can be larger
    need_bytes = max(need_bytes or 0, paths.tree_size(paths.join(ck, str(steps[-1]))))
  free = paths.free_bytes(wd)
  mib = lambda b: f"{b / 2**20:,.0f} MiB"
  space = (f"a checkpoint of this run needs about {mib(need_bytes)}" if need_bytes
           else "a checkpoint needs more than that")
  free_txt = f"{mib(free)} free there" if free is not None else "the store is full"
  kept = (f"the last complete checkpoint (step {steps[-1]}) is kept" if steps
          else "no checkpoint had been saved yet")
  return CheckpointError(
      f"disk full while writing to --workdir {wd} ({free_txt}; {space}); {kept}. Free space "
      "(or copy the workdir to a larger disk) and run the same command again to resume")


# Parameters with a language axis (name -> axis): a checkpoint with fewer languages grows them.
LANGUAGE_AXES = {"lang_embedding": 0, "lid_kernel": 1, "lid_bias": 0}
# Fingerprint keys that may differ for init_from: languages may be appended.
_GROWABLE = ("languages", "num_languages")


def vocab_sha1(config) -> str | None:
  """SHA-1 of the SentencePiece model file the config uses (None if it cannot be read)."""
  from xlingo.data import vocab as xvocab

  path = config.data.get("vocab_path", "") or xvocab.embedded_vocab_path()
  return _file_sha1(paths.resolve(path))


@functools.lru_cache(maxsize=8)
def _file_sha1(path: str) -> str | None:
  try:
    return hashlib.sha1(paths.read_bytes(path)).hexdigest()
  except OSError:
    return None


def restore_params(path: str, abstract_params, config=None, init_fresh=None):
  """Parameters only from another run's checkpoint (``init_from``): a workdir or a step dir.

  The checkpoint's model must match ``config.model`` except for the number of languages:
  ``config.data.languages`` may append languages to the checkpoint's (never reorder them);
  the rows (or columns) of language-indexed parameters for the new languages then come from
  ``init_fresh(name)`` (a freshly initialised parameter) and everything else is loaded.
  """
  path = os.path.abspath(os.path.expanduser(path)) if "://" not in path else path
  step_dir = _resolve_step_dir(path)
  meta = _read_json(os.path.join(step_dir, "meta", "metadata"))
  old_langs = None
  if config is not None and meta:
    _check_init_from_meta(meta, config, step_dir)
    old_langs = meta.get("num_languages")
  saved = _saved_param_shapes(step_dir)
  grow = {}
  for name, axis in LANGUAGE_AXES.items():
    if name in abstract_params and name in saved:
      want, have = abstract_params[name].shape, saved[name]
      if len(want) == len(have) and have[axis] < want[axis] and (
          old_langs is None or have[axis] == old_langs):
        grow[name] = (axis, have)
  for key, have in saved.items():
    want = _get_path(abstract_params, key)
    if want is not None and key not in grow and tuple(want.shape) != tuple(have):
      raise CheckpointError(
          f"init_from {step_dir}: parameter {key} has shape {tuple(have)} in the checkpoint "
          f"but {tuple(want.shape)} in this model; set model.* to match the checkpoint")
  if grow and init_fresh is None:
    raise CheckpointError(f"init_from {step_dir}: the checkpoint has fewer languages than "
                          "model.num_languages and no initialiser was given for the new ones")
  target = {"params": {k: v for k, v in abstract_params.items() if k not in grow}}
  restored = _restore_tree(step_dir, target)
  params = dict(restored["params"])
  for name, (axis, have) in grow.items():
    full = abstract_params[name]
    old_sds = jax.ShapeDtypeStruct(have, full.dtype, sharding=full.sharding)
    old = _restore_tree(step_dir, {"params": {name: old_sds}})["params"][name]
    fresh = init_fresh(name)
    idx = [slice(None)] * len(full.shape)
    idx[axis] = slice(have[axis], None)
    params[name] = jax.jit(lambda o, f, a=axis, i=tuple(idx): jax.numpy.concatenate(
        [o, f[i]], axis=a), out_shardings=full.sharding)(old, fresh)
  return params


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _check_init_from_meta(meta: dict, config, step_dir: str) -> None:
  want = model_fingerprint(config)
  if meta.get("vocab_size") != want["vocab_size"]:
    raise CheckpointError(
        f"init_from {step_dir}: vocabulary size {meta.get('vocab_size')} differs from "
        f"model.vocab_size={want['vocab_size']}; the checkpoint needs its own vocabulary")
  if meta.get("vocab_sha1") and want.get("vocab_sha1") and meta["vocab_sha1"] != want[
      "vocab_sha1"]:
    raise CheckpointError(
        f"init_from {step_dir}: the checkpoint was trained with a different vocabulary "
        f"(SentencePiece model SHA-1 {meta['vocab_sha1'][:12]} vs {want['vocab_sha1'][:12]} of "
        "data.vocab_path); set data.vocab_path to the checkpoint's vocabulary")
  diff = {k: (meta[k], want[k]) for k in want
          if k in meta and k not in _GROWABLE and k != "vocab_sha1" and meta[k] != want[k]}
  if diff:
    first = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    raise CheckpointError(f"init_from {step_dir} is from a different model ({first}); set "
                          "model.* to match the checkpoint")
  old = list(meta.get("languages") or [])
  new = list(want["languages"])
  if old and new[:len(old)] != old:
    raise CheckpointError(
        f"init_from {step_dir}: data.languages={tuple(new)} must start with the checkpoint's "
        f"languages {tuple(old)} in that order (languages can only be appended: a language's "
        "index is its row of the language embedding)")
  if meta.get("num_languages", 0) > want["num_languages"]:
    raise CheckpointError(
        f"init_from {step_dir}: the checkpoint has num_languages={meta['num_languages']} but "
        f"model.num_languages={want['num_languages']}; it can grow, not shrink")


def _saved_param_shapes(step_dir: str) -> dict:
  """'a/b/c' -> shape of every saved parameter, from the checkpoint's metadata."""
  try:
    md = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    params = tree["params"]
  except Exception:  # noqa: BLE001 - shapes are a courtesy check; restore still validates
    return {}
  out = {}
  for p, leaf in jax.tree_util.tree_leaves_with_path(params):
    if hasattr(leaf, "shape") and leaf.shape is not None:
      out["/".join(str(getattr(k, "key", k)) for k in p)] = tuple(leaf.shape)
  return out


def _get_path(tree, key: str):
  for part in key.split("/"):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _restore_tree(step_dir: str, target):
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = ckptr.restore(
        step_dir, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(_restore_arg, target),
            partial_restore=True)))
  except (ValueError, KeyError) as e:
    raise CheckpointError(
        f"init_from {step_dir}: parameters do not match the model ({str(e).splitlines()[0]}); "
        "check that model.* matches the checkpoint's model") from None
  # partial_restore hands back the abstract leaf for a parameter the checkpoint lacks.
  missing = [_key(p) for p, x in jax.tree_util.tree_leaves_with_path(restored["state"])
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise CheckpointError(f"init_from {step_dir}: the checkpoint has no {', '.join(missing[:3])}; "
                          "check that model.* matches the checkpoint's model")
  return restored["state"]


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)


def _resolve_step_dir(path: str) -> str:
  if os.path.isdir(os.path.join(path, "state")):
    return path
  ck = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) \
      else path
  if not os.path.isdir(ck):
    raise ConfigError(f"checkpoint.init_from={path!r} does not exist; give a workdir or a "
                      "checkpoint step directory")
  steps = sorted(int(s) for s in os.listdir(ck) if s.isdigit())
  if not steps:
    raise ConfigError(f"checkpoint.init_from={path!r} holds no checkpoint")
  return os.path.join(ck, str(steps[-1]))
