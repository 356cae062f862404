"""The chunked losses equal the full-logits ones (values and gradients), through the real model,
the LM objective (z-loss, per-language sums) and distillation (full and top-k KL)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import distill_tiny, tiny
from xlingo import distill
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import losses, step


def _batch(b, t, vocab, num_langs, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 3:] = 2  # two packed documents per row
  seg[0, -5:] = 0  # padding
  pos = np.concatenate([np.arange(t // 3), np.arange(t - t // 3)])[None].repeat(b, 0)
  weights = (seg > 0).astype(np.float32)
  weights[1, :4] = 0  # a targets-only row: no loss on its "source"
  return {"inputs": rng.integers(1, vocab, (b, t)).astype(np.int32),
          "targets": rng.integers(1, vocab, (b, t)).astype(np.int32),
          "segment_ids": seg, "positions": pos.astype(np.int32),
          "lang_ids": rng.integers(0, num_langs, (b, t)).astype(np.int32),
          "loss_weights": weights}


def _model(cfg):
  model = decoder_lib.Decoder(cfg.model)
  b = _batch(2, 8, cfg.model.vocab_size, cfg.model.num_languages)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), b["inputs"])["params"])
  return model, params


def _config(chunk, z_loss=1e-3):
  c = tiny.get_config()
  c.model.vocab_size = 512  # small enough that the test is fast, large enough to matter
  c.model.lid_head = True
  c.train.lid_loss_weight = 0.1
  c.train.z_loss = z_loss
  c.train.loss_chunk_size = chunk
  return c


@pytest.mark.parametrize("chunk", [16, 32])
def test_lm_loss_and_grads_equal_unchunked(chunk):
  full_cfg, chunk_cfg = _config(0), _config(chunk)
  model, params = _model(full_cfg)
  batch = jax.tree.map(jnp.asarray, _batch(4, 64, 512, full_cfg.model.num_languages))
  byte_table = jnp.arange(512, dtype=jnp.float32) % 5 + 1

  def loss_and_sums(cfg):
    objective = step.lm_objective(cfg, model)

    def f(p):
      total, aux = objective.loss(p, batch, jax.random.PRNGKey(0), deterministic=True)
      return total, step._sums(aux, batch, byte_table, cfg.model.num_languages)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (want, want_sums), want_g = loss_and_sums(full_cfg)
  (got, got_sums), got_g = loss_and_sums(chunk_cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in want_sums:
    np.testing.assert_allclose(got_sums[k], want_sums[k], rtol=1e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got_g, want_g)


def test_chunked_cross_entropy_keeps_no_full_logits():
  """The chunked step's program holds no [B, T, V] float32 array; the unchunked one does."""
  b, t, d, v = 2, 64, 16, 256
  w_dv = jax.random.normal(jax.random.PRNGKey(0), (d, v))
  h = jax.random.normal(jax.random.PRNGKey(1), (b, t, d))
  tgt = jnp.zeros((b, t), jnp.int32)
  wts = jnp.ones((b, t))

  def hlo(chunk):
    def f(w, h):
      return losses.chunked_cross_entropy(lambda x: x @ w, h, tgt, wts, 1e-4, chunk)[0]
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(w_dv, h).compile().as_text()

  assert f"f32[{b},{t},{v}]" in hlo(0)
  chunked = hlo(16)
  assert f"f32[{b},{t},{v}]" not in chunked and f"f32[{b},16,{v}]" in chunked


def test_chunk_size_must_divide_the_sequence():
  h = jnp.zeros((1, 10, 4))
  with pytest.raises(ConfigError, match="loss_chunk_size=4 does not divide"):
    losses.chunked_cross_entropy(lambda x: x, h, jnp.zeros((1, 10), jnp.int32),
                                 jnp.ones((1, 10)), 0.0, 4)


@pytest.mark.parametrize("top_k", [0, 7])
def test_distill_loss_and_grads_equal_unchunked(top_k):
  cfg = distill_tiny.get_config()
  cfg.model = _config(0).model
  cfg.train.z_loss = 1e-3
  cfg.distill.top_k = top_k
  cfg.distill.schedule = "linear"
  student, sparams = _model(cfg)
  tcfg = _config(0)
  tcfg.model.d_model, tcfg.model.num_layers = 32, 1  # a teacher of another shape
  teacher, tparams = _model(tcfg)
  batch = jax.tree.map(jnp.asarray, _batch(4, 64, 512, cfg.model.num_languages, seed=1))

  def run(chunk):
    cfg.train.loss_chunk_size = chunk
    objective = distill.distill_objective(cfg, student, teacher, tparams)

    def f(p):
      return objective.loss(p, batch, jax.random.PRNGKey(0), deterministic=True,
                            step=jnp.int32(3))

    return jax.jit(jax.value_and_grad(f, has_aux=True))(sparams)

  (want, want_aux), want_g = run(0)
  (got, got_aux), got_g = run(16)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in ("kl_sum", "ce_sum"):
    np.testing.assert_allclose(got_aux[k], want_aux[k], rtol=1e-5)
  for k in ("loss", "kl"):
    np.testing.assert_allclose(got_aux["per_token"][k], want_aux["per_token"][k], rtol=1e-4,
                               atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got_g, want_g)


def test_step_batch_features_are_the_data_layers():
  from xlingo.data import packing

  assert step.BATCH_FEATURES == packing.FEATURES
