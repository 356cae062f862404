"""The decoder: shapes, causality, packing, KV cache, language embeddings, scan, LID, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from xlingo.model import attention as attention_lib
from xlingo.model import decoder as decoder_lib
from xlingo.model.decoder import Decoder

# Tests compile many small programs on 2 CPU cores; LLVM optimisation would cost more than
# these programs ever run. Numerics are unchanged (the comparisons hold at tight tolerances).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
B, T = 2, 12


def _model_cfg(**overrides):
  cfg = tiny.get_config().model
  cfg.update(overrides)
  return cfg


def _init(model, seq_len=T):
  inputs = jnp.zeros((1, seq_len), jnp.int32)
  return fast_jit(lambda r: nn.unbox(model.init(r, inputs))["params"])(jax.random.PRNGKey(0))


def _numpy_params(model, seed=0):
  """Random params of the right shapes without compiling the init (slow on 2 CPU cores)."""
  abstract = jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  )["params"]
  rng = np.random.default_rng(seed)
  scale = model.config.d_model**-0.5

  def fill(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


class Setup:
  """One tiny model, its params and a jitted forward pass shared by the tests."""

  def __init__(self, real_init=True, **overrides):
    self.cfg = _model_cfg(**overrides)
    self.model = Decoder(self.cfg)
    self.params = _init(self.model) if real_init else _numpy_params(self.model)
    self._apply = fast_jit(
        lambda p, inputs, seg, pos, lang: self.model.apply({"params": p}, inputs, seg, pos, lang)
    )

  def __call__(self, inputs, segment_ids=None, positions=None, lang_ids=None, params=None):
    segment_ids = jnp.ones_like(inputs) if segment_ids is None else segment_ids
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    lang_ids = jnp.zeros_like(inputs) if lang_ids is None else lang_ids
    return self._apply(
        self.params if params is None else params, inputs, segment_ids, positions, lang_ids
    )


@pytest.fixture(scope="module")
def base():
  return Setup()


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (B, T), 1, 8192, dtype=jnp.int32)


def test_output_shapes_and_hidden(base, tokens):
  logits, lid = base(tokens)
  assert logits.shape == (B, T, base.cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert lid is None
  hidden, _ = fast_jit(lambda p, x: base.model.apply({"params": p}, x, return_hidden=True))(
      base.params, tokens
  )
  assert hidden.shape == (B, T, base.cfg.d_model)
  again = fast_jit(
      lambda p, h: base.model.apply({"params": p}, h, method=Decoder.logits_from_hidden)
  )(base.params, hidden)
  np.testing.assert_allclose(again, logits, atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()


def test_causal(base, tokens):
  logits, _ = base(tokens)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 8192)
  logits2, _ = base(changed)
  np.testing.assert_allclose(logits2[:, :7], logits[:, :7], atol=1e-6)
  assert np.abs(np.asarray(logits2[:, 7:] - logits[:, 7:])).max() > 1e-3


def test_segment_masking(base, tokens):
  # Row 0 packs a 5-token and a 7-token document; segment 2 must not see segment 1.
  seg = jnp.array([[1] * 5 + [2] * 7] * B, jnp.int32)
  pos = jnp.array([list(range(5)) + list(range(7))] * B, jnp.int32)
  packed, _ = base(tokens, seg, pos)
  # The second document alone at the start of a row, followed by padding (segment 0).
  alone_tokens = jnp.concatenate([tokens[:, 5:], jnp.zeros((B, 5), jnp.int32)], axis=1)
  alone_seg = jnp.array([[1] * 7 + [0] * 5] * B, jnp.int32)
  alone_pos = jnp.array([list(range(7)) + [0] * 5] * B, jnp.int32)
  alone, _ = base(alone_tokens, alone_seg, alone_pos)
  np.testing.assert_allclose(packed[:, 5:], alone[:, :7], atol=1e-4, rtol=1e-4)


def test_kv_cache_matches_full_forward(base, tokens):
  full, _ = base(tokens)
  cache = decoder_lib.init_cache(base.model, B)
  assert int(jax.tree.leaves(cache)[0].sum()) == 0

  @fast_jit
  def step(cache, tok):
    (logits, _), mutated = base.model.apply(
        {"params": base.params, "cache": cache}, tok, decode=True, mutable=["cache"]
    )
    return logits, mutated["cache"]

  # A 5-token prefill, then one token at a time.
  logits, cache = step(cache, tokens[:, :5])
  outs = [logits]
  for i in range(5, T):
    logits, cache = step(cache, tokens[:, i : i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4, rtol=1e-4)
  # The last step really read the cache: on an empty cache it gives other logits.
  alone, _ = step(decoder_lib.init_cache(base.model, B), tokens[:, T - 1 :])
  assert np.abs(np.asarray(alone - full[:, T - 1 :])).max() > 1e-3


def test_language_embedding_changes_output(base, tokens):
  logits_en, _ = base(tokens, lang_ids=jnp.zeros_like(tokens))
  logits_de, _ = base(tokens, lang_ids=jnp.ones_like(tokens))
  assert np.abs(np.asarray(logits_en - logits_de)).max() > 1e-3
  assert base.params["lang_embedding"].shape == (base.cfg.num_languages, base.cfg.d_model)


@pytest.fixture(scope="module")
def variant():
  """No language embedding, untied output, LID head, dropout, unrolled layers with remat."""
  return Setup(
      real_init=False, use_lang_emb=False, tie_embeddings=False, lid_head=True, scan_layers=False,
      remat_policy="full", dropout_rate=0.5,
  )


def test_no_language_embedding_ignores_lang_ids(variant, tokens):
  assert "lang_embedding" not in variant.params
  a, _ = variant(tokens, lang_ids=jnp.zeros_like(tokens))
  b, _ = variant(tokens, lang_ids=jnp.full_like(tokens, 3))
  np.testing.assert_array_equal(a, b)


def test_lid_head_and_untied_output(variant, tokens):
  logits, lid = variant(tokens)
  assert lid.shape == (B, T, variant.cfg.num_languages)
  assert lid.dtype == jnp.float32
  assert variant.params["output_kernel"].shape == (variant.cfg.d_model, variant.cfg.vocab_size)
  n = sum(x.size for x in jax.tree.leaves(variant.params))
  assert n == decoder_lib.param_count(variant.cfg)


def test_dropout_needs_rng_and_changes_output(variant, tokens):
  det, _ = variant(tokens)
  drop, _ = fast_jit(
      lambda p, x, r: variant.model.apply(
          {"params": p}, x, deterministic=False, rngs={"dropout": r}
      )
  )(variant.params, tokens, jax.random.PRNGKey(3))
  assert np.abs(np.asarray(det - drop)).max() > 1e-3


def test_scan_and_unrolled_layers_agree(base, tokens):
  unrolled = Decoder(_model_cfg(scan_layers=False))
  abstract = jax.eval_shape(
      lambda: nn.unbox(unrolled.init(jax.random.PRNGKey(0), tokens))["params"]
  )
  scanned_blocks = base.params["blocks"]["layers"]
  assert sorted(abstract["blocks"]) == [f"layers_{i}" for i in range(base.cfg.num_layers)]
  n_scanned = sum(x.size for x in jax.tree.leaves(base.params))
  n_unrolled = sum(x.size for x in jax.tree.leaves(abstract))
  assert n_scanned == n_unrolled == decoder_lib.param_count(base.cfg)
  # Same per-layer structure: unstacking the scanned params runs the unrolled model.
  params = dict(base.params)
  params["blocks"] = {
      f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], scanned_blocks)
      for i in range(base.cfg.num_layers)
  }
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  want, _ = base(tokens)
  got, _ = fast_jit(unrolled.apply)({"params": params}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_grouped_query_attention_equals_repeated_kv(base, tokens):
  # GQA with K kv-heads is MHA whose kv-heads repeat each group's head.
  assert base.cfg.num_kv_heads < base.cfg.num_heads
  mha = Decoder(_model_cfg(num_kv_heads=base.cfg.num_heads))
  group = base.cfg.num_heads // base.cfg.num_kv_heads
  params = jax.tree.map(lambda x: x, base.params)
  attn = dict(params["blocks"]["layers"]["attn"])
  for name in ("key", "value"):
    attn[name] = jnp.repeat(attn[name], group, axis=2)  # [layers, d, k, h] → [layers, d, n, h]
  params["blocks"]["layers"]["attn"] = attn
  want, _ = base(tokens)
  got, _ = fast_jit(mha.apply)({"params": params}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _attention_case(num_kv_heads, seed):
  """q [2, 10, 4, 8], k/v with ``num_kv_heads`` heads, a cotangent like q, and a packed mask
  (two segments in row 0; a segment and padding in row 1)."""
  b, t, n, h = 2, 10, 4, 8
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, num_kv_heads, h))
  v = jax.random.normal(keys[2], (b, t, num_kv_heads, h))
  cotangent = jax.random.normal(keys[3], (b, t, n, h))
  mask = attention_lib.segment_mask(jnp.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3]))
  return q, k, v, cotangent, mask


def _xla_attention(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_plain_attention_matches_dot_product_attention(num_kv_heads):
  # attention_impl 'plain' (the CPU default) against jax.nn.dot_product_attention's XLA path,
  # packed segments + causal, multi-head and grouped-query.
  q, k, v, _, mask = _attention_case(num_kv_heads, seed=0)
  got = fast_jit(attention_lib.plain_attention, static_argnums=4)(q, k, v, mask, True)
  np.testing.assert_allclose(got, _xla_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_plain_attention_gradient_matches_autodiff_of_xla_path(num_kv_heads):
  # plain_attention's hand-written backward pass against autodiff of the XLA path.
  q, k, v, cotangent, mask = _attention_case(num_kv_heads, seed=1)

  def grads(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask) * cotangent)
    return fast_jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  got = grads(lambda q, k, v, m: attention_lib.plain_attention(q, k, v, m, True))
  for g, r in zip(got, grads(_xla_attention)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_flat_matmul_equals_einsum():
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(keys[0], (2, 3, 4, 5))
  w1 = jax.random.normal(keys[1], (5, 6, 7))
  w2 = jax.random.normal(keys[2], (4, 5, 6))
  np.testing.assert_allclose(attention_lib.flat_matmul(x, w1),
                             jnp.einsum("abcd,def->abcef", x, w1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(attention_lib.flat_matmul(x, w2, contract=2),
                             jnp.einsum("abcd,cde->abe", x, w2), atol=1e-5, rtol=1e-5)


def test_flops_per_token_matches_explicit_count():
  cfg = _model_cfg(lid_head=True, tie_embeddings=False)
  seq_len = 64
  abstract = jax.eval_shape(
      lambda: nn.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  )["params"]
  flat = jax.tree_util.tree_leaves_with_path(abstract)
  matmul_names = {"query", "key", "value", "out", "gate", "up", "down", "output_kernel",
                  "lid_kernel"}
  n_matmul = sum(leaf.size for path, leaf in flat if path[-1].key in matmul_names)
  # Causal attention: query i scores against i + 1 keys and mixes i + 1 values.
  keys_per_query = np.mean(np.arange(1, seq_len + 1))
  d_attn = cfg.num_heads * cfg.head_dim
  attention = cfg.num_layers * 3 * (2 * 2 * d_attn * keys_per_query)
  explicit = 6 * n_matmul + attention
  got = decoder_lib.flops_per_token(cfg, seq_len)
  # The formula counts seq_len / 2 keys per query, the explicit sum (seq_len + 1) / 2.
  assert abs(got - explicit) / explicit < 1e-2
  unhalved = decoder_lib.flops_per_token(cfg, seq_len, halve_causal=False)
  assert unhalved - got == pytest.approx(6 * cfg.num_layers * d_attn * seq_len)
