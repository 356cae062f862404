"""Causal self-attention over packed rows, with rotary positions and a KV cache.

Packing puts several documents in one row; ``segment_ids`` (1.. per document, 0 = padding)
keep each token's attention inside its own document. Grouped-query attention falls out of
``jax.nn.dot_product_attention`` when ``num_kv_heads < num_heads``.

Decoding (``decode=True``) keeps ``cached_key``/``cached_value`` [B, max_len, K, H] and a
scalar ``cache_index`` in the ``cache`` collection. Each call writes its T new keys at the
index (T=1 for a step, T>1 for a prompt prefill) and attends causally over the filled part.
All rows share one index, so prompts in a decode batch are assumed left-aligned to the same
length (pad them on the left with their own segment if lengths differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

# Logical axis names of the activations; the rules in config.mesh.rules map them to the mesh.
BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", None)


def choose_implementation(impl: str, dtype, head_dim: int) -> str:
  """Resolves attention_impl 'auto' to 'plain', 'xla' or 'cudnn'.

  'xla' and 'cudnn' are ``jax.nn.dot_product_attention``'s backends; 'plain' is
  ``plain_attention`` (einsum + masked softmax). cuDNN flash attention needs a GPU,
  half-precision inputs and head_dim a multiple of 8 up to 128; it skips the masked half of
  causal attention, so it is worth taking where it applies. CPUs use 'plain' (forward +
  backward of small's attention 130 vs 158 ms for the XLA path, docs/PERFORMANCE.md); TPUs
  and other GPU cases use 'xla'.
  """
  if impl in ("plain", "xla", "cudnn"):
    return impl
  if impl != "auto":
    raise ValueError(f"model.attention_impl={impl!r}; use auto, plain, xla or cudnn")
  if jax.default_backend() == "cpu":
    return "plain"
  fits_cudnn = (
      jax.default_backend() == "gpu"
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0
      and head_dim <= 128
  )
  return "cudnn" if fits_cudnn else "xla"


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) computed in float32."""
  head_dim = x_btnh.shape[-1]
  half = head_dim // 2
  inv_freq_f = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
  angle_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq_f
  sin_bt1f = jnp.sin(angle_btf)[:, :, None, :]
  cos_bt1f = jnp.cos(angle_btf)[:, :, None, :]
  x = x_btnh.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_bt1f - x2 * sin_bt1f, x2 * cos_bt1f + x1 * sin_bt1f], axis=-1)
  return out.astype(x_btnh.dtype)


def segment_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """Boolean [B, 1, T, T]: True where query and key are in the same packed segment.

  Padding (segment 0) attends to padding, so no row is fully masked (no NaN from softmax);
  its outputs carry zero loss weight.
  """
  same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return same_bts[:, None, :, :]


def plain_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal: bool) -> jax.Array:
  """Softmax attention as two einsums and a masked softmax (grouped-query: K divides N).

  The same result as ``jax.nn.dot_product_attention(..., implementation='xla')`` with the same
  mask, in fewer ops on CPU. Logits and softmax are computed in float32.
  """
  t, n, h = q_btnh.shape[1:]
  s, kh = k_bskh.shape[1], k_bskh.shape[2]
  if kh != n:  # grouped-query: each key/value head serves n // kh query heads
    k_bskh = jnp.repeat(k_bskh, n // kh, axis=2)
    v_bskh = jnp.repeat(v_bskh, n // kh, axis=2)
  logits_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bskh).astype(jnp.float32) * (h**-0.5)
  if is_causal:
    mask_b1ts = mask_b1ts & jnp.tril(jnp.ones((t, s), jnp.bool_))
  logits_bnts = jnp.where(mask_b1ts, logits_bnts, jnp.finfo(jnp.float32).min)
  probs_bnts = jax.nn.softmax(logits_bnts, axis=-1).astype(v_bskh.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs_bnts, v_bskh)


class Attention(nn.Module):
  """Multi-head / grouped-query causal self-attention with RoPE."""

  config: ml_collections.ConfigDict  # config.model
  decode: bool = False

  @nn.compact
  def __call__(
      self,
      x_btd: jax.Array,
      segment_ids_bt: jax.Array,
      positions_bt: jax.Array | None,
  ) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if n % k:
      raise ValueError(f"model.num_kv_heads={k} must divide model.num_heads={n}")

    def proj_init(in_axis, out_axis):
      return nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
      )

    w_q = self.param(
        "query",
        nn.with_logical_partitioning(proj_init(0, (1, 2)), ("embed", "heads", "head_dim")),
        (d, n, h),
        param_dtype,
    )
    w_k = self.param(
        "key",
        nn.with_logical_partitioning(proj_init(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
        (d, k, h),
        param_dtype,
    )
    w_v = self.param(
        "value",
        nn.with_logical_partitioning(proj_init(0, (1, 2)), ("embed", "kv_heads", "head_dim")),
        (d, k, h),
        param_dtype,
    )
    w_o = self.param(
        "out",
        nn.with_logical_partitioning(proj_init((0, 1), 2), ("heads", "head_dim", "embed")),
        (n, h, d),
        param_dtype,
    )

    x_btd = x_btd.astype(dtype)
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, w_q.astype(dtype))
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, w_k.astype(dtype))
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, w_v.astype(dtype))
    q_btnh = nn.with_logical_constraint(q_btnh, BTNH)

    batch, length = x_btd.shape[:2]
    cache = self._cache_vars(batch, k, h, dtype) if self.decode else None
    if positions_bt is None:
      start = cache[2].value if cache is not None else 0
      positions_bt = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    q_btnh = apply_rope(q_btnh, positions_bt, cfg.rope_theta)
    k_btkh = apply_rope(k_btkh, positions_bt, cfg.rope_theta)

    impl = choose_implementation(cfg.attention_impl, dtype, h)
    if cache is not None and cache[3]:
      # A filled cache: write the new keys at the index, attend over everything before.
      cached_key, cached_value, cache_index, _ = cache
      index = cache_index.value
      k_bskh = jax.lax.dynamic_update_slice(cached_key.value, k_btkh, (0, index, 0, 0))
      v_bskh = jax.lax.dynamic_update_slice(cached_value.value, v_btkh, (0, index, 0, 0))
      cached_key.value, cached_value.value = k_bskh, v_bskh
      cache_index.value = index + length
      q_pos_t = index + jnp.arange(length)
      k_pos_s = jnp.arange(k_bskh.shape[1])
      mask_11ts = (k_pos_s[None, :] <= q_pos_t[:, None])[None, None]
      # T is 1 or a short prompt here; the XLA path handles a T != S mask directly.
      out_btnh = jax.nn.dot_product_attention(
          q_btnh, k_bskh, v_bskh, mask=mask_11ts, implementation="xla"
      )
    elif impl == "plain":
      out_btnh = plain_attention(
          q_btnh, k_btkh, v_btkh, segment_mask(segment_ids_bt), is_causal=True
      )
    else:
      out_btnh = jax.nn.dot_product_attention(
          q_btnh,
          k_btkh,
          v_btkh,
          mask=segment_mask(segment_ids_bt),
          is_causal=True,
          implementation=impl,
      )
    out_btnh = nn.with_logical_constraint(out_btnh, BTNH)
    out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, w_o.astype(dtype))
    return nn.with_logical_constraint(out_btd, BTD)

  def _cache_vars(self, batch: int, num_kv_heads: int, head_dim: int, dtype):
    """Returns (cached_key, cached_value, cache_index, was_initialised).

    The first decode call (``model.init(..., decode=True)``) only creates the zeroed cache;
    its output comes from ordinary attention over the inputs.
    """
    was_initialised = self.has_variable("cache", "cached_key")
    shape = (batch, self.config.max_len, num_kv_heads, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    return cached_key, cached_value, cache_index, was_initialised
