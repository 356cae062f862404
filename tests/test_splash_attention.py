"""Splash attention (the TPU path) in Pallas' interpret mode on CPU: forward and gradients equal
the plain path on packed rows with grouped-query heads, alone and under a mesh with tensor > 1;
'auto' resolves from the mesh's devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from xlingo import sharding
from xlingo.model import attention
from xlingo.model import decoder as decoder_lib


def _qkv_seg(b, t, n, kh, h, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, heads, h)), jnp.float32)
             for heads in (n, kh, kh))
  seg = np.ones((b, t), np.int32)
  seg[:, t // 3:] = 2  # packed rows: two documents...
  seg[:, t // 2:] = 3  # ...three
  seg[-1, t - t // 4:] = 0  # and padding at the end of the last row
  return q, k, v, jnp.asarray(seg)


def _value_and_grads(attend, q, k, v, seg):
  # A nonlinear readout, so the gradients depend on every output value.
  f = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, seg)))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def _plain(q, k, v, seg):
  return attention.plain_attention(q, k, v, attention.segment_mask(seg), is_causal=True)


def _assert_close(got, want):
  (gv, gg), (wv, wg) = got, want
  np.testing.assert_allclose(gv, wv, rtol=1e-5)
  for a, b in zip(gg, wg):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("length", [128, 384])
def test_splash_equals_plain_packed_gqa(length):
  q, k, v, seg = _qkv_seg(2, length, 4, 2, 16)
  _assert_close(_value_and_grads(attention.splash_attention, q, k, v, seg),
                _value_and_grads(_plain, q, k, v, seg))


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_splash_sharded_over_tensor_equals_plain(num_kv_heads):
  """8 devices as data 2 x fsdp 2 x tensor 2: rows split 4 ways, heads 2 ways (one K/V head
  cannot be split over tensor=2, so it is repeated)."""
  cfg = tiny.get_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_rules(cfg.mesh)
  q, k, v, seg = _qkv_seg(4, 256, 4, num_kv_heads, 16, seed=1)
  with sharding.mesh_context(mesh, rules):
    row = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    got = _value_and_grads(attention.splash_attention,
                           *(jax.device_put(x, row) for x in (q, k, v, seg)))
    hlo = jax.jit(attention.splash_attention).lower(q, k, v, seg).as_text()
  _assert_close(got, _value_and_grads(_plain, q, k, v, seg))
  # The kernel ran per device: one shard_map whose blocks hold [rows/4, heads/2, T, H].
  assert "shard_map" in hlo or "sdy.manual_computation" in hlo
  assert "tensor<1x2x256x16xf32>" in hlo


def test_decoder_with_splash_equals_plain():
  """The whole model, forward and parameter gradients, with 'splash' vs 'plain' attention."""
  c = tiny.get_config()
  c.model.max_len = c.data.seq_len = 128
  q, _, _, seg = _qkv_seg(2, 128, 1, 1, 1, seed=2)
  tokens = jnp.asarray(np.random.default_rng(3).integers(1, 100, (2, 128)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32), (2, 128))

  def loss_and_grads(impl):
    c.model.attention_impl = impl
    model = decoder_lib.Decoder(c.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])

    def f(p):
      logits, _ = model.apply({"params": p}, tokens, seg, positions)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    return jax.jit(jax.value_and_grad(f))(params)

  want_v, want_g = loss_and_grads("plain")
  got_v, got_g = loss_and_grads("splash")
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), got_g, want_g)


def test_auto_resolves_from_the_mesh_devices():
  assert attention.choose_implementation("auto", jnp.bfloat16, 128, platform="tpu") == "splash"
  assert attention.choose_implementation("auto", jnp.bfloat16, 128, platform="gpu") == "cudnn"
  assert attention.choose_implementation("auto", jnp.float32, 128, platform="gpu") == "xla"
  assert attention.choose_implementation("auto", jnp.bfloat16, 128, platform="cpu") == "plain"
  assert attention.choose_implementation("splash", jnp.float32, 16, platform="cpu") == "splash"
  cfg = tiny.get_config()
  with sharding.mesh_context(sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)):
    assert attention.compile_platform() == "cpu"


def test_splash_block_sizes_divide_the_row():
  assert attention.splash_block_size(2048) == 512
  assert attention.splash_block_size(384) == 384
  assert attention.splash_block_size(640) == 128
  assert attention.splash_block_size(128) == 128
  assert not attention.splash_supported(64) and not attention.splash_supported(200)
