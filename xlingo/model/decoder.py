"""The decoder-only language model: token + language embeddings, pre-norm blocks, LID head.

Block: x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). Rotary positions come from the
batch's ``positions`` (position within a packed segment), so packed documents each start at
0. A language-embedding row (``lang_ids`` index ``config.data.languages``) is added to every
token embedding, which lets generation be steered to a language by the ids passed each step.
A negative id (:data:`UNKNOWN_LANG`) adds nothing: the "unknown language" hint is the zero
vector, which needs no parameter, so checkpoints and ``init_from`` with appended languages are
unchanged by it (``model.lang_emb_dropout`` trains the model to work with it).

Every parameter carries logical axis names (``nn.with_logical_partitioning``); the mesh rules
in ``config.mesh.rules`` decide how they are sharded (see ``xlingo.sharding``). With
``scan_layers`` the blocks are one ``nn.scan`` whose parameters have a leading ``layers``
axis, which keeps compile time flat in depth.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from xlingo.errors import ConfigError
from xlingo.model import peft as peft_lib
from xlingo.model.attention import BTD, Attention, compile_platform, flat_matmul

BTF = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")

# A language id that gives no language hint: no language-embedding row is added there.
UNKNOWN_LANG = -1

# Rematerialisation (``model.remat_policy``): what a block keeps from its forward pass for the
# backward pass; the rest is recomputed there. Names are ``checkpoint_name`` tags in the block
# (Attention: query_proj, key_proj, value_proj, out_proj; DecoderBlock: mlp_input, the
# residual stream after attention; SwiGluMlp: mlp_up). Per token and layer in bf16 (d model
# width, n/k query/kv heads of width h, f mlp_dim): save_qkv_proj keeps (n + 2k) h values and
# spares the replay of the three input projections; save_mlp_input keeps d and spares the out
# projection's; save_qkv_proj_mlp_input both; save_attn_proj keeps q/k/v and the out
# projection's output, (n + 2k) h + d, and spares the same as save_qkv_proj_mlp_input;
# save_qkv_proj_mlp_input_mlp_up adds the MLP's up projection (f values) and spares its replay
# too. The attention kernel and the MLP's gate projection are replayed by all of them.
# offload_* keep their names in host memory (pinned_host) instead of HBM, paid for in
# host<->device copies that XLA overlaps with compute. ``full`` keeps only the block inputs
# (the scan carry); ``dots_saveable`` keeps every matmul output (the MLP's gate and up
# included), the most memory and the least replay.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
REMAT_SAVED = {
    "full": (),
    "save_qkv_proj": QKV_NAMES,
    "save_mlp_input": ("mlp_input",),
    "save_qkv_proj_mlp_input": (*QKV_NAMES, "mlp_input"),
    "save_attn_proj": (*QKV_NAMES, "out_proj"),
    "save_qkv_proj_mlp_input_mlp_up": (*QKV_NAMES, "mlp_input", "mlp_up"),
}
REMAT_OFFLOADED = {
    "offload_attn_proj": (*QKV_NAMES, "out_proj"),
    "offload_qkv_proj_mlp_input": (*QKV_NAMES, "mlp_input"),
}
REMAT_POLICIES = ("none", *REMAT_SAVED, *REMAT_OFFLOADED, "dots_saveable")
# Platforms whose devices have a host memory space apart from their own to offload to.
OFFLOAD_PLATFORMS = ("tpu", "gpu")


def check_remat_policy(name: str) -> None:
  if name not in REMAT_POLICIES:
    raise ConfigError(f"model.remat_policy={name!r}; use one of {', '.join(REMAT_POLICIES)} "
                      "(xlingo/model/decoder.py describes each)")


def remat_policy(name: str, platform: str):
  """The ``jax.checkpoint`` policy of ``model.remat_policy`` (not 'none') for ``platform``.

  Offloading needs a host memory space apart from the device's; a CPU's device memory is host
  memory, so there the offloaded names are kept in place instead (same values, same program
  shape), and one line says so.
  """
  check_remat_policy(name)
  if name == "dots_saveable":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name in REMAT_OFFLOADED:
    if platform in OFFLOAD_PLATFORMS:
      return jax.checkpoint_policies.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=list(REMAT_OFFLOADED[name]),
          offload_src="device", offload_dst="pinned_host")
    logging.warning("model.remat_policy=%s: %s has no host memory apart from the device's; "
                    "keeping the offloaded activations on the device", name, platform)
    return jax.checkpoint_policies.save_only_these_names(*REMAT_OFFLOADED[name])
  return jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED[name])


def _kernel_init(in_axis=0, out_axis=-1):
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
  )


class RMSNorm(nn.Module):
  """RMS normalisation in float32 with a learned per-feature scale."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    scale_d = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        (x_btd.shape[-1],),
        self.param_dtype,
    )
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_d.astype(jnp.float32)).astype(self.dtype)


class SwiGluMlp(nn.Module):
  config: ml_collections.ConfigDict
  peft: peft_lib.PeftSpec | None = None

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.mlp_dim
    w_gate = self.param(
        "gate", nn.with_logical_partitioning(_kernel_init(), ("embed", "mlp")), (d, f), param_dtype
    )
    w_up = self.param(
        "up", nn.with_logical_partitioning(_kernel_init(), ("embed", "mlp")), (d, f), param_dtype
    )
    w_down = self.param(
        "down", nn.with_logical_partitioning(_kernel_init(), ("mlp", "embed")), (f, d), param_dtype
    )
    mm = functools.partial(flat_matmul, quantization=cfg.quantization)
    lora = functools.partial(peft_lib.add_lora, self, spec=self.peft, dtype=dtype,
                             param_dtype=param_dtype)
    gate_btf, up_btf = lora(x_btd, [
        ("gate", mm(x_btd, w_gate.astype(dtype)), (d, f), ("embed", "mlp")),
        ("up", mm(x_btd, w_up.astype(dtype)), (d, f), ("embed", "mlp"))])
    up_btf = checkpoint_name(up_btf, "mlp_up")  # for the remat policies that keep it
    h_btf = nn.with_logical_constraint(nn.silu(gate_btf) * up_btf, BTF)
    (out_btd,) = lora(h_btf, [("down", mm(h_btf, w_down.astype(dtype)), (f, d),
                               ("mlp", "embed"))])
    return nn.with_logical_constraint(out_btd, BTD)


class DecoderBlock(nn.Module):
  """One pre-norm transformer block. Returns ``(x, None)`` so it can be the body of nn.scan."""

  config: ml_collections.ConfigDict
  deterministic: bool = True
  decode: bool = False
  peft: peft_lib.PeftSpec | None = None

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, lang_ids_bt):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h_btd = RMSNorm(dtype, param_dtype, cfg.norm_eps, name="attn_norm")(x_btd)
    h_btd = Attention(cfg, decode=self.decode, peft=self.peft, name="attn")(
        h_btd, segment_ids_bt, positions_bt)
    h_btd = nn.Dropout(cfg.dropout_rate)(h_btd, deterministic=self.deterministic)
    x_btd = nn.with_logical_constraint(x_btd + h_btd, BTD)
    # The MLP sub-block's input, the residual stream after attention, for the remat policies
    # that keep it (REMAT_SAVED): the norm's backward needs it, so keeping the norm's output
    # instead would still replay the attention's out projection.
    x_btd = checkpoint_name(x_btd, "mlp_input")
    h_btd = RMSNorm(dtype, param_dtype, cfg.norm_eps, name="mlp_norm")(x_btd)
    h_btd = SwiGluMlp(cfg, peft=self.peft, name="mlp")(h_btd)
    if self.peft is not None and self.peft.adapter_bottleneck:
      h_btd = h_btd + peft_lib.Adapter(
          self.peft.adapter_bottleneck, self.peft.adapter_per_language, cfg.num_languages,
          dtype, param_dtype, name="adapter")(h_btd, lang_ids_bt)
    h_btd = nn.Dropout(cfg.dropout_rate)(h_btd, deterministic=self.deterministic)
    x_btd = nn.with_logical_constraint(x_btd + h_btd, BTD)
    return x_btd, None


class _BlockWithOutput(DecoderBlock):
  """A DecoderBlock that also hands its output to nn.scan as the per-layer output, so that a
  scanned stack can return an intermediate layer's hidden states (same parameters and paths)."""

  def __call__(self, *args, **kwargs):
    x_btd, _ = super().__call__(*args, **kwargs)
    return x_btd, x_btd


def layer_index(layer: int, num_layers: int) -> int:
  """``layer`` (a block index, negative from the end: -1 is the last block) as 0..L-1."""
  i = layer + num_layers if layer < 0 else layer
  if not 0 <= i < num_layers:
    raise ConfigError(f"layer {layer} does not exist in a model of {num_layers} blocks; use "
                      f"0..{num_layers - 1}, or -1 for the last")
  return i


class DecoderStack(nn.Module):
  """The blocks, scanned or unrolled, with the configured rematerialisation.

  ``upto=k`` returns the residual stream after block k (0-based) instead of after the last:
  unrolled, the later blocks are not run; scanned, every block runs (a scan has one length)
  and block k's output is taken from the scan's per-layer outputs.
  """

  config: ml_collections.ConfigDict
  peft: peft_lib.PeftSpec | None = None

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, lang_ids_bt, deterministic: bool,
               decode: bool, upto: int | None = None):
    cfg = self.config
    block_cls = DecoderBlock if upto is None or not cfg.scan_layers else _BlockWithOutput
    # Decoding computes no gradients, so remat would only cost time there.
    check_remat_policy(cfg.remat_policy)
    if cfg.remat_policy != "none" and not decode:
      # prevent_cse is only needed outside scan (scan already stops XLA from merging the
      # recomputation with the forward pass).
      block_cls = nn.remat(block_cls, policy=remat_policy(cfg.remat_policy, compile_platform()),
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
          block_cls,
          variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_btd, per_layer = stack(cfg, deterministic=deterministic, decode=decode, peft=self.peft,
                               name="layers")(x_btd, segment_ids_bt, positions_bt, lang_ids_bt)
      if upto is not None:
        x_btd = per_layer[upto]
    else:
      for i in range(cfg.num_layers if upto is None else upto + 1):
        x_btd, _ = block_cls(cfg, deterministic=deterministic, decode=decode, peft=self.peft,
                             name=f"layers_{i}")(x_btd, segment_ids_bt, positions_bt, lang_ids_bt)
    return x_btd


class DecodePosition(nn.Module):
  """Positions [1, T] of the tokens of a decoding call: a counter in the 'cache' collection
  (for ``model.bos_id``, which needs to know where position 0 is)."""

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    seen = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    positions = seen.value + jnp.arange(length, dtype=jnp.int32)[None, :]
    if not self.is_initializing():
      seen.value = seen.value + length
    return positions


# The task head's parameters (``model.task_classes``): fresh when a checkpoint lacks them.
TASK_HEAD_PARAM = re.compile(r"^task_(kernel|bias)$")


class Decoder(nn.Module):
  """Decoder-only LM. ``config`` is ``config.model`` (see ``xlingo.config.base_config``);
  ``peft`` adds LoRA, adapters or prefixes beside the parameters (``xlingo.model.peft``)."""

  config: ml_collections.ConfigDict
  peft: peft_lib.PeftSpec | None = None

  def setup(self):
    cfg = self.config
    param_dtype = jnp.dtype(cfg.param_dtype)
    d = cfg.d_model
    # Unit-variance rows: the first RMSNorm sees O(1) inputs; the tied output projection
    # divides by sqrt(d) to keep the initial logits O(1).
    self.token_embedding = self.param(
        "token_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (cfg.vocab_size, d),
        param_dtype,
    )
    if cfg.use_lang_emb:
      # Smaller than the token rows, so that at the start the language signal shifts the
      # token embedding rather than drowning it; zero for an imported model (unchanged by it).
      std = cfg.lang_emb_init_std
      self.lang_embedding = self.param(
          "lang_embedding",
          nn.with_logical_partitioning(
              nn.initializers.normal(std) if std else nn.initializers.zeros_init(),
              ("languages", "embed")),
          (cfg.num_languages, d),
          param_dtype,
      )
    if not cfg.tie_embeddings:
      self.output_kernel = self.param(
          "output_kernel",
          nn.with_logical_partitioning(_kernel_init(), ("embed", "vocab")),
          (d, cfg.vocab_size),
          param_dtype,
      )
    if cfg.lid_head:
      self.lid_kernel = self.param(
          "lid_kernel",
          nn.with_logical_partitioning(_kernel_init(), ("embed", "languages")),
          (d, cfg.num_languages),
          param_dtype,
      )
      self.lid_bias = self.param(
          "lid_bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), ("languages",)),
          (cfg.num_languages,),
          param_dtype,
      )
    if cfg.get("task_classes", 0):
      # A linear task head on pooled hidden states (xlingo.finetune's classifier head).
      self.task_kernel = self.param(
          "task_kernel", nn.with_logical_partitioning(_kernel_init(), ("embed", None)),
          (d, cfg.task_classes), param_dtype)
      self.task_bias = self.param(
          "task_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
          (cfg.task_classes,), param_dtype)
    self.embed_dropout = nn.Dropout(cfg.dropout_rate)
    self.blocks = DecoderStack(cfg, self.peft)
    self.final_norm = RMSNorm(jnp.dtype(cfg.dtype), param_dtype, cfg.norm_eps)
    if cfg.bos_id:
      self.decode_position = DecodePosition()

  def __call__(
      self,
      inputs,
      segment_ids=None,
      positions=None,
      lang_ids=None,
      *,
      deterministic: bool = True,
      decode: bool = False,
      return_hidden: bool = False,
      hidden_layer: int | None = None,
  ):
    """Runs the model on int32 ``inputs`` [B, T].

    Args:
      inputs: token ids, shifted right within each packed segment.
      segment_ids: 1.. per packed segment, 0 = padding; None means one segment per row.
      positions: position within the segment; None means 0..T-1 (or, when decoding, the
        cache index onwards).
      lang_ids: language index per token; None means language 0; :data:`UNKNOWN_LANG` (any
        negative id) means no language hint at that token. Ignored without ``use_lang_emb``.
      deterministic: False enables dropout (rng collection 'dropout').
      decode: use and update the 'cache' collection (KV cache); see ``init_cache``.
      return_hidden: return the final-norm hidden states instead of the logits, so a loss
        can project onto the vocabulary in chunks with ``logits_from_hidden``.
      hidden_layer: return only the residual stream after this block ([B, T, D], no final
        norm; negative counts from the end, -1 is the last block), e.g. for a sentence
        embedding (``xlingo.training.contrastive``).

    Returns:
      ``(logits_btv float32, lid_logits_btl float32 or None)``, or with ``return_hidden``
      ``(hidden_btd, lid_logits_btl or None)``, or with ``hidden_layer`` ``hidden_btd``.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    batch, length = inputs.shape
    if cfg.bos_id:
      inputs = self._with_bos(inputs, positions, decode)
    # Gather whole rows: like any FSDP weight, the table is all-gathered over its 'embed'
    # shards before use. Left to itself, SPMD gathers embed-sharded rows and then fully
    # replicates them to reach the batch-sharded activation layout.
    table_vd = nn.with_logical_constraint(self.token_embedding, ("vocab", None))
    x_btd = jnp.take(table_vd, inputs, axis=0).astype(dtype)
    if cfg.use_lang_emb:
      if lang_ids is None:
        lang_ids = jnp.zeros_like(inputs)
      lang_table_ld = nn.with_logical_constraint(self.lang_embedding, ("languages", None))
      lang_btd = jnp.take(lang_table_ld, jnp.maximum(lang_ids, 0), axis=0).astype(dtype)
      x_btd = x_btd + jnp.where((lang_ids >= 0)[..., None], lang_btd, 0)
    x_btd = nn.with_logical_constraint(x_btd, BTD)
    x_btd = self.embed_dropout(x_btd, deterministic=deterministic)

    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None and not decode:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if lang_ids is None:  # per-language adapters read the ids too
      lang_ids = jnp.zeros_like(inputs)
    if hidden_layer is not None:
      upto = layer_index(hidden_layer, cfg.num_layers)
      return self.blocks(x_btd, segment_ids, positions, lang_ids, deterministic, decode,
                         upto=upto)
    x_btd = self.blocks(x_btd, segment_ids, positions, lang_ids, deterministic, decode)
    hidden_btd = self.final_norm(x_btd)

    lid_logits_btl = None
    if cfg.lid_head:
      lid_logits_btl = (
          jnp.einsum(
              "btd,dl->btl",
              hidden_btd,
              self.lid_kernel.astype(dtype),
              preferred_element_type=jnp.float32,
          )
          + self.lid_bias.astype(jnp.float32)
      )
    if return_hidden:
      return hidden_btd, lid_logits_btl
    return self.logits_from_hidden(hidden_btd), lid_logits_btl

  def _with_bos(self, inputs, positions, decode: bool):
    """``inputs`` with ``model.bos_id`` at every segment's position 0: that position always
    holds the shifted-in placeholder (id 0), never a token of the text, so the swap is exact.
    Decoding passes no positions: a counter in the cache gives them."""
    if decode and positions is None:
      positions = self.decode_position(inputs.shape[1])
    elif positions is None:
      positions = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(positions == 0, jnp.int32(self.config.bos_id), inputs)

  def classify(self, pooled_bd: jax.Array) -> jax.Array:
    """The task head (``model.task_classes``): pooled hidden [..., D] -> float32 logits [..., C]."""
    return (jnp.einsum("...d,dc->...c", pooled_bd.astype(jnp.float32),
                       self.task_kernel.astype(jnp.float32))
            + self.task_bias.astype(jnp.float32))

  def logits_from_hidden(self, hidden_btd: jax.Array) -> jax.Array:
    """The output projection: hidden [..., D] → float32 logits [..., V].

    Works on any leading shape, so a loss can call it on slices of the sequence.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    hidden_btd = hidden_btd.astype(dtype)
    if cfg.tie_embeddings and cfg.tied_output_scale not in ("rsqrt_d", "none"):
      raise ConfigError(f"model.tied_output_scale={cfg.tied_output_scale!r}; use 'rsqrt_d' "
                        "(xlingo's own models) or 'none' (Hugging Face's)")
    if cfg.tie_embeddings and cfg.tied_output_scale == "none":
      kernel_dv = self.token_embedding.astype(dtype).T
    elif cfg.tie_embeddings:
      # The 1/sqrt(d) scale goes on the [..., D] hidden states rather than the [..., V]
      # logits: a D-wide multiply instead of a V-wide one, and the logits' gradient reaches
      # the two backward matmuls without an elementwise op fused into a transposed copy.
      hidden_btd = (hidden_btd.astype(jnp.float32) * cfg.d_model**-0.5).astype(dtype)
      kernel_dv = self.token_embedding.astype(dtype).T
    else:
      kernel_dv = self.output_kernel.astype(dtype)
    logits_btv = flat_matmul(hidden_btd, kernel_dv, preferred_element_type=jnp.float32)
    if logits_btv.ndim == 3:
      logits_btv = nn.with_logical_constraint(logits_btv, BTV)
    return logits_btv


def init_cache(model: Decoder, batch_size: int) -> dict:
  """A zeroed KV cache ('cache' collection) for decoding ``batch_size`` rows.

  Traced abstractly, so no parameters are materialised. Thread it through
  ``model.apply({'params': p, 'cache': c}, tok_b1, ..., decode=True, mutable=['cache'])``.
  """
  inputs = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), inputs, decode=True)["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _matmul_params_per_layer(cfg) -> int:
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attention = d * n * h + 2 * d * k * h + n * h * d
  mlp = 3 * d * f
  return attention + mlp


def param_count(model_cfg: ml_collections.ConfigDict) -> int:
  """Exact number of parameters the Decoder creates for this config."""
  cfg = model_cfg
  d = cfg.d_model
  per_layer = _matmul_params_per_layer(cfg) + 2 * d  # + the two RMSNorm scales
  if cfg.qkv_bias:
    per_layer += (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  total = cfg.vocab_size * d + cfg.num_layers * per_layer + d  # + final norm
  if cfg.use_lang_emb:
    total += cfg.num_languages * d
  if not cfg.tie_embeddings:
    total += d * cfg.vocab_size
  if cfg.lid_head:
    total += d * cfg.num_languages + cfg.num_languages
  return total


def flops_per_token(
    model_cfg: ml_collections.ConfigDict, seq_len: int, *, halve_causal: bool = True
) -> float:
  """Training FLOPs per token (forward + backward) of the model's matmuls.

  flops = 6 * N_mm + A, where

  - N_mm = num_layers * (d*n*h + 2*d*k*h + n*h*d + 3*d*mlp) + d*vocab (+ d*languages with
    the LID head): every weight that multiplies activations, the output projection included
    (tied or not); embedding lookups and norms are not matmuls and are not counted.
    6 = 2 (multiply-add) * 3 (forward, and two matmuls in the backward pass).
  - A = 12 * num_layers * (n*h) * seq_len for QK^T and AV (2 matmuls * 2 * 3), halved by
    default because a causal query attends on average to about half the keys. PaLM's MFU
    convention does not halve; pass ``halve_causal=False`` for that number. Packing makes
    the real attention work smaller still (segments are shorter than rows); that is not
    modelled: the kernels compute full causal rows anyway.
  """
  cfg = model_cfg
  n_mm = cfg.num_layers * _matmul_params_per_layer(cfg) + cfg.d_model * cfg.vocab_size
  if cfg.lid_head:
    n_mm += cfg.d_model * cfg.num_languages
  attention = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  if halve_causal:
    attention /= 2.0
  return 6.0 * n_mm + attention
