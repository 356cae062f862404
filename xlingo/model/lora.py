"""LoRA: low-rank adapters on chosen kernels, kept beside the base parameters, and their merge.

The model is not changed. The adapters live in the params tree under a top-level ``lora`` key
that mirrors the paths of the kernels they adapt::

  params = {<the Decoder's params>, 'lora': {'blocks': {'layers': {'attn': {'query':
            {'a': [L, d, r], 'b': [L, r, n, h]}}}}}}

and a loss applies the model to :func:`merge` of the params, W + (alpha / r) * A @ B for each
targeted kernel, computed functionally before ``model.apply``. Training only ``^lora/`` (the
regex freezing of ``training.state``) then trains only the adapters, and :func:`merge` is also
the export: it returns plain Decoder params that any tool can load.

A kernel is read as a matrix by splitting its axes at the ``embed`` axis: axes before it are
the input side when it comes first (``query [embed, heads, head_dim]``: d -> n*h), axes before
it are the input side when it comes last (``out [heads, head_dim, embed]``: n*h -> d). A
leading scanned ``layers`` axis is a batch axis: every layer gets its own A and B. A and B
carry the kernel's logical axis names, so they shard like the kernel they adapt.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from xlingo.errors import ConfigError

KEY = "lora"
# The attention projections and the MLP kernels, scanned or unrolled.
DEFAULT_TARGETS = r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _split(names: tuple) -> tuple[int, int]:
  """(number of leading batch axes, number of input axes) of a kernel from its axis names."""
  lead = 1 if names and names[0] == "layers" else 0
  rest = names[lead:]
  if "embed" not in rest or len(rest) < 2:
    raise ConfigError(f"LoRA needs a kernel with an 'embed' axis and another axis; got axes "
                      f"{names}; narrow adapt.lora.targets to projection kernels")
  n_in = 1 if rest[0] == "embed" else len(rest) - 1
  return lead, n_in


def target_paths(boxed_params, pattern: str) -> list[str]:
  """Paths of the kernels that ``pattern`` (re.search) selects; none is a ConfigError."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"adapt.lora.targets={pattern!r} is not a valid regex ({e})") from None
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  paths = [_path_str(p) for p, _ in leaves if not _path_str(p).startswith(KEY + "/")]
  hits = [p for p in paths if rx.search(p)]
  if not hits:
    raise ConfigError(f"adapt.lora.targets={pattern!r} matches no parameter; parameter paths "
                      f"are {', '.join(paths)}")
  return hits


def _set(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def _get(tree, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def abstract_factors(boxed_params, lora_cfg) -> dict:
  """The boxed abstract ``lora`` subtree (A and B per targeted kernel) for ``boxed_params``."""
  r = int(lora_cfg.rank)
  if r < 1:
    raise ConfigError(f"adapt.lora.rank={r} must be >= 1")
  out: dict = {}
  for path in target_paths(boxed_params, lora_cfg.targets):
    leaf = _get(boxed_params, path)
    names = tuple(leaf.names)
    shape = leaf.value.shape
    lead, n_in = _split(names)
    in_names, out_names = names[lead:lead + n_in], names[lead + n_in:]
    lead_shape, in_shape, out_shape = (shape[:lead], shape[lead:lead + n_in],
                                       shape[lead + n_in:])
    dtype = leaf.value.dtype
    a = jax.ShapeDtypeStruct(lead_shape + in_shape + (r,), dtype)
    b = jax.ShapeDtypeStruct(lead_shape + (r,) + out_shape, dtype)
    _set(out, path, {
        "a": nn.Partitioned(a, names[:lead] + in_names + (None,)),
        "b": nn.Partitioned(b, names[:lead] + (None,) + out_names)})
  return out


def init_factors(rng, factors_abstract) -> dict:
  """A ~ N(0, 1/fan_in), B = 0: the adapted model starts exactly at the base model."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(factors_abstract)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    if _path_str(path).endswith("/b"):
      out.append(jnp.zeros(leaf.shape, leaf.dtype))
    else:
      # fan_in: the product of the input axes (all but the leading layers axis and rank).
      fan_in = math.prod(leaf.shape[1:-1]) if len(leaf.shape) > 2 else leaf.shape[0]
      out.append((jax.random.normal(k, leaf.shape, jnp.float32) / math.sqrt(fan_in))
                 .astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _delta(a, b, lead: int):
  """(A @ B) reshaped to the kernel: A [*lead, *in, r], B [*lead, r, *out]."""
  lead_shape = a.shape[:lead]
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.reshape(lead_shape + (math.prod(in_shape), a.shape[-1]))
  b2 = b.reshape(lead_shape + (b.shape[lead], math.prod(out_shape)))
  return jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(
      lead_shape + in_shape + out_shape)


def merge(params: dict, lora_cfg) -> dict:
  """Plain Decoder params: W + (alpha / rank) * A @ B for every adapted kernel (no ``lora``)."""
  if KEY not in params:
    return params
  scale = float(lora_cfg.alpha) / float(lora_cfg.rank)
  base = {k: v for k, v in params.items() if k != KEY}
  factors = params[KEY]
  flat = jax.tree_util.tree_leaves_with_path(factors)
  paths = sorted({_path_str(p).rsplit("/", 1)[0] for p, _ in flat})
  merged = jax.tree.map(lambda x: x, base)  # a fresh container tree; leaves are shared
  for path in paths:
    w = _get(base, path)
    ab = _get(factors, path)
    # a: lead + in + 1 axes, b: lead + 1 + out, w: lead + in + out.
    lead = ab["a"].ndim + ab["b"].ndim - 2 - w.ndim
    w_eff = w.astype(jnp.float32) + scale * _delta(ab["a"], ab["b"], lead)
    _set(merged, path, w_eff.astype(w.dtype))
  return merged
