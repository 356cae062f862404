"""Orbax checkpoints: train state + data-iterator state + metadata in one step directory.

Layout of ``WORKDIR/checkpoints/<step>/``:
  state/   the TrainState (Orbax StandardSave: sharded, written collectively by every host)
  data/    each process's data-iterator state (``process_<i>/``), written by that process
  meta/    JSON (``restore.checkpoint_meta``): the model's shape keys, language table and
           vocabulary (path and SHA-1), the settings that shape the saved state, the step

The one module that imports Orbax: the manager below (save, resume), the best copy
(``save_best``, ``WORKDIR/best``), params-only exports (``export_params``) and the reads the
one restore of parameters (``load.load_params``) is made of (``step_numbers``,
``saved_shapes``, ``restore_tree``). The workdir's names are ``layout.py``'s.

Resume order (the loop's ``run``): the workdir's own latest checkpoint (or
``checkpoint.restore_step``), then ``checkpoint.init_from`` (parameters only), then from
scratch. Tools (generate, evaluate, a distillation teacher, adaptation's report) restore
parameters through ``load.load_params``, with the same metadata and checks. What a restore
does with a checkpoint it cannot use:

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
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from xlingo import paths, preemption
from xlingo.errors import CheckpointError, StorageError, XlingoError
from xlingo.training import layout, restore, storage_faults

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


def _register_array_handler_without_replica_parallel() -> None:
  """Orbax's jax.Array handler without replica-parallel saving (CPU), registered once and
  without the absl warning Orbax logs for every override."""
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


class Checkpoints:
  """A thin layer over ``ocp.CheckpointManager`` with xlingo's items and checks."""

  def __init__(self, workdir: str, config, *, read_only: bool = False):
    # Absolute: Orbax's OCDBT writer rejects relative paths (in its background save thread, so
    # the error would surface only after the step was lost). Orbax writes gs:// itself.
    self.workdir = paths.resolve(workdir)
    self.directory = paths.join(self.workdir, layout.CHECKPOINTS)
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
      _register_array_handler_without_replica_parallel()
    self._options = options
    # Storage that fails or stalls (gs://): each save is retried with backoff for at most
    # checkpoint.storage_retry_s, then the run stops with one line (``_gave_up``); the metrics
    # writer and the workdir lock share this policy.
    # Several processes save collectively: one of them retrying alone (with a new manager)
    # would wait for the others at Orbax's barriers, so there each try is bounded, not repeated.
    self.storage = paths.Retrying(
        c.storage_retry_s, remote=paths.is_remote(self.workdir), abort=preemption.stop_requested,
        on_retry=storage_faults.report_retry, give_up=self._gave_up,
        again=jax.process_count() == 1)
    self.manager = self.storage.run(self._new_manager, "opening the checkpoint manager")
    storage_faults.quiet_disk_full_logs()
    # The newest step known to be complete in storage, and the (step, state, iterator) of the
    # newest save, which may still be writing in the background.
    self.confirmed: int | None = self.manager.latest_step()
    self._last: tuple | None = None
    self._retrying = False

  def _new_manager(self):
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data", "meta"))

  def _recover(self) -> None:
    """Before a retried save: a manager whose save failed or stalled may hold a broken
    background save; it is left behind (closing it could block) and a new one reads the
    directory. The retry waits for its save, so success is known before training goes on."""
    self.manager = self._new_manager()
    self._retrying = True

  def _gave_up(self, e: paths.StorageGaveUp) -> CheckpointError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.since))
    last = (f"the last good checkpoint is step {self.confirmed}" if self.confirmed is not None
            else "no checkpoint had been saved yet")
    how = (f"a stop request came while it was stuck (the storage had not answered since "
           f"{since})" if e.stopped else
           f"the storage failed from {since} until checkpoint.storage_retry_s="
           f"{self.storage.retry_s:g} s ran out")
    return StorageError(
        f"{e.what} in {self.workdir} failed ({e.cause}): {how}; {last}. When the storage "
        f"answers again, resume with: {storage_faults.resume_command()}")

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
    args = self._composite(step, state, iterator)

    def attempt() -> bool:
      if self._retrying and step in self.manager.all_steps():
        return True  # the failed try got as far as a complete step after all
      saved = self.manager.save(step, args=args, force=force)
      if self._retrying or not self._options.enable_async_checkpointing:
        self.manager.wait_until_finished()
      return saved

    with self._disk_full_is_one_line():
      saved = self.storage.run(attempt, f"saving checkpoint step {step}", recover=self._recover)
    # manager.save returns after the previous (background) save finished without error.
    self.confirmed = self._last[0] if self._last and not self._retrying else self.confirmed
    if self._retrying or not self._options.enable_async_checkpointing:
      self.confirmed = step
    self._retrying = False
    self._last = (step, state, iterator)
    return saved

  def _composite(self, step: int, state, iterator):
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(restore.checkpoint_meta(self.config, step, self.branched_from))}
    if iterator is not None:
      items["data"] = DataIteratorSave(iterator)
    return ocp.args.Composite(**items)

  @contextlib.contextmanager
  def _disk_full_is_one_line(self):
    try:
      yield
    except Exception as e:
      if paths.is_disk_full(e):
        self._remove_partial_saves()
        raise storage_faults.disk_full_error(self.workdir, self._state_bytes) from None
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
    diff = restore.fingerprint_diff(meta, self.config)
    if diff:
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} is from an incompatible model ({diff}); use "
          "a workdir of its own for a new model, or set the config to match the checkpoint")
    d = restore.settings_diff(meta.get("settings") or {}, self.config)
    if d:
      key, old, new = d
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} was saved with {key}={restore.fmt_value(old)} but "
          f"this config has {restore.fmt_value(new)} (it shapes {restore.STATE_SHAPING[key]}); resume with "
          f"--config.{key}={restore.fmt_value(old)}, or start a new --workdir with "
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
    want = int(self.config.checkpoint.restore_step)
    if want and steps and not self._continues_branch(steps, want):
      return self._restore_named(want, steps, abstract_state, iterator)
    for step in reversed(steps):
      try:
        return self._restore_step(step, abstract_state, iterator), step
      except restore.Unreadable as e:
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
    """One step's state; restore.Unreadable when its bytes cannot be read, CheckpointError (or the
    data layer's own error) when it does not fit this config."""
    step_dir = self.step_dir(step)
    meta = restore.read_meta(step_dir)
    self.check_compatible(step, meta)
    target, convert = self._state_target(step, paths.join(step_dir, "state"), abstract_state)
    try:
      state = self.restore(step, target, iterator)
    except XlingoError:
      raise
    except Exception as e:  # noqa: BLE001 - the structure fits the config, so the bytes are bad
      raise restore.Unreadable(restore.first_line(e)) from None
    self.branched_from = meta.get("restore_step")
    return convert(state) if convert else state

  def _state_target(self, step: int, state_dir: str, abstract_state):
    """(abstract state to restore into, converter to this config's layout or None).

    The saved tree is compared with the config's before any array is read, so a config that
    does not fit is reported as such (and nothing is set aside). Clipping on <-> off
    (``train.grad_clip``) is carried over: the clip keeps no state, so the saved arrays are the
    same in the same order, only nested differently.
    """
    saved = saved_shapes(state_dir)
    want = restore.tree_shapes(abstract_state)
    if saved == want:
      return abstract_state, None
    alt = restore.clip_toggled(abstract_state, self.config)
    if alt is not None and restore.tree_shapes(alt) == saved:
      treedef = jax.tree.structure(abstract_state.opt_state)
      return alt, lambda s: s.replace(opt_state=jax.tree.unflatten(
          treedef, jax.tree.leaves(s.opt_state)))
    raise CheckpointError(restore.structure_message(
        f"checkpoint step {step} in {self.directory}", saved, want,
        f"--config.checkpoint.init_from={paths.dirname(self.directory)}"))

  def _continues_branch(self, steps: list[int], want: int) -> bool:
    """True when the newest readable checkpoint after ``want`` was saved by a run that
    restored ``want`` (the same command run again resumes it, not ``want``)."""
    for step in reversed(steps):
      if step <= want:
        return False
      try:
        return restore.read_meta(self.step_dir(step)).get("restore_step") == want
      except restore.Unreadable:
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
    except restore.Unreadable as e:
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
      self.storage.run(self.manager.wait_until_finished, "finishing the last checkpoint save")
    if self._last is not None:
      self.confirmed = self._last[0]

  def close(self) -> None:
    """Finish the last save; a background save that failed is written again from its state,
    which is intact here (no step after the last save donated it)."""
    step = self._last[0] if self._last else None

    def finish():
      if self._retrying and self._last is not None:
        if step not in self.manager.all_steps():
          self.manager.save(step, args=self._composite(*self._last), force=True)
      self.manager.wait_until_finished()

    with self._disk_full_is_one_line():
      what = "finishing the last checkpoint save" if step is None else (
          f"saving checkpoint step {step}")
      self.storage.run(finish, what, recover=self._recover)
    self.confirmed = step if step is not None else self.confirmed
    self._retrying = False
    self.manager.close()


# --- step directories outside the manager: reading, the best copy, params-only exports ------


def step_numbers(directory: str) -> list[int]:
  """The finalized checkpoint steps in a ``checkpoints/`` directory (Orbax's own listing, so
  a step still being written is not one)."""
  return list(ocp.utils.checkpoint_steps(directory))


def saved_shapes(item_dir: str) -> dict[str, tuple]:
  """'params/blocks/...' -> shape of every array saved in a pytree item, from Orbax's metadata
  alone (no array is read); Unreadable when the metadata cannot be read."""
  try:
    md = ocp.PyTreeCheckpointHandler().metadata(paths.as_path(item_dir))
    leaves = jax.tree_util.tree_leaves_with_path(getattr(md, "tree", md))
  except Exception as e:  # noqa: BLE001 - whatever Orbax raises on metadata it cannot parse
    raise restore.Unreadable(f"state metadata {restore.first_line(e)}") from None
  shapes = {restore.tree_key(p): tuple(leaf.shape) for p, leaf in leaves
            if getattr(leaf, "shape", None) is not None}
  if not shapes:
    raise restore.Unreadable("state metadata lists no arrays")
  return shapes


def restore_tree(step_dir: str, target):
  """The arrays of ``target`` (a subtree of the saved state); the caller has checked the
  structure, so a failure here is in the bytes (Unreadable)."""
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = ckptr.restore(
        paths.as_path(step_dir), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(_restore_arg, target),
            partial_restore=True)))
  except Exception as e:  # noqa: BLE001 - any read failure: the caller falls back or reports
    raise restore.Unreadable(restore.first_line(e)) from None
  return restored["state"]


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)


def _save_step_dir(out_dir: str, state, meta: dict) -> None:
  """One step directory (``state/`` + ``meta/``) outside the manager, written by every host
  (the arrays are sharded) and finalized by Orbax; replaces what was at ``out_dir``."""
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(paths.as_path(out_dir), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def export_params(out_dir: str, params, config, step: int | None) -> str:
  """Writes ``params`` alone (no optimizer or data state) as a step directory that
  ``checkpoint.init_from`` and every tool load as a plain model; returns its path."""
  out_dir = paths.resolve(out_dir)
  _save_step_dir(out_dir, {"params": params}, restore.export_meta(config, step))
  return out_dir


def save_best(workdir: str, config, state, step: int) -> None:
  """Keep the best-so-far state (early stopping) in WORKDIR/best, replacing the previous. The
  new copy is complete in best.tmp before the old one goes, so a crash leaves one whole copy
  (under best/ or best.tmp/); on gs:// the final rename is a copy, not atomic. Its metadata is
  a checkpoint's (step included), so that tools load best/ on its own."""
  path = paths.join(paths.resolve(workdir), layout.BEST)
  tmp = path + ".tmp"
  leader = jax.process_index() == 0
  if leader:
    paths.rmtree(tmp)
  _sync_hosts("xlingo_best_clear")
  _save_step_dir(tmp, state, restore.checkpoint_meta(config, step))
  if leader:
    paths.rmtree(path)
    paths.rename(tmp, path)
  _sync_hosts("xlingo_best_done")


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
