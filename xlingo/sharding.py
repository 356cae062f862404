"""Device mesh from config, logical axis rules, and shardings for parameters, state and batch.

The model names every parameter axis logically ('embed', 'vocab', 'heads', ...); the rules in
``config.mesh.rules`` map those names onto the mesh axes ('data', 'fsdp', 'tensor'). Nothing
here knows the model beyond that: the boxed (``nn.Partitioned``) abstract params get their
shardings from the rules, and the optimizer state takes its parameters' shardings
(:func:`opt_state_shardings`).

The usual sequence (abstract first, so no full-size array ever lands on one device)::

  mesh = make_mesh(config.mesh)
  rules = logical_rules(config.mesh)
  params = init_params(model, config.model, mesh, rules, rng, config.data.seq_len)
  with mesh_context(mesh, rules):
    ...  # jit the step; activation constraints in the model now apply
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from xlingo.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Batches are split over every data-parallel axis; 'tensor' replicates the batch.
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for ``num_devices``; at most one of them may be -1 (the rest)."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  described = f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}"
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(
        f"{described}: each must be a positive size, and at most one may be -1 (the rest "
        f"of the {num_devices} devices)"
    )
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
          f"{described}: the fixed sizes multiply to {fixed}, which does not divide the "
          f"{num_devices} devices; choose sizes whose product divides {num_devices}"
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"{described} multiply to {math.prod(sizes)} but there are {num_devices} devices; "
        f"make the product {num_devices} or set one of them to -1"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    # Topology-aware on TPU: keeps the fastest-communicating axis ('tensor', last) on
    # neighbouring chips.
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  # Auto axes: sharding is propagated by XLA from the constraints we place (GSPMD style).
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> Rules:
  """``config.mesh.rules`` as a tuple of (logical name, mesh axis | tuple | None)."""
  rules = []
  for name, axes in mesh_cfg.rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(
            f"mesh.rules maps {name!r} to {axis!r}; mesh axes are {', '.join(MESH_AXES)}"
        )
    rules.append((name, axes))
  return tuple(rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules):
  """Makes ``mesh`` current and the rules active, so the model's activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [B, L]: rows split over data and fsdp, replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the data-parallel size {dp} "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {dp}"
    )


def _dummy_batch(seq_len: int, batch_size: int = 1) -> dict[str, jax.Array]:
  zeros = jnp.zeros((batch_size, seq_len), jnp.int32)
  return dict(inputs=zeros, segment_ids=zeros + 1, positions=zeros, lang_ids=zeros)


def init_variables(model: nn.Module, rng: jax.Array, seq_len: int):
  """``model.init`` on a dummy [1, seq_len] batch: all variable collections, boxed."""
  b = _dummy_batch(seq_len)
  return model.init(rng, b["inputs"], b["segment_ids"], b["positions"], b["lang_ids"])


def abstract_params(model: nn.Module, model_cfg: ml_collections.ConfigDict, seq_len: int):
  """The params tree as ShapeDtypeStructs, still boxed in ``nn.Partitioned`` (no FLOPs run).

  ``model_cfg`` is accepted for symmetry with the callers' configs; the shapes come from
  ``model`` itself. A short ``seq_len`` is enough: no parameter depends on it.
  """
  del model_cfg
  return jax.eval_shape(lambda r: init_variables(model, r, seq_len), jax.random.PRNGKey(0))[
      "params"
  ]


def _is_partitioned(x) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_specs(tree) -> Any:
  """Logical PartitionSpecs for a tree with ``nn.Partitioned`` leaves (others → P())."""
  return nn.get_partition_spec(tree)


def _boxed_shardings(tree, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are ``nn.Partitioned`` (plain leaves: replicated)."""
  return nn.logical_to_mesh_sharding(logical_specs(tree), mesh, rules)


def param_shardings(abstract_params_boxed, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for the params, after checking that every sharded dim divides evenly."""
  check_param_divisibility(abstract_params_boxed, mesh, rules)
  return _boxed_shardings(abstract_params_boxed, mesh, rules)


def path_str(path) -> str:
  """'blocks/layers/attn/query' for a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _mesh_size(mesh: Mesh | AbstractMesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def check_param_divisibility(tree, mesh: Mesh | AbstractMesh, rules: Rules) -> None:
  """Raises ConfigError naming the first parameter whose sharded dim does not divide.

  Takes a concrete or an ``AbstractMesh``, so TPU-sized plans can be checked on a laptop.
  """
  mesh_specs = nn.logical_to_mesh(logical_specs(tree), rules)
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_partitioned)
  spec_leaves = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, leaf), spec in zip(leaves, spec_leaves):
    value = leaf.value if _is_partitioned(leaf) else leaf
    names = leaf.names if _is_partitioned(leaf) else ()
    for dim, (size, axes) in enumerate(zip(value.shape, spec)):
      parts = _mesh_size(mesh, axes)
      if size % parts:
        raise ConfigError(
            f"parameter {path_str(path)} dim {dim} ({names[dim] if names else '?'}, size "
            f"{size}) is sharded over mesh {axes} of size {parts}, which does not divide it; "
            f"change the model shape or mesh.rules / mesh sizes"
        )


def opt_state_shardings(opt_state_abstract, params_abstract, param_shardings, mesh) -> Any:
  """Shardings for an optimizer state (or any tree) whose leaves mirror parameters.

  A leaf takes the sharding of the parameter whose path is a suffix of the leaf's path and
  whose shape matches (Adam's mu/nu, momentum, also inside ``optax.multi_transform``'s inner
  states); anything else (counts, scalars, masked nodes) is replicated. The state is built
  from unboxed params, so the match is by path and shape rather than by logical boxes.
  """
  by_path = {}
  for (p, a), s in zip(jax.tree_util.tree_leaves_with_path(params_abstract),
                       jax.tree.leaves(param_shardings)):
    by_path[path_str(p)] = (a.shape, s)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    ps = path_str(path)
    for k, (shape, s) in by_path.items():
      if (ps == k or ps.endswith("/" + k)) and tuple(leaf.shape) == tuple(shape):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state_abstract)


def init_params(
    model: nn.Module,
    model_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    rules: Rules,
    rng: jax.Array,
    seq_len: int,
):
  """Initialised params (plain arrays, unboxed), each created directly in its sharding."""
  boxed = abstract_params(model, model_cfg, seq_len)
  shardings = param_shardings(boxed, mesh, rules)

  def init(r):
    return nn.unbox(init_variables(model, r, seq_len)["params"])

  with mesh_context(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def _spec_str(spec: PartitionSpec, ndim: int) -> str:
  return str(tuple(spec) + (None,) * (ndim - len(spec)))


def partition_spec_table(params_or_abstract, mesh: Mesh, rules: Rules) -> dict[str, str]:
  """{'blocks/layers/attn/query': "(None, 'fsdp', 'tensor', None)", ...} for a snapshot.

  Takes boxed (``nn.Partitioned``) params, abstract or concrete, or placed jax.Arrays.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params_or_abstract, is_leaf=_is_partitioned)
  if any(_is_partitioned(leaf) for _, leaf in leaves):
    specs = [s.spec for s in jax.tree.leaves(_boxed_shardings(params_or_abstract, mesh, rules))]
    shapes = [(leaf.value if _is_partitioned(leaf) else leaf).shape for _, leaf in leaves]
  else:
    specs = [leaf.sharding.spec for _, leaf in leaves]
    shapes = [leaf.shape for _, leaf in leaves]
  return {
      path_str(path): _spec_str(spec, len(shape))
      for (path, _), spec, shape in zip(leaves, specs, shapes)
  }


def per_device_bytes(tree) -> dict[Any, int]:
  """Bytes each device holds for a tree of placed jax.Arrays."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals
