"""The tensors of a Hugging Face model, read a slice at a time into sharded arrays.

A source answers ``shape(name)`` from file headers alone and ``read(name, index)`` with just
that part of a tensor. ``SafetensorsSource`` reads ``model.safetensors`` or the shards a
``model.safetensors.index.json`` names, through ``safe_open(...).get_slice``: only the bytes of
the requested rows and columns are read. ``build_params`` makes each xlingo parameter with
``jax.make_array_from_callback``, whose callback is asked, per addressable device, for that
device's block: so each host reads only what its devices hold (with scanned layers, the block
of each layer it is asked for, stacked), and no host ever holds a whole model.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import linen as nn

from xlingo import paths, sharding
from xlingo.errors import CheckpointError
from xlingo.hf import layout

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FIX_FILE = "download the model again (or copy the file whole)"


class SafetensorsSource:
  """Tensors of a model directory (one file or an index of shards)."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open

    self.dir = paths.resolve(model_dir)
    index_path = paths.join(self.dir, INDEX)
    if paths.exists(index_path):
      try:
        weight_map = json.loads(paths.read_text(index_path))["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e}); {FIX_FILE}") from None
      files = sorted(set(weight_map.values()))
    elif paths.exists(paths.join(self.dir, SINGLE)):
      weight_map, files = None, [SINGLE]
    else:
      raise CheckpointError(f"{self.dir} has neither {SINGLE} nor {INDEX}; give a Hugging Face "
                            "model directory saved with safetensors (or a .gguf file)")
    self._handles, self._where = {}, {}
    for name in files:
      path = paths.join(self.dir, name)
      if not paths.exists(path):
        raise CheckpointError(f"{index_path} names {name}, which is not in {self.dir}; "
                              f"{FIX_FILE}")
      try:
        # Remote files are copied to a local cache first: safetensors reads local files.
        handle = safe_open(paths.local_copy(path), framework="numpy")
        keys = list(handle.keys())
      except Exception as e:  # noqa: BLE001 - safetensors' errors on a torn or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                              f"{FIX_FILE}") from None
      self._handles[name] = handle
      for key in keys:
        self._where[key] = name
    if weight_map is not None:
      missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
      if missing:
        raise CheckpointError(f"{index_path} puts {missing[0]} in {weight_map[missing[0]]}, "
                              f"which does not hold it; {FIX_FILE}")

  def file_of(self, name: str) -> str:
    return paths.join(self.dir, self._where.get(name, SINGLE))

  def shape(self, name: str) -> tuple[int, ...] | None:
    if name not in self._where:
      return None
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple) -> np.ndarray:
    try:
      block = self._handles[self._where[name]].get_slice(name)[index]
    except Exception as e:  # noqa: BLE001 - bytes missing from a truncated file
      raise CheckpointError(f"{self.file_of(name)}: tensor {name} cannot be read "
                            f"({_first_line(e)}); {FIX_FILE}") from None
    return np.asarray(block, np.float32)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:160] if lines else type(e).__name__


def check_shapes(source, m, where: str) -> None:
  """CheckpointError unless every tensor the model section needs is there with its shape
  (from the headers alone, before anything is read)."""
  for t in layout.tensors_for(m):
    want = layout.hf_shape(t, m)
    for i in range(m["num_layers"]) if t.per_layer else [None]:
      name = t.hf.format(i=i)
      have = source.shape(name)
      if have is None:
        raise CheckpointError(f"{where} has no tensor {name}, which its config.json implies; "
                              f"{FIX_FILE}, or fix config.json")
      if tuple(have) != tuple(want):
        raise CheckpointError(f"{source.file_of(name)}: {name} has shape {tuple(have)} but "
                              f"config.json implies {tuple(want)}; the weights and config.json "
                              "are from different models: use the config.json saved with them")


def build_params(source, m, model, mesh, rules, *, record=None):
  """The xlingo parameter tree of ``model`` (an xlingo Decoder for model section ``m``) from
  ``source``, each leaf sharded as the rules say, read device block by device block.

  ``record(name, hf_index)``, when given, sees every read (tests check that no device reads a
  whole sharded tensor). Language-embedding rows start at zero: an imported model computes the
  Hugging Face function until it is trained.
  """
  boxed = sharding.abstract_params(model, m, 8)
  shardings = sharding.param_shardings(boxed, mesh, rules)
  abstract = nn.unbox(boxed)
  by_path = {}
  for t in layout.tensors_for(m):
    if t.per_layer and not m["scan_layers"]:
      for i in range(m["num_layers"]):
        by_path[layout.xlingo_path(t, m, i)] = (t, i)
    else:
      by_path[layout.xlingo_path(t, m)] = (t, None)

  def leaf(path, sds, shard):
    key = sharding.path_str(path)
    if key == "lang_embedding":
      return jax.make_array_from_callback(
          sds.shape, shard, lambda idx: np.zeros(_block_shape(idx, sds.shape), sds.dtype))
    if key not in by_path:
      raise CheckpointError(f"xlingo parameter {key} has no Hugging Face counterpart; import "
                            "with the model section xlingo.hf.layout describes")
    t, layer = by_path[key]
    stacked = t.per_layer and m["scan_layers"]

    def one_layer(i, index):
      name = t.hf.format(i=i)

      def read(hf_index):
        if record is not None:
          record(name, hf_index)
        return source.read(name, hf_index)

      return layout.read_slice(t.kind, m["head_dim"], index, read)

    def callback(index):
      index = layout.concrete(index, sds.shape)
      if stacked:
        block = np.stack([one_layer(i, index[1:]) for i in range(*index[0].indices(
            sds.shape[0]))])
      else:
        block = one_layer(layer, index)
      return block.astype(sds.dtype)

    return jax.make_array_from_callback(sds.shape, shard, callback)

  return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def _block_shape(index, shape) -> tuple[int, ...]:
  return tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape))
