"""Parameter-efficient adaptation inside the model: LoRA, adapters, prefixes, all side paths.

A :class:`PeftSpec` given to the ``Decoder`` adds small parameters beside the frozen ones; the
base weights are never rewritten during training (no ``W + BA`` per step), so the backward pass
computes no gradient for them (``training.state.split_params``) and the tools run the adapted
model as it trained:

- **LoRA** (Hu et al. 2021): for each projection kernel ``W`` whose path ``adapt.lora.targets``
  selects (``blocks/layers/attn/query``, ``.../mlp/down``, ...), ``y = x W + (alpha / r) (x A) B``
  with ``A`` [in, r] ~ N(0, 1/fan_in) and ``B`` [r, out] = 0. Parameters ``<kernel>_lora_a`` and
  ``<kernel>_lora_b`` sit beside the kernel (scanned blocks: one pair per layer).
  :func:`merge_lora` folds them into the kernels for an export.
- **Adapter** (Houlsby et al. 2019; one per block after the MLP as in Pfeiffer et al. 2020):
  ``h + up(gelu(down(h)))`` on the MLP's output, ``up`` zero-initialised. With
  ``per_language`` every language has its own ``down``/``up`` (a ``languages`` axis) and a
  token uses the adapter of its language id: the parameter-sharing transfer of the design
  documents (shared body, one small module per language).
- **Prefix**: per layer ``P`` learned key and value vectors per key/value head that every query
  attends to with a softmax of its own, added to the attention output (a separate softmax as in
  the adaption prompts of LLaMA-Adapter, Zhang et al. 2023, rather than one softmax over prefix
  and tokens as in Li and Liang 2021). The values start at 0, so the adapted model starts
  exactly at the base model and the values get a gradient from the first step (a zero gate in
  front of them, LLaMA-Adapter's choice, leaves keys and values without one until the gate
  moves, and trained far more slowly here). Because the prefix part needs no mask and no cache,
  packed rows (a prefix is shared by every segment) and the KV cache of ``generate`` work
  unchanged, as do all attention implementations (plain, cuDNN, splash).

Parameter paths (what ``train.trainable`` selects for each mode, :data:`TRAINABLE`):
``.../attn/query_lora_a``, ``.../adapter/down``, ``.../attn/prefix_key``. Every parameter
carries logical axis names; the new ones are ``lora_rank``, ``adapter`` and ``prefix``
(replicated by the default rules).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from xlingo.errors import ConfigError
from xlingo.model.matmul import flat_matmul

# adapt.mode -> the parameters it trains (train.trainable).
TRAINABLE = {
    "lora": r"_lora_[ab]$",
    "adapter": r"(^|/)adapter/",
    "prefix": r"(^|/)attn/prefix_(key|value)$",
}
PEFT_PARAM = re.compile("|".join(f"({p})" for p in TRAINABLE.values()))
LORA_A, LORA_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class PeftSpec:
  """What the model adds beside its own parameters (all zero/empty: nothing)."""

  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = ""
  adapter_bottleneck: int = 0
  adapter_per_language: bool = False
  prefix_length: int = 0

  def to_meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: dict | None) -> PeftSpec | None:
    """The spec a checkpoint's metadata records (``restore.checkpoint_meta``), or None."""
    d = (meta or {}).get("peft")
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}) if d else None

  def without_lora(self) -> PeftSpec | None:
    s = dataclasses.replace(self, lora_rank=0, lora_targets="")
    return s if s.adapter_bottleneck or s.prefix_length else None


def spec_from_config(config) -> PeftSpec | None:
  """The spec ``adapt.mode`` asks for (None for full, freeze, lang_emb, or no adapt section)."""
  a = config.get("adapt")
  if a is None or a.mode not in TRAINABLE:
    return None
  if a.mode == "lora":
    rank = int(a.lora.rank)
    if rank < 1:
      raise ConfigError(f"adapt.lora.rank={rank} must be >= 1")
    try:
      re.compile(a.lora.targets)
    except re.error as e:
      raise ConfigError(f"adapt.lora.targets={a.lora.targets!r} is not a valid regex ({e})"
                        ) from None
    return PeftSpec(lora_rank=rank, lora_alpha=float(a.lora.alpha), lora_targets=a.lora.targets)
  if a.mode == "adapter":
    if int(a.adapter.bottleneck) < 1:
      raise ConfigError(f"adapt.adapter.bottleneck={a.adapter.bottleneck} must be >= 1")
    return PeftSpec(adapter_bottleneck=int(a.adapter.bottleneck),
                    adapter_per_language=bool(a.adapter.per_language))
  if int(a.prefix.length) < 1:
    raise ConfigError(f"adapt.prefix.length={a.prefix.length} must be >= 1")
  return PeftSpec(prefix_length=int(a.prefix.length))


def check_lora_targets(param_paths, spec: PeftSpec | None) -> None:
  """ConfigError when LoRA is asked for but its targets select no projection kernel."""
  if spec is None or not spec.lora_rank:
    return
  if not any(p.endswith(LORA_A) for p in param_paths):
    kernels = sorted({p for p in param_paths if re.search(r"/(attn|mlp)/[a-z]+$", p)})
    raise ConfigError(f"adapt.lora.targets={spec.lora_targets!r} matches no projection kernel; "
                      f"kernel paths look like {', '.join(kernels[:4])}")


# --- LoRA -----------------------------------------------------------------------------------


def add_lora(module: nn.Module, x: jax.Array, outputs: list[tuple], spec: PeftSpec | None,
             dtype, param_dtype, contract: int = 1) -> list[jax.Array]:
  """``y + (alpha / r) (x A) B`` for each ``(name, y, kernel_shape, kernel_names)`` in
  ``outputs`` whose kernel ``name`` of ``module`` LoRA targets; ``y`` as it is for the others.

  Each ``y = x W`` is a kernel's own output on the shared input ``x`` [..., *in] (its last
  ``contract`` axes meet the kernel's first ones, as in ``flat_matmul``). The A factors of the
  kernels that share ``x`` (query, key, value; gate, up) go through one matmul, so the side
  paths read ``x`` once, not once each. A and B take the kernel's logical axis names, so they
  shard like it.
  """
  if spec is None or not spec.lora_rank:
    return [y for _, y, _, _ in outputs]
  r = spec.lora_rank
  init_a = nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                            in_axis=tuple(range(contract)), out_axis=-1)
  factors = {}
  for name, _, shape, names in outputs:
    if not re.search(spec.lora_targets, "/".join(module.path + (name,))):
      continue
    in_shape, out_shape = tuple(shape[:contract]), tuple(shape[contract:])
    a = module.param(name + LORA_A, nn.with_logical_partitioning(
        init_a, tuple(names[:contract]) + ("lora_rank",)), in_shape + (r,), param_dtype)
    b = module.param(name + LORA_B, nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("lora_rank",) + tuple(names[contract:])),
        (r,) + out_shape, param_dtype)
    factors[name] = (a.astype(dtype), b.astype(dtype))
  if not factors:
    return [y for _, y, _, _ in outputs]
  a_all = jnp.concatenate([a for a, _ in factors.values()], axis=-1)
  h_all = flat_matmul(x, a_all, contract)
  scale = jnp.asarray(spec.lora_alpha / r, dtype)
  side = {name: flat_matmul(h_all[..., i * r:(i + 1) * r], b) * scale
          for i, (name, (_, b)) in enumerate(factors.items())}
  return [y + side[name] if name in side else y for name, y, _, _ in outputs]


def _lora_delta(a, b, lead: int):
  """(A @ B) shaped like the kernel: A [*lead, *in, r], B [*lead, r, *out]."""
  lead_shape = a.shape[:lead]
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a2 = a.reshape(lead_shape + (math.prod(in_shape), a.shape[-1]))
  b2 = b.reshape(lead_shape + (b.shape[lead], math.prod(out_shape)))
  return jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)).reshape(
      lead_shape + in_shape + out_shape)


def merge_lora(params: dict, spec: PeftSpec) -> dict:
  """The params without LoRA factors: ``W + (alpha / r) A B`` for every adapted kernel (an
  export that any model without LoRA loads; adapters and prefixes are left as they are)."""
  scale = spec.lora_alpha / spec.lora_rank

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: walk(v) for k, v in tree.items() if not k.endswith((LORA_A, LORA_B))}
    for k in tree:
      if k.endswith(LORA_A):
        base = k[:-len(LORA_A)]
        w, a, b = tree[base], tree[k], tree[base + LORA_B]
        lead = a.ndim + b.ndim - 2 - w.ndim  # a scanned 'layers' axis
        out[base] = (w.astype(jnp.float32) + scale * _lora_delta(a, b, lead)).astype(w.dtype)
    return out

  return walk(params)


# --- adapters ---------------------------------------------------------------------------------


class Adapter(nn.Module):
  """A bottleneck on a block's MLP output (``h -> up(gelu(down(h)))``, added by the caller).

  Per language, all languages' bottlenecks are computed together as one [d, L * r] matmul and a
  token keeps its own language's: L times one adapter's FLOPs, still a small fraction of the
  block's, and no gather of per-token weights.
  """

  bottleneck: int
  per_language: bool
  num_languages: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_btd: jax.Array, lang_ids_bt: jax.Array) -> jax.Array:
    d, r, n_l = h_btd.shape[-1], self.bottleneck, self.num_languages
    init_down = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                                 out_axis=-1)
    zeros = nn.initializers.zeros_init()
    h_btd = h_btd.astype(self.dtype)
    if not self.per_language:
      down_dr = self.param("down", nn.with_logical_partitioning(init_down, ("embed", "adapter")),
                           (d, r), self.param_dtype)
      up_rd = self.param("up", nn.with_logical_partitioning(zeros, ("adapter", "embed")), (r, d),
                         self.param_dtype)
      z_btr = nn.gelu(flat_matmul(h_btd, down_dr.astype(self.dtype)))
      return flat_matmul(z_btr, up_rd.astype(self.dtype))
    down_dlr = self.param(
        "down", nn.with_logical_partitioning(init_down, ("embed", "languages", "adapter")),
        (d, n_l, r), self.param_dtype)
    up_lrd = self.param("up", nn.with_logical_partitioning(zeros, ("languages", "adapter", "embed")),
                        (n_l, r, d), self.param_dtype)
    z_btlr = nn.gelu(flat_matmul(h_btd, down_dlr.astype(self.dtype)))
    # An id outside the table (none given, or an "unknown language" id) selects no adapter.
    own_btl = jax.nn.one_hot(lang_ids_bt, n_l, dtype=self.dtype)
    return flat_matmul(z_btlr * own_btl[..., None], up_lrd.astype(self.dtype), contract=2)


# --- prefixes ---------------------------------------------------------------------------------


def prefix_params(module: nn.Module, spec: PeftSpec, num_kv_heads: int, head_dim: int,
                  param_dtype):
  """(key [P, K, H], value [P, K, H]) of ``module``'s layer."""
  p = spec.prefix_length
  # Unit-variance keys, like a normalised token's projection; values 0 (no effect at first).
  k_pkh = module.param("prefix_key", nn.with_logical_partitioning(
      nn.initializers.normal(1.0), ("prefix", "kv_heads", "head_dim")),
      (p, num_kv_heads, head_dim), param_dtype)
  v_pkh = module.param("prefix_value", nn.with_logical_partitioning(
      nn.initializers.zeros_init(), ("prefix", "kv_heads", "head_dim")),
      (p, num_kv_heads, head_dim), param_dtype)
  return k_pkh, v_pkh


def prefix_attention(q_btnh: jax.Array, k_pkh: jax.Array, v_pkh: jax.Array) -> jax.Array:
  """``softmax(q k_prefix^T / sqrt(H)) v_prefix`` per head, [B, T, N, H].

  Every query sees every prefix position (no causal or segment mask: the prefix belongs to the
  layer, not to a document). Grouped-query heads share their key/value head's prefix.
  """
  b, t, n, h = q_btnh.shape
  kv = k_pkh.shape[1]
  dtype = q_btnh.dtype
  q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
  logits_btkgp = jnp.einsum("btkgh,pkh->btkgp", q_btkgh, k_pkh.astype(dtype),
                            preferred_element_type=jnp.float32) * (h**-0.5)
  probs_btkgp = jax.nn.softmax(logits_btkgp, axis=-1).astype(dtype)
  out_btkgh = jnp.einsum("btkgp,pkh->btkgh", probs_btkgp, v_pkh.astype(dtype))
  return out_btkgh.reshape(b, t, n, h)
