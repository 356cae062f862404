"""Causal self-attention over packed rows, with rotary positions and a KV cache.

Packing puts several documents in one row; ``segment_ids`` (1.. per document, 0 = padding)
keep each token's attention inside its own document. Grouped-query attention falls out of
``jax.nn.dot_product_attention`` when ``num_kv_heads < num_heads``.

Four implementations compute the same thing (``choose_implementation``): 'plain' (CPU),
'xla' and 'cudnn' (``jax.nn.dot_product_attention``), and 'splash' (TPU): Pallas' splash
attention kernel, which never forms the [B, N, T, T] scores, run per device under
``shard_map`` (``splash_attention``).

Decoding (``decode=True``) keeps ``cached_key``/``cached_value`` [B, max_len, K, H] and a
scalar ``cache_index`` in the ``cache`` collection. Each call writes its T new keys at the
index (T=1 for a step, T>1 for a prompt prefill) and attends causally over the filled part.
All rows share one index, so prompts in a decode batch are assumed left-aligned to the same
length (pad them on the left with their own segment if lengths differ).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from xlingo.errors import ConfigError
from xlingo.model import peft
from xlingo.model.matmul import flat_matmul

# Logical axis names of the activations; the rules in config.mesh.rules map them to the mesh.
BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", None)


IMPLEMENTATIONS = ("auto", "plain", "xla", "cudnn", "splash")
# Splash attention's blocks are multiples of the TPU's 128 lanes; 512 is the largest used.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def compile_platform() -> str:
  """The platform of the devices the program is being built for: the active mesh's, else the
  default backend's. Not ``jax.default_backend()`` alone: a CPU host compiles for abstract TPU
  devices (``bench/tpu_aot.py``), and the mesh says so."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def choose_implementation(impl: str, dtype, head_dim: int, platform: str | None = None) -> str:
  """Resolves attention_impl 'auto' to 'plain', 'xla', 'cudnn' or 'splash'.

  'xla' and 'cudnn' are ``jax.nn.dot_product_attention``'s backends; 'plain' is
  ``plain_attention`` (einsum + masked softmax); 'splash' is ``splash_attention``. TPUs take
  splash: it never forms the [B, N, T, T] float32 scores (4 GiB per layer for 16 rows of 2048
  positions and 16 heads) and skips the masked half of causal attention. cuDNN flash attention
  needs a GPU, half-precision inputs and head_dim a multiple of 8 up to 128, and likewise skips
  the masked half. CPUs use 'plain' (forward + backward of small's attention 130 vs 158 ms for
  the XLA path, docs/PERFORMANCE.md); other GPU cases use 'xla'. ``platform`` defaults to
  :func:`compile_platform`.
  """
  if impl in IMPLEMENTATIONS[1:]:
    return impl
  if impl != "auto":
    raise ConfigError(f"model.attention_impl={impl!r}; use one of {', '.join(IMPLEMENTATIONS)}")
  platform = platform or compile_platform()
  if platform == "cpu":
    return "plain"
  if platform == "tpu":
    return "splash"
  fits_cudnn = (
      platform == "gpu"
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0
      and head_dim <= 128
  )
  return "cudnn" if fits_cudnn else "xla"


def splash_block_size(length: int) -> int:
  """The largest multiple of 128 up to 512 that divides ``length`` (a multiple of 128): the
  kernel's query and key/value tile, forward and backward. Larger tiles mean fewer grid steps;
  512 is what MaxText settled on for 2k-8k rows, and a 512 x 512 float32 tile of scores
  (1 MiB) stays well inside a TensorCore's vector memory."""
  block = min(SPLASH_MAX_BLOCK, length)
  while length % block:
    block -= SPLASH_LANES
  return block


def splash_supported(length: int) -> bool:
  return length >= SPLASH_LANES and length % SPLASH_LANES == 0


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
  )

  block = splash_block_size(length)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * num_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)

  def attend_bnth(q_nth, k_kth, v_kth, segment_ids_t):
    ids = splash.SegmentIds(q=segment_ids_t, kv=segment_ids_t)
    return kernel(q_nth, k_kth, v_kth, segment_ids=ids)

  return jax.vmap(attend_bnth)


def _mesh_axes_if_divisible(logical: str, size: int, mesh):
  """The mesh axes the rules give ``logical``, or None where they do not divide ``size``."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None or mesh.empty:
    return None
  parts = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
  return axes if size % parts == 0 else None


def splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *,
                     interpret: bool | None = None) -> jax.Array:
  """Causal, segment-masked attention with Pallas' splash kernel; [B, T, N, H] out.

  The kernel does not scale the scores, so q is multiplied by 1/sqrt(H) first. It takes one
  row's [heads, T, H] arrays (vmapped over the batch) and reads grouped-query K/V heads itself
  (query head i uses K/V head i // (N / K)). Under a mesh it runs in ``shard_map``, each device
  on its own rows (the 'activation_batch' mesh axes) and heads ('activation_heads'); rows are
  never split along the sequence, which the kernel cannot do. Where an axis does not divide
  (e.g. K/V heads fewer than the 'tensor' devices) that dimension is replicated instead (K/V
  heads are first repeated to N). ``interpret`` (default: not compiling for a TPU) runs the
  kernel through the Pallas interpreter, which is how tests check it on CPU.
  """
  b, t, n, h = q_btnh.shape
  kh = k_btkh.shape[2]
  if interpret is None:
    interpret = compile_platform() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = _mesh_axes_if_divisible("activation_batch", b, mesh)
  head_axes = _mesh_axes_if_divisible("activation_heads", n, mesh)
  if head_axes is not None and _mesh_axes_if_divisible("activation_heads", kh, mesh) is None:
    k_btkh = jnp.repeat(k_btkh, n // kh, axis=2)
    v_btkh = jnp.repeat(v_btkh, n // kh, axis=2)
  scale = h**-0.5
  q_bnth = jnp.swapaxes((q_btnh.astype(jnp.float32) * scale).astype(q_btnh.dtype), 1, 2)
  k_bkth = jnp.swapaxes(k_btkh, 1, 2)
  v_bkth = jnp.swapaxes(v_btkh, 1, 2)
  segment_ids_bt = segment_ids_bt.astype(jnp.int32)

  def attend(q, k, v, seg):
    return _splash_kernel(q.shape[1], t, interpret)(q, k, v, seg)

  if mesh.empty:
    out_bnth = attend(q_bnth, k_bkth, v_bkth, segment_ids_bt)
  else:
    spec = jax.sharding.PartitionSpec(batch_axes, head_axes)
    out_bnth = jax.shard_map(
        attend, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch_axes)),
        out_specs=spec, check_vma=False)(q_bnth, k_bkth, v_bkth, segment_ids_bt)
  return jnp.swapaxes(out_bnth, 1, 2)


def rope_inv_freq(head_dim: int, theta: float, scaling=()) -> jax.Array:
  """RoPE's float32 inverse frequencies [head_dim / 2], with Llama 3's scaling when
  ``scaling`` is (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
  wavelengths longer than original / low_freq_factor are stretched by ``factor``, those shorter
  than original / high_freq_factor kept, and the band between interpolated smoothly."""
  half = head_dim // 2
  inv_freq_f = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))
  if not scaling:
    return inv_freq_f
  if len(scaling) != 4:
    raise ConfigError(f"model.rope_scaling={tuple(scaling)}; give (factor, low_freq_factor, "
                      "high_freq_factor, original_max_position_embeddings) or () for none")
  factor, low, high, original = (float(v) for v in scaling)
  wavelen_f = 2.0 * np.pi / inv_freq_f
  scaled_f = jnp.where(wavelen_f > original / low, inv_freq_f / factor, inv_freq_f)
  smooth_f = (original / wavelen_f - low) / (high - low)
  smoothed_f = (1.0 - smooth_f) * scaled_f / factor + smooth_f * scaled_f
  medium_f = (wavelen_f >= original / high) & (wavelen_f <= original / low)
  return jnp.where(medium_f, smoothed_f, scaled_f)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float,
               scaling=()) -> jax.Array:
  """Rotary position embedding (rotate-half form) computed in float32."""
  head_dim = x_btnh.shape[-1]
  half = head_dim // 2
  inv_freq_f = rope_inv_freq(head_dim, theta, scaling)
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


def _masked_probs(q_bnth, k_bnsh, mask_b1ts, is_causal: bool) -> jax.Array:
  """float32 softmax(q k^T / sqrt(h)) over the keys, masked; [B, N, T, S]."""
  t, h = q_bnth.shape[2:]
  s = k_bnsh.shape[2]
  logits_bnts = jnp.einsum("bnth,bnsh->bnts", q_bnth, k_bnsh).astype(jnp.float32) * (h**-0.5)
  if is_causal:
    mask_b1ts = mask_b1ts & jnp.tril(jnp.ones((t, s), jnp.bool_))
  logits_bnts = jnp.where(mask_b1ts, logits_bnts, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits_bnts, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_bnth(q_bnth, k_bnsh, v_bnsh, mask_b1ts, is_causal):
  probs_bnts = _masked_probs(q_bnth, k_bnsh, mask_b1ts, is_causal).astype(v_bnsh.dtype)
  return jnp.einsum("bnts,bnsh->bnth", probs_bnts, v_bnsh)


def _attention_fwd(q_bnth, k_bnsh, v_bnsh, mask_b1ts, is_causal):
  probs_bnts = _masked_probs(q_bnth, k_bnsh, mask_b1ts, is_causal).astype(v_bnsh.dtype)
  out_bnth = jnp.einsum("bnts,bnsh->bnth", probs_bnts, v_bnsh)
  return out_bnth, (q_bnth, k_bnsh, v_bnsh, probs_bnts, out_bnth, mask_b1ts)


def _attention_bwd(is_causal, res, dout_bnth):
  """The softmax-attention gradient written out as four batched matmuls.

  dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)) / sqrt(h); dQ = dS K; dK = dS^T Q.
  Autodiff of the forward gives the same values, but XLA on CPU lays the batched products of
  its transpose out with strided copies; this form keeps every operand [B, N, rows, cols].
  """
  del is_causal
  q_bnth, k_bnsh, v_bnsh, probs_bnts, out_bnth, mask_b1ts = res
  scale = q_bnth.shape[-1] ** -0.5
  dv_bnsh = jnp.einsum("bnts,bnth->bnsh", probs_bnts, dout_bnth)
  dprobs_bnts = jnp.einsum("bnth,bnsh->bnts", dout_bnth, v_bnsh).astype(jnp.float32)
  row_bnt1 = jnp.sum(dout_bnth.astype(jnp.float32) * out_bnth.astype(jnp.float32), axis=-1,
                     keepdims=True)
  dlogits_bnts = (probs_bnts.astype(jnp.float32) * (dprobs_bnts - row_bnt1) * scale).astype(
      q_bnth.dtype)
  dq_bnth = jnp.einsum("bnts,bnsh->bnth", dlogits_bnts, k_bnsh)
  dk_bnsh = jnp.einsum("bnts,bnth->bnsh", dlogits_bnts, q_bnth)
  return dq_bnth, dk_bnsh, dv_bnsh, None


_attention_bnth.defvjp(_attention_fwd, _attention_bwd)


def plain_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, is_causal: bool) -> jax.Array:
  """Softmax attention as batched matmuls over [B, N, T, H] and a masked softmax.

  The same result as ``jax.nn.dot_product_attention(..., implementation='xla')`` with the same
  mask (grouped-query: K divides N, K/V heads are repeated), in fewer and cheaper ops on CPU:
  forward + backward of configs/small.py's attention 83 ms vs 111 ms for the einsum form on
  [B, T, N, H] and 158 ms for the XLA path (docs/PERFORMANCE.md). Logits and softmax are
  float32; the backward pass is written out (``_attention_bwd``).
  """
  n = q_btnh.shape[2]
  kh = k_bskh.shape[2]
  if kh != n:  # grouped-query: each key/value head serves n // kh query heads
    k_bskh = jnp.repeat(k_bskh, n // kh, axis=2)
    v_bskh = jnp.repeat(v_bskh, n // kh, axis=2)
  out_bnth = _attention_bnth(jnp.swapaxes(q_btnh, 1, 2), jnp.swapaxes(k_bskh, 1, 2),
                             jnp.swapaxes(v_bskh, 1, 2), mask_b1ts, is_causal)
  return jnp.swapaxes(out_bnth, 1, 2)


class Attention(nn.Module):
  """Multi-head / grouped-query causal self-attention with RoPE."""

  config: ml_collections.ConfigDict  # config.model
  decode: bool = False
  peft: peft.PeftSpec | None = None  # LoRA side paths and prefixes (xlingo.model.peft)

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
      raise ConfigError(f"model.num_kv_heads={k} must divide model.num_heads={n}")

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
    mm = functools.partial(flat_matmul, quantization=cfg.quantization)
    lora = functools.partial(peft.add_lora, self, spec=self.peft, dtype=dtype,
                             param_dtype=param_dtype)
    q_btnh, k_btkh, v_btkh = lora(x_btd, [
        ("query", mm(x_btd, w_q.astype(dtype)), w_q.shape,
         ("embed", "heads", "head_dim")),
        ("key", mm(x_btd, w_k.astype(dtype)), w_k.shape,
         ("embed", "kv_heads", "head_dim")),
        ("value", mm(x_btd, w_v.astype(dtype)), w_v.shape,
         ("embed", "kv_heads", "head_dim"))])
    if cfg.qkv_bias:
      q_btnh, k_btkh, v_btkh = (y + self.param(
          f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), axes),
          y.shape[2:], param_dtype).astype(dtype) for name, y, axes in (
              ("query", q_btnh, ("heads", "head_dim")), ("key", k_btkh, ("kv_heads", "head_dim")),
              ("value", v_btkh, ("kv_heads", "head_dim"))))
    # Tags for the remat policies that keep the projections (decoder.REMAT_SAVED).
    q_btnh, k_btkh, v_btkh = (checkpoint_name(y, name) for y, name in (
        (q_btnh, "query_proj"), (k_btkh, "key_proj"), (v_btkh, "value_proj")))
    q_btnh = nn.with_logical_constraint(q_btnh, BTNH)

    batch, length = x_btd.shape[:2]
    cache = self._cache_vars(batch, k, h, dtype) if self.decode else None
    if positions_bt is None:
      start = cache[2].value if cache is not None else 0
      positions_bt = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    q_content_btnh = q_btnh  # a prefix has no position: its scores use the unrotated query
    q_btnh = apply_rope(q_btnh, positions_bt, cfg.rope_theta, cfg.rope_scaling)
    k_btkh = apply_rope(k_btkh, positions_bt, cfg.rope_theta, cfg.rope_scaling)

    out_btnh = self._attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, cache)
    if self.peft is not None and self.peft.prefix_length:
      k_pkh, v_pkh = peft.prefix_params(self, self.peft, k, h, param_dtype)
      out_btnh = out_btnh + peft.prefix_attention(q_content_btnh, k_pkh, v_pkh)
    out_btnh = nn.with_logical_constraint(out_btnh, BTNH)
    (out_btd,) = lora(out_btnh, [("out", mm(out_btnh, w_o.astype(dtype), contract=2),
                                  w_o.shape, ("heads", "head_dim", "embed"))], contract=2)
    out_btd = checkpoint_name(out_btd, "out_proj")
    return nn.with_logical_constraint(out_btd, BTD)

  def _attend(self, q_btnh, k_btkh, v_btkh, segment_ids_bt, cache) -> jax.Array:
    """Causal, segment-masked attention of the rotated queries and keys, [B, T, N, H] out:
    through a filled KV cache when decoding, else with the configured implementation."""
    length = q_btnh.shape[1]
    cfg = self.config
    impl = choose_implementation(cfg.attention_impl, jnp.dtype(cfg.dtype), cfg.head_dim)
    if impl == "splash" and not splash_supported(length):
      # Parameter init (8 positions) and odd lengths: the kernel tiles rows in 128s.
      impl = "xla"
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
    elif impl == "splash":
      out_btnh = splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)
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
    return out_btnh

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
