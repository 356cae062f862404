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

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from xlingo.config import ConfigError


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which and what to do."""


# --- the data-iterator item ------------------------------------------------------------------


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an object with ``save(dir)``/``restore(dir)`` (a PackedIterator), per process."""

  def save(self, directory: epath.Path, args: DataIteratorSave):
    d = os.path.join(os.fspath(directory), f"process_{jax.process_index()}")
    args.iterator.save(d)

  def restore(self, directory: epath.Path, args: DataIteratorRestore):
    d = os.path.join(os.fspath(directory), f"process_{jax.process_index()}")
    if not os.path.isdir(d):
      raise CheckpointError(
          f"no data-iterator state for process {jax.process_index()} in {directory}; the "
          "checkpoint was written by a run with fewer processes")
    args.iterator.restore(d)
    return args.iterator


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
      "languages": list(config.data.languages)}


class Checkpoints:
  """A thin layer over ``ocp.CheckpointManager`` with xlingo's items and checks."""

  def __init__(self, workdir: str, config, *, read_only: bool = False):
    self.directory = os.path.join(workdir, "checkpoints")
    self.config = config
    c = config.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep, enable_async_checkpointing=c.async_save and not read_only,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(model_fingerprint(self.config) | {"step": int(step)})}
    if iterator is not None:
      items["data"] = DataIteratorSave(iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        print(f"xlingo: checkpoint step {step} in {self.directory} is unreadable ({msg[:200]}); "
              "falling back to the previous checkpoint", flush=True)
    if steps:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps}); "
                            "move the directory aside to start from scratch")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(path: str, abstract_params, config=None):
  """Parameters only from another run's checkpoint (``init_from``): a workdir or a step dir."""
  path = os.path.abspath(os.path.expanduser(path)) if "://" not in path else path
  step_dir = _resolve_step_dir(path)
  meta_path = os.path.join(step_dir, "meta", "metadata")
  if config is not None and os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    want = model_fingerprint(config)
    if meta.get("vocab_size") != want["vocab_size"]:
      raise CheckpointError(
          f"init_from {step_dir}: vocabulary size {meta.get('vocab_size')} differs from "
          f"model.vocab_size={want['vocab_size']}; the checkpoint needs its own vocabulary")
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  target = {"params": abstract_params}
  try:
    restored = ckptr.restore(
        step_dir, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(_restore_arg, target),
            partial_restore=True)))
  except (ValueError, KeyError) as e:
    raise CheckpointError(
        f"init_from {step_dir}: parameters do not match the model ({str(e).splitlines()[0]}); "
        "check that model.* matches the checkpoint's model") from None
  return restored["state"]["params"]


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
