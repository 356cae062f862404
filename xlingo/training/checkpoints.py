"""Orbax checkpoints: train state + data-iterator state + metadata in one step directory.

Layout of ``WORKDIR/checkpoints/<step>/``:
  state/   the TrainState (Orbax StandardSave: sharded, written collectively by every host)
  data/    each process's data-iterator state (``process_<i>/``), written by that process
  meta/    JSON (``checkpoint_meta``): the model's shape keys, language table and vocabulary
           (path and SHA-1), the settings that shape the saved optimizer and data state, the step

Resume order (the loop's ``run``): the workdir's own latest checkpoint (or
``checkpoint.restore_step``), then ``checkpoint.init_from`` (parameters only), then from
scratch. Tools (generate, evaluate, a distillation teacher, adaptation's report) restore
parameters through the same ``load_params``. What a restore does with a checkpoint it cannot
use:

- its bytes cannot be read (a torn array file, a torn ``meta/metadata``): training renames the
  step to ``<step>.unreadable-<time>`` and uses the previous one; a tool uses the previous one
  and leaves the directory as it is. Nothing is ever deleted by a restore.
- it does not fit the config (another model, ``train.optimizer``, ``train.batch_size``,
  ``data.group_size``, ...): a one-line error naming the key; nothing is touched.
- only set-aside checkpoints are left: training refuses rather than start from scratch.
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
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from xlingo import paths
from xlingo.errors import CheckpointError, ConfigError, XlingoError

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


# The model keys that fix its parameter shapes (and tools read from a checkpoint's metadata).
MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "num_languages", "use_lang_emb", "tie_embeddings", "lid_head",
              "scan_layers")


def model_fingerprint(config) -> dict:
  """What must match for a state to be restored into this model."""
  m = config.model
  return {k: m[k] for k in MODEL_KEYS} | {
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

  # The checkpoint.restore_step this run's checkpoints descend from (kept in their metadata,
  # so that the same command resumes the new line of checkpoints instead of restoring again).
  branched_from: int | None = None

  def save(self, step: int, state, iterator=None, *, force: bool = False) -> bool:
    """Save ``step`` (asynchronously when configured). A full disk, here or in the previous
    asynchronous save, is one line naming the workdir and the space a checkpoint needs; Orbax
    removes old steps only after a save succeeded, so the previous checkpoint is kept."""
    if self._state_bytes is None:
      self._state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(checkpoint_meta(self.config, step, self.branched_from))}
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

  def step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def check_compatible(self, step: int, meta: dict) -> None:
    """CheckpointError (nothing touched) when the checkpoint's model or the settings that
    shape its saved state differ from the config's."""
    want = model_fingerprint(self.config)
    diff = {k: (meta[k], want[k]) for k in want if k in meta and meta[k] != want[k]}
    if diff:
      first = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} is from an incompatible model ({first}); use "
          "a workdir of its own for a new model, or set the config to match the checkpoint")
    d = settings_diff(meta.get("settings") or {}, self.config)
    if d:
      key, old, new = d
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} was saved with {key}={_fmt(old)} but "
          f"this config has {_fmt(new)} (it shapes {STATE_SHAPING[key]}); resume with "
          f"--config.{key}={_fmt(old)}, or start a new --workdir with "
          f"--config.checkpoint.init_from={paths.dirname(self.directory)} (its parameters, "
          "nothing else); nothing was changed")

  def restore(self, step: int, abstract_state, iterator=None):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = DataIteratorRestore(iterator)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def restore_latest(self, abstract_state, iterator=None) -> tuple[Any, int] | None:
    """(state, step) to resume from, or None when the workdir has no checkpoint yet.

    The newest checkpoint, or ``checkpoint.restore_step``. A checkpoint whose bytes cannot be
    read (a torn file or a torn ``meta/metadata``) is set aside (renamed, never deleted) and the
    previous one is used; one that does not fit the config is a one-line error that touches
    nothing. With only set-aside checkpoints left the run refuses instead of starting over.
    """
    steps = self.all_steps()
    want = int(self.config.checkpoint.get("restore_step", 0) or 0)
    if want and steps and not self._continues_branch(steps, want):
      return self._restore_named(want, steps, abstract_state, iterator)
    for step in reversed(steps):
      try:
        return self._restore_step(step, abstract_state, iterator), step
      except Unreadable as e:
        logging.warning("checkpoint step %d is unreadable (%s); trying the previous one", step, e)
        aside = self._move_aside(step, "unreadable")
        print(f"xlingo: checkpoint step {step} in {self.directory} is unreadable ({e}); "
              f"falling back to the previous checkpoint (kept the unreadable one as {aside})",
              flush=True)
    self._refuse_if_set_aside()
    if want:
      raise CheckpointError(f"checkpoint.restore_step={want} but {self.directory} holds no "
                            "checkpoint; set it to 0 (the latest) or drop it")
    return None

  def _restore_step(self, step: int, abstract_state, iterator):
    """One step's state; Unreadable when its bytes cannot be read, CheckpointError (or the
    data layer's own error) when it does not fit this config."""
    step_dir = self.step_dir(step)
    meta = read_meta(step_dir)
    self.check_compatible(step, meta)
    target, convert = self._state_target(step, paths.join(step_dir, "state"), abstract_state)
    try:
      state = self.restore(step, target, iterator)
    except XlingoError:
      raise
    except Exception as e:  # noqa: BLE001 - the structure fits the config, so the bytes are bad
      raise Unreadable(_first_line(e)) from None
    self.branched_from = meta.get("restore_step")
    return convert(state) if convert else state

  def _state_target(self, step: int, state_dir: str, abstract_state):
    """(abstract state to restore into, converter to this config's layout or None).

    The saved tree is compared with the config's before any array is read, so a config that
    does not fit is reported as such (and nothing is set aside). Clipping on <-> off
    (``train.grad_clip``) is carried over: the clip keeps no state, so the saved arrays are the
    same in the same order, only nested differently.
    """
    saved = _saved_shapes(state_dir)
    want = _shapes(abstract_state)
    if saved == want:
      return abstract_state, None
    alt = _clip_toggled(abstract_state, self.config)
    if alt is not None and _shapes(alt) == saved:
      treedef = jax.tree.structure(abstract_state.opt_state)
      return alt, lambda s: s.replace(opt_state=jax.tree.unflatten(
          treedef, jax.tree.leaves(s.opt_state)))
    raise CheckpointError(_structure_message(
        f"checkpoint step {step} in {self.directory}", saved, want,
        f"--config.checkpoint.init_from={paths.dirname(self.directory)}"))

  def _continues_branch(self, steps: list[int], want: int) -> bool:
    """True when the newest readable checkpoint after ``want`` was saved by a run that
    restored ``want`` (the same command run again resumes it, not ``want``)."""
    for step in reversed(steps):
      if step <= want:
        return False
      try:
        return read_meta(self.step_dir(step)).get("restore_step") == want
      except Unreadable:
        continue
    return False

  def _restore_named(self, want: int, steps: list[int], abstract_state, iterator):
    """``checkpoint.restore_step``: that step exactly (no fallback); the later steps are moved
    aside (renamed ``<step>.superseded-<time>``) so that this run can write them again."""
    if want not in steps:
      raise CheckpointError(f"checkpoint.restore_step={want} is not a checkpoint in "
                            f"{self.directory} (steps {', '.join(map(str, steps))}); choose one "
                            "of them, or 0 for the latest")
    try:
      state = self._restore_step(want, abstract_state, iterator)
    except Unreadable as e:
      raise CheckpointError(f"checkpoint step {want} in {self.directory} is unreadable ({e}); "
                            f"choose another checkpoint.restore_step (steps "
                            f"{', '.join(map(str, steps))})") from None
    moved = [self._move_aside(s, "superseded") for s in steps if s > want]
    self.branched_from = want
    if moved:
      print(f"xlingo: restored step {want} (checkpoint.restore_step); the later checkpoints are "
            f"kept aside as {', '.join(moved)}", flush=True)
    return state, want

  def _move_aside(self, step: int, why: str) -> str:
    """Rename a step directory so that a resumed run can write that step again; nothing is
    lost."""
    src = self.step_dir(step)
    dst = f"{src}.{why}-{int(time.time())}"
    if jax.process_index() == 0:
      paths.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"xlingo_move_aside_{step}")
    self.manager.reload()
    return paths.basename(dst)

  def _refuse_if_set_aside(self) -> None:
    """No readable checkpoint left but set-aside ones: refuse rather than start from scratch
    over them. Starting over is a deliberate act: moving them out of the directory (one act,
    which cannot linger in a command line and start a later run from scratch too)."""
    aside = [n for n in paths.listdir(self.directory) if ".unreadable-" in n]
    if aside:
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: {', '.join(aside[:4])}"
          f"{' ...' if len(aside) > 4 else ''} were set aside as unreadable; if they are fine "
          "after all (a storage error), rename them back to their step numbers; to start from "
          f"scratch on purpose, move them out of {self.directory} or use a new --workdir")

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


# --- the one restore path ---------------------------------------------------------------------
#
# Every restore reads a step directory that ``step_dirs`` names (a workdir's checkpoints newest
# first, or one step directory: a run's step, ``best/``, a merged export) and tells two
# failures apart: bytes that cannot be read (``Unreadable``: use the previous checkpoint) and a
# checkpoint that does not fit (``CheckpointError``: stop, touch nothing).


class Unreadable(Exception):
  """A checkpoint's bytes cannot be read (internal: becomes a fallback or a CheckpointError)."""


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


# Config values that shape what a checkpoint holds besides the model (name -> what), so that a
# resume under another value cannot use it. train.grad_clip is not one: clipping on or off is
# carried over (``Checkpoints._state_target``); adapt.lora.alpha scales, it does not shape.
STATE_SHAPING = {
    "train.optimizer": "the optimizer state",
    "train.trainable": "the optimizer state",
    "adapt.mode": "the parameters",
    "adapt.lora.rank": "the LoRA factors",
    "adapt.lora.targets": "the LoRA factors",
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
          "adapt.lora.alpha": float(a.lora.alpha), "adapt.lora.targets": a.lora.targets}
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


def _fmt(value) -> str:
  """A value as a --config override writes it."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, str) else str(value)


def vocab_path(config) -> str:
  from xlingo.data import vocab as xvocab

  return paths.resolve(config.data.get("vocab_path", "") or xvocab.embedded_vocab_path())


def checkpoint_meta(config, step: int, restore_step: int | None = None) -> dict:
  """A training checkpoint's ``meta/``: the model fingerprint, where its vocabulary was, the
  settings that shape its saved state, its step (and the restore_step it descends from)."""
  meta = model_fingerprint(config) | {"step": int(step), "vocab_path": vocab_path(config),
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
    raise Unreadable(f"meta/metadata {_first_line(e)}") from None
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
  tree`` for a caller that builds its model from the checkpoint. A workdir's newest readable checkpoint is
  used: one whose bytes cannot be read is reported and the previous one is tried (and left as it
  is: a tool does not rename another run's files). With ``config``, the checkpoint's model must
  match ``config.model`` except for the number of languages: ``config.data.languages`` may
  append languages to the checkpoint's (never reorder them); the rows (or columns) of
  language-indexed parameters for the new languages then come from ``init_fresh(name)`` (a
  freshly initialised parameter) and everything else is loaded.
  """
  candidates = step_dirs(path, what)
  for i, (step, step_dir) in enumerate(candidates):
    try:
      meta = read_meta(step_dir) or _workdir_meta(step_dir)
      saved = {k[len("params/"):]: v for k, v in _saved_shapes(paths.join(step_dir, "state")).items()
               if k.startswith("params/")}
      abstract = (abstract_params(step_dir, meta, saved) if callable(abstract_params)
                  else abstract_params)
      if config is not None and meta:
        _check_init_from_meta(meta, config, f"{what} {step_dir}")
      params = _restore_params_at(step_dir, abstract, saved, meta, init_fresh, what)
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
                       what: str):
  where = f"{what} {step_dir}"
  old_langs = meta.get("num_languages")
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
          f"{where}: parameter {key} has shape {tuple(have)} in the checkpoint but "
          f"{tuple(want.shape)} in this model; set model.* to match the checkpoint")
  missing = [k for k in _shapes(abstract_params) if k not in saved]
  if missing:
    raise CheckpointError(f"{where}: the checkpoint has no {', '.join(missing[:3])}; check that "
                          "model.* matches the checkpoint's model")
  if grow and init_fresh is None:
    raise CheckpointError(f"{where}: the checkpoint has fewer languages than "
                          "model.num_languages and no initialiser was given for the new ones")
  target = {"params": {k: v for k, v in abstract_params.items() if k not in grow}}
  params = dict(_restore_tree(step_dir, target)["params"])
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


def _check_init_from_meta(meta: dict, config, where: str) -> None:
  want = model_fingerprint(config)
  if meta.get("vocab_size") != want["vocab_size"]:
    raise CheckpointError(
        f"{where}: vocabulary size {meta.get('vocab_size')} differs from "
        f"model.vocab_size={want['vocab_size']}; the checkpoint needs its own vocabulary")
  if meta.get("vocab_sha1") and want.get("vocab_sha1") and meta["vocab_sha1"] != want[
      "vocab_sha1"]:
    raise CheckpointError(
        f"{where}: the checkpoint was trained with a different vocabulary "
        f"(SentencePiece model SHA-1 {meta['vocab_sha1'][:12]} vs {want['vocab_sha1'][:12]} of "
        "data.vocab_path); set data.vocab_path to the checkpoint's vocabulary")
  diff = {k: (meta[k], want[k]) for k in want
          if k in meta and k not in _GROWABLE and k != "vocab_sha1" and meta[k] != want[k]}
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


def _saved_shapes(item_dir: str) -> dict[str, tuple]:
  """'params/blocks/...' -> shape of every array saved in a pytree item, from Orbax's metadata
  alone (no array is read); Unreadable when the metadata cannot be read."""
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(paths.as_path(item_dir))
    leaves = jax.tree_util.tree_leaves_with_path(getattr(md, "tree", md))
  except Exception as e:  # noqa: BLE001 - whatever Orbax raises on metadata it cannot parse
    raise Unreadable(f"state metadata {_first_line(e)}") from None
  shapes = {_key(p): tuple(leaf.shape) for p, leaf in leaves
            if getattr(leaf, "shape", None) is not None}
  if not shapes:
    raise Unreadable("state metadata lists no arrays")
  return shapes


def _shapes(tree) -> dict[str, tuple]:
  return {_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _structure_message(where: str, saved: dict, want: dict, init_from_hint: str) -> str:
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
  elif key.startswith("params/lora"):
    cause, way_out = "another adapt.mode or adapt.lora.*", ""
  else:
    cause, way_out = "another model.*", ""
  return (f"{where} does not fit this config's train state ({detail}; was it saved with "
          f"{cause}?); resume with the config it was saved with{way_out}; nothing was changed")


def _clip_toggled(abstract_state, config):
  """The abstract state under the other ``train.grad_clip`` setting (on <-> off), carrying this
  state's leaves (and shardings); None when the leaves do not pair up."""
  from xlingo.training import state as state_lib

  t = ml_collections.ConfigDict(config.train.to_dict())
  t.grad_clip = 0.0 if config.train.grad_clip else 1.0
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state.params)
  alt = jax.eval_shape(state_lib.make_optimizer(t, plain).init, plain)
  leaves = jax.tree.leaves(abstract_state.opt_state)
  if len(jax.tree.leaves(alt)) != len(leaves):
    return None
  return abstract_state.replace(opt_state=jax.tree.unflatten(jax.tree.structure(alt), leaves))


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
    raise Unreadable(_first_line(e)) from None
  return restored["state"]


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
