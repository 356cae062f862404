"""The objectives of the shared LM loss: contrastive alignment (InfoNCE against NumPy, the same
on 1 and 8 devices, the pair stream and its exact resume), language hints hidden per example
with the language-ID loss taken there, and per-language loss weights (exact gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from xlingo import sharding
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import contrastive, hooks, loop, losses, step, terms

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
VOCAB = 512
P, MAXLEN = 8, 12


def _config(**train):
  c = tiny.get_config()
  c.model.vocab_size = VOCAB
  for k, v in train.items():
    c.train[k] = v
  return c


def _random_params(model, seed=0):
  abstract = jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    return rng.normal(0.0, 0.3, leaf.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _lm_batch(b, t, num_langs, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 3:] = 2
  seg[:, 2 * t // 3:] = 3
  seg[0, -3:] = 0
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    for s in (1, 2, 3):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  weights = (seg > 0).astype(np.float32)
  weights[1, :3] = 0.0
  langs = np.repeat(rng.integers(0, num_langs, (b, 3)), [t // 3, 2 * t // 3 - t // 3,
                                                          t - 2 * t // 3], axis=1)
  return {"inputs": rng.integers(2, VOCAB, (b, t)).astype(np.int32),
          "targets": rng.integers(2, VOCAB, (b, t)).astype(np.int32),
          "segment_ids": seg, "positions": pos, "lang_ids": langs.astype(np.int32),
          "loss_weights": weights}


def _pair_batch(p=P, n=MAXLEN, seed=1):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, n, (p, 2)).astype(np.int32)
  inputs = np.zeros((p, 2, n), np.int32)
  for i in range(p):
    for j in range(2):
      inputs[i, j, 1:1 + lengths[i, j]] = rng.integers(2, VOCAB, lengths[i, j])
  keys = np.arange(2 * p, dtype=np.int32).reshape(p, 2)
  keys[3, 0] = keys[1, 0]  # pairs 1 and 3 share their source text: not each other's negative
  return {"pair_inputs": inputs, "pair_lengths": lengths,
          "pair_lang_ids": np.tile(np.array([[0, 1]], np.int32), (p, 1)), "pair_keys": keys}


# --- InfoNCE --------------------------------------------------------------------------------


def _numpy_info_nce(src, tgt, tau, ks, kt):
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  logits = unit(src.astype(np.float64)) @ unit(tgt.astype(np.float64)).T / tau
  p = len(src)
  excluded = ((ks[:, None] == ks[None]) | (kt[:, None] == kt[None])) & ~np.eye(p, dtype=bool)
  rows = cols = 0.0
  for i in range(p):
    r = np.where(excluded[i], -np.inf, logits[i])
    c = np.where(excluded[:, i], -np.inf, logits[:, i])
    rows += np.log(np.sum(np.exp(r))) - logits[i, i]
    cols += np.log(np.sum(np.exp(c))) - logits[i, i]
  return 0.5 * (rows + cols) / p


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  src, tgt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  tgt[2] = src[2] * 3.0  # a perfect pair: scale does not matter (cosine)
  ks = np.array([10, 11, 12, 11, 14, 15])  # rows 1 and 3: the same source text
  kt = np.arange(6) + 20
  for tau in (0.05, 1.0):
    got, acc = losses.info_nce(jnp.asarray(src), jnp.asarray(tgt), tau, jnp.asarray(ks),
                               jnp.asarray(kt))
    np.testing.assert_allclose(float(got), _numpy_info_nce(src, tgt, tau, ks, kt), rtol=2e-5)
    assert 0.0 <= float(acc) <= 1.0
  # Without the keys every other pair is a negative: a larger loss here.
  plain, _ = losses.info_nce(jnp.asarray(src), jnp.asarray(tgt), 0.05)
  unmasked = _numpy_info_nce(src, tgt, 0.05, np.arange(6), np.arange(6) + 20)
  np.testing.assert_allclose(float(plain), unmasked, rtol=2e-5)


def test_retrieval_accuracy_counts_both_directions_and_duplicates():
  src = np.eye(4)
  tgt = np.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 swapped: wrong unless their texts are the same
  keys_s, keys_t = np.arange(4), np.arange(4) + 10
  assert contrastive.retrieval_accuracy(src, tgt, keys_s, keys_t) == (0.5, 0.5)
  keys_t = np.array([10, 11, 12, 12])  # targets 2 and 3 are the same sentence
  s2t, t2s = contrastive.retrieval_accuracy(src, tgt, keys_s, keys_t)
  assert s2t == 1.0 and t2s == 0.5


# --- the contrastive term on the mesh -------------------------------------------------------


def _contrastive_config(**kw):
  c = _config()
  c.train.contrastive.weight = 0.5
  c.train.contrastive.pairs = ("en-de",)
  c.train.contrastive.max_len = MAXLEN
  c.train.contrastive.temperature = 0.1
  for k, v in kw.items():
    c.train.contrastive[k] = v
  return c


def _loss_and_grads(config, params, batch, mesh_cfg):
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.data * mesh_cfg.fsdp])
  rules = sharding.logical_rules(config.mesh)
  model = decoder_lib.Decoder(config.model)
  boxed = sharding.abstract_params(model, config.model, 8)
  p_sh = sharding.param_shardings(boxed, mesh, rules)
  b_sh = sharding.batch_sharding(mesh)
  objective = step.lm_objective(config, model)

  def f(p, b):
    total, aux = objective.loss(p, b, jax.random.PRNGKey(0), deterministic=True)
    return total, aux["contrastive_loss_sum"]

  with sharding.mesh_context(mesh, rules):
    placed = jax.device_put(params, p_sh)
    gbatch = {k: jax.device_put(v, b_sh) for k, v in batch.items()}
    (total, c_sum), grads = fast_jit(jax.value_and_grad(f, has_aux=True))(placed, gbatch)
  return float(total), float(c_sum), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("layer,pooling,scan", [(-1, "mean", True), (0, "last", False)])
def test_contrastive_same_on_1_and_8_devices(layer, pooling, scan):
  """The global batch's pairs are the negatives however the batch and parameters are split
  (data x fsdp), and the loss equals InfoNCE of the pooled states computed apart."""
  import ml_collections

  config = _contrastive_config(layer=layer, pooling=pooling)
  config.model.scan_layers = scan
  model = decoder_lib.Decoder(config.model)
  params = _random_params(model)
  batch = {**_lm_batch(P, 24, 9), **_pair_batch()}
  one = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  eight = ml_collections.ConfigDict({"data": 2, "fsdp": 4, "tensor": 1})
  t1, c1, g1 = _loss_and_grads(config, params, batch, one)
  t8, c8, g8 = _loss_and_grads(config, params, batch, eight)
  np.testing.assert_allclose(t8, t1, rtol=1e-5)
  np.testing.assert_allclose(c8, c1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5)
  # The contrastive term is InfoNCE of the pooled states (computed here without the step).
  term = contrastive.Contrastive.from_config(config, model)
  z = np.asarray(term.embed(params, jax.tree.map(jnp.asarray, batch)), np.float64)
  want = _numpy_info_nce(z[:, 0], z[:, 1], 0.1, batch["pair_keys"][:, 0],
                         batch["pair_keys"][:, 1])
  n_tok = batch["loss_weights"].sum()
  np.testing.assert_allclose(c1 / n_tok, want, rtol=1e-4)
  # The pooled state is the chosen block's output: a sentence's "last" state does not change
  # when tokens are appended after it (causal), and mean pooling uses positions 1..n only.
  if pooling == "last":
    longer = jax.tree.map(np.copy, batch)
    longer["pair_inputs"][0, 0, longer["pair_lengths"][0, 0] + 1:] = 7
    z2 = np.asarray(term.embed(params, longer))
    np.testing.assert_allclose(z2[0, 0], z[0, 0], rtol=1e-5, atol=1e-6)


def test_retrieval_embeds_pairs_as_the_term_pools_them():
  """Validation's pooled states are the contrastive term's own (its bound layer and pooling),
  embedded directly on the mesh, with no LM batch beside the pairs."""
  import ml_collections

  config = _contrastive_config(layer=0, pooling="last")
  model = decoder_lib.Decoder(config.model)
  params = _random_params(model)
  batch = jax.tree.map(jnp.asarray, _pair_batch())
  (retrieval,) = step.lm_objective(config, model).evaluators()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4, "tensor": 1}))
  with sharding.mesh_context(mesh, sharding.logical_rules(config.mesh)):
    got = jax.jit(retrieval.term.embed)(params, batch)
  want = contrastive.pair_embeddings(model, params, batch, 0, "last")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  plain = contrastive.pair_embeddings(model, params, batch, -1, "mean")
  assert not np.allclose(np.asarray(plain), np.asarray(want), atol=1e-2)


def test_hidden_layer_scanned_equals_unrolled_and_final_norm():
  cfg = _config().model
  scanned = decoder_lib.Decoder(cfg)
  params = _random_params(scanned)
  unrolled_cfg = _config().model
  unrolled_cfg.scan_layers = False
  unrolled = decoder_lib.Decoder(unrolled_cfg)
  u_params = {k: v for k, v in params.items() if k != "blocks"}
  u_params["blocks"] = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]["layers"])
                        for i in range(cfg.num_layers)}
  x = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (2, 10)), jnp.int32)

  def hidden(model, p, layer):
    return fast_jit(lambda p, x: model.apply({"params": p}, x, hidden_layer=layer))(p, x)

  for layer in (0, 1, -1):
    np.testing.assert_allclose(np.asarray(hidden(scanned, params, layer)),
                               np.asarray(hidden(unrolled, u_params, layer)), rtol=1e-4, atol=1e-4)
  final, _ = fast_jit(lambda p, x: scanned.apply({"params": p}, x, return_hidden=True))(params, x)
  last = hidden(scanned, params, -1)
  normed = scanned.apply({"params": params}, last, method=lambda m, h: m.final_norm(h))
  np.testing.assert_allclose(np.asarray(final), np.asarray(normed), rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="layer 2 does not exist"):
    scanned.apply({"params": params}, x, hidden_layer=2)


# --- language hints and the language-ID loss -------------------------------------------------


def test_unknown_language_is_the_zero_language_vector():
  cfg = _config().model
  model = decoder_lib.Decoder(cfg)
  params = _random_params(model)
  x = jnp.asarray(np.random.default_rng(0).integers(2, VOCAB, (2, 8)), jnp.int32)
  unknown = jnp.full_like(x, decoder_lib.UNKNOWN_LANG)
  got, _ = model.apply({"params": params}, x, None, None, unknown)
  zeroed = {**params, "lang_embedding": np.zeros_like(params["lang_embedding"])}
  want, _ = model.apply({"params": zeroed}, x, None, None, jnp.zeros_like(x) + 3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  hinted, _ = model.apply({"params": params}, x, None, None, jnp.zeros_like(x) + 3)
  assert not np.allclose(np.asarray(hinted), np.asarray(got))


def test_hints_hidden_per_example_at_the_rate():
  config = _config()
  config.model.lang_emb_dropout = 0.3
  batch = _lm_batch(64, 24, 9)
  hints = terms.Hints.from_config(config)
  ids, hidden = hints.hide(batch, jax.random.PRNGKey(0), deterministic=False)
  ids, hidden = np.asarray(ids), np.asarray(hidden)
  seg = batch["segment_ids"]
  for r in range(seg.shape[0]):
    for s in (1, 2, 3):
      h = hidden[r, seg[r] == s]
      assert h.min() == h.max()  # a whole example, or none of it
  real = seg > 0
  np.testing.assert_array_equal(ids[real & (hidden > 0)], decoder_lib.UNKNOWN_LANG)
  np.testing.assert_array_equal(ids[hidden == 0], batch["lang_ids"][hidden == 0])
  per_example = np.array([hidden[r, seg[r] == s][0] for r in range(64) for s in (1, 2, 3)])
  assert 0.2 < per_example.mean() < 0.4
  # Evaluation gives every hint; without language embeddings no token has one.
  ids_e, hidden_e = hints.hide(batch, jax.random.PRNGKey(0), deterministic=True)
  assert hidden_e is None and np.array_equal(np.asarray(ids_e), batch["lang_ids"])
  config.model.use_lang_emb = False
  config.model.lang_emb_dropout = 0.0
  _, none = terms.Hints.from_config(config).hide(batch, jax.random.PRNGKey(0), False)
  assert np.asarray(none).min() == 1.0


def test_lid_loss_is_taken_only_where_the_hint_is_hidden():
  config = _config(lid_loss_weight=1.0)
  config.model.lid_head = True
  config.model.lang_emb_dropout = 0.5
  model = decoder_lib.Decoder(config.model)
  params = _random_params(model)
  batch = jax.tree.map(jnp.asarray, _lm_batch(8, 24, 9))
  rng = jax.random.PRNGKey(3)
  _, aux = step.lm_objective(config, model).loss(params, batch, rng, deterministic=False)
  ids, hidden = terms.Hints.from_config(config).hide(batch, jax.random.fold_in(rng, 1), False)
  _, lid_logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                              batch["positions"], ids)
  w = np.asarray(batch["loss_weights"]) * np.asarray(hidden)
  logp = jax.nn.log_softmax(np.asarray(lid_logits), axis=-1)
  ce = -np.take_along_axis(np.asarray(logp), np.asarray(batch["lang_ids"])[..., None], -1)[..., 0]
  want = (ce * w).sum() / w.sum()
  n_tok = float(np.asarray(batch["loss_weights"]).sum())
  np.testing.assert_allclose(float(aux["lid_loss_sum"]) / n_tok, want, rtol=1e-4)


def test_eval_reports_lid_accuracy_and_bpb_without_hints():
  config = _config()
  config.model.lid_head = True
  model = decoder_lib.Decoder(config.model)
  params = _random_params(model)
  batch = jax.tree.map(jnp.asarray, _lm_batch(4, 24, 9))
  byte_table = jnp.ones((VOCAB,), jnp.float32)
  sums = step.make_eval_step(step.lm_objective(config, model), byte_table, 9)(params, batch, {})
  out = hooks.language_scalars(jax.device_get(sums), config.data.languages, prefix="val/")
  assert 0.0 <= out["val/lid_acc"] <= 1.0 and "val/bpb_nohint" in out
  _, lid = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                       batch["positions"], jnp.full_like(batch["lang_ids"], -1))
  w = np.asarray(batch["loss_weights"])
  correct = (np.argmax(np.asarray(lid), -1) == np.asarray(batch["lang_ids"])) * w
  np.testing.assert_allclose(out["val/lid_acc"], correct.sum() / w.sum(), rtol=1e-6)


def _expect_config_error(config, match):
  with pytest.raises(ConfigError, match=match) as e:
    loop.validate_config(config)
  assert "\n" not in str(e.value)


def test_config_refuses_lid_loss_that_reads_the_hint_and_other_misuses():
  c = _config(lid_loss_weight=0.1)
  c.model.lid_head = True
  _expect_config_error(c, "lang_emb_dropout=0 teaches nothing")
  c.model.lang_emb_dropout = 0.2
  loop.validate_config(c)  # hidden hints: fine
  c.model.use_lang_emb = False
  _expect_config_error(c, "no hint to hide")
  c.model.lang_emb_dropout = 0.0
  loop.validate_config(c)  # no language embedding: every token is hint-free
  c.model.lid_head = False
  _expect_config_error(c, "needs the language-ID head")
  c = _config()
  c.model.lang_emb_dropout = 1.5
  _expect_config_error(c, r"must be in \[0, 1\]")


# --- per-language loss weights ------------------------------------------------------------


def test_loss_weights_scale_each_language_exactly():
  """Weighted loss = sum over languages of weight x that language's loss; gradients too.
  The per-token values (per-language metrics) stay unweighted."""
  weights = {"de": 0.25, "ru": 3.0}
  config = _config(z_loss=1e-3, main_language="en", main_language_weight=2.0)
  for k, v in weights.items():
    config.train.loss_weights[k] = v
  loop.validate_config(config)
  plain = _config(z_loss=1e-3)
  model = decoder_lib.Decoder(config.model)
  params = _random_params(model)
  batch = jax.tree.map(jnp.asarray, _lm_batch(8, 24, 9))
  codes = config.data.languages
  lam = {c: weights.get(c, 1.0) for c in codes} | {"en": 2.0}

  def loss_fn(cfg):
    objective = step.lm_objective(cfg, model)
    f = fast_jit(jax.value_and_grad(
        lambda p, b: objective.loss(p, b, jax.random.PRNGKey(0), deterministic=True),
        has_aux=True))
    return lambda c, b: f(params, b)

  loss = loss_fn(plain)
  (total, aux), grads = loss_fn(config)(config, batch)
  want_total, want_grads = 0.0, jax.tree.map(np.zeros_like, params)
  for i, code in enumerate(codes):
    only = dict(batch, loss_weights=batch["loss_weights"] * (batch["lang_ids"] == i))
    (t_i, _), g_i = loss(plain, only)
    want_total += lam[code] * float(t_i)
    want_grads = jax.tree.map(lambda a, g, w=lam[code]: a + w * np.asarray(g), want_grads, g_i)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=5e-6)  # float32 sums
  (_, aux_plain), _ = loss(plain, batch)
  np.testing.assert_array_equal(np.asarray(aux["per_token"]["loss"]),
                                np.asarray(aux_plain["per_token"]["loss"]))
  line = terms.loss_weights_line(config)
  assert "en 2 (main)" in line and "de 0.25" in line and "ru 3" in line and "fr 1" in line


def test_loss_weight_config_checks():
  c = _config()
  assert terms.loss_weights_line(c) == ""
  c.train.loss_weights["xx"] = 2.0
  _expect_config_error(c, "names 'xx'")
  c = _config(main_language="de")
  c.train.loss_weights["de"] = 2.0
  _expect_config_error(c, "give its weight once")
  c = _config(main_language="qq")
  _expect_config_error(c, "main_language='qq'")
  c = _config(main_language="de", main_language_weight=0.0)
  for code in c.data.languages:
    if code != "de":
      c.train.loss_weights[code] = 0.0
  _expect_config_error(c, "every language has LM loss weight 0")


def test_contrastive_config_checks():
  _expect_config_error(_contrastive_config(pairs=()), "needs train.contrastive.pairs")
  _expect_config_error(_contrastive_config(pairs=("en-xx",)), "'xx' of 'en-xx'")
  _expect_config_error(_contrastive_config(pooling="max"), "pooling='max'")
  _expect_config_error(_contrastive_config(layer=5), "layer=5")
  _expect_config_error(_contrastive_config(batch_size=1), "batch_size=1 pairs")
  _expect_config_error(_contrastive_config(temperature=0.0), "temperature=0.0")
  loop.validate_config(_contrastive_config())
  mesh = sharding.make_mesh(_config().mesh)  # 8 data-parallel devices
  with pytest.raises(ConfigError, match="do not divide over the 8 data-parallel devices"):
    contrastive.check_mesh(_contrastive_config(batch_size=12), mesh)
  contrastive.check_mesh(_contrastive_config(batch_size=16), mesh)


# --- the pair stream --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_plan():
  from xlingo.data import inputs

  config = _contrastive_config(pairs=("en-de", "en-fr"))
  config.model.vocab_size = 8192
  return config, inputs.plan_inputs(config)


def _stream(plan, lo=0, hi=P, seed=0, pool=None):
  from xlingo.data import pairs

  pool = pool if pool is not None else pairs._pool(plan, "train")[0]
  return pairs.PairStream(pool, plan.vocab, P, MAXLEN, seed, lo, hi, {"k": 1})


def test_pair_rows_and_their_layout(pair_plan):
  from xlingo.data import pairs

  _, plan = pair_plan
  assert set(plan.pair_tasks) == {"en-de", "en-fr"}
  src, tgt = "Debian is a free operating system.", "Debian ist ein freies Betriebssystem."
  b = pairs.encode_pairs([(src, tgt, 0, 1), (tgt * 9, src, 1, 0)], plan.vocab, MAXLEN)
  sp = plan.vocab.tokenizer
  ids = sp.encode(src)
  assert b["pair_inputs"].shape == (2, 2, MAXLEN) and b["pair_lengths"][0, 0] == len(ids)
  assert b["pair_inputs"][0, 0, 0] == 0  # BOS
  np.testing.assert_array_equal(b["pair_inputs"][0, 0, 1:1 + len(ids)], ids)
  assert not b["pair_inputs"][0, 0, 1 + len(ids):].any()
  assert b["pair_lengths"][1, 0] == MAXLEN - 1  # cut to max_len - 1 tokens
  np.testing.assert_array_equal(b["pair_lang_ids"], [[0, 1], [1, 0]])
  assert b["pair_keys"][0, 0] == b["pair_keys"][1, 1] == pairs.text_key(src)


def test_pair_stream_is_deterministic_split_by_rows_and_resumes(pair_plan):
  _, plan = pair_plan
  one = _stream(plan)
  batches = [next(one) for _ in range(3)]
  halves = [_stream(plan, 0, P // 2), _stream(plan, P // 2, P)]
  for want in batches:
    got = [next(h) for h in halves]
    for k, v in want.items():
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), v)
  state = one.state()
  after = [next(one) for _ in range(2)]
  fresh = _stream(plan)
  assert fresh.load_state(state)
  for want in after:
    for k, v in next(fresh).items():
      np.testing.assert_array_equal(v, want[k])
  assert not _stream(plan).load_state({**state, "fingerprint": {"k": 2}})
  # Both pairs in the pool; an epoch is a permutation of it, and the next epoch continues.
  tiny_pool = [(f"s{i}", f"t{i}", 0, 1) for i in range(5)]
  s = _stream(plan, pool=tiny_pool)
  seen = [int(k) for _ in range(5) for k in next(s)["pair_keys"][:, 1]]
  from xlingo.data import pairs

  first = sorted(seen[:5])
  assert first == sorted(pairs.text_key(f"t{i}") for i in range(5))
  assert len(seen) == 40 and s.epoch == 8


def _en_de_train_pairs() -> int:
  """The embedded en-de training pairs: one a line of parallel/en-de.train.tsv."""
  from xlingo.data import vocab

  with open(f"{vocab.corpus_dir()}/parallel/en-de.train.tsv", encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def test_lm_and_pair_streams_resume_together(pair_plan, tmp_path):
  """The checkpoint's data state (iterator.save/restore) holds both streams: a restored
  iterator gives exactly the LM and pair batches an uninterrupted one gives."""
  from xlingo.data import inputs, pairs

  config, plan = pair_plan
  it = inputs.train_iterator(plan, config)
  assert isinstance(it, pairs.WithPairs) and f"en-de {_en_de_train_pairs():,}" in it.summary
  for _ in range(3):
    b = next(it)
  assert b["pair_inputs"].shape == (P, 2, MAXLEN) and b["targets"].shape == (8, 64)
  it.save(str(tmp_path / "state"))
  want = [next(it) for _ in range(2)]
  fresh = inputs.train_iterator(plan, config)
  fresh.restore(str(tmp_path / "state"))
  for w in want:
    got = next(fresh)
    assert got.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  # A checkpoint from a run without the pair stream: the LM stream resumes, pairs restart.
  (tmp_path / "state" / pairs.STATE_FILE).unlink()
  again = inputs.train_iterator(plan, config)
  again.restore(str(tmp_path / "state"))
  np.testing.assert_array_equal(next(again)["targets"], want[0]["targets"])
  assert again.pairs.batches == 1


# --- a short run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_run_aligns_pairs_and_identifies_languages_without_hints(tmp_path):
  """Contrastive alignment (en-de) and the language-ID loss on hint-free tokens in one tiny
  run: held-out retrieval rises, and the language of validation text given with no language
  hint is identified far above chance (1/9), with the language embedding on."""
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "xlingo.train", "--config", os.path.join(root, "configs", "tiny.py"),
         f"--workdir={wd}", "--config.train.steps=160", "--config.train.eval_every=160",
         "--config.train.log_every=80", "--config.checkpoint.every_steps=160",
         "--config.train.learning_rate=0.01", "--config.train.eval_batches=2",
         "--config.train.contrastive.weight=1.0", "--config.train.contrastive.pairs=('en-de',)",
         "--config.model.lid_head=True", "--config.model.lang_emb_dropout=0.5",
         "--config.train.lid_loss_weight=1.0"]
  p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert f"contrastive pairs: en-de {_en_de_train_pairs():,}" in p.stdout
  rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  val = [r for r in rows if "val/lid_acc" in r]
  before, after = val[0], val[-1]
  assert [before["step"], after["step"]] == [0, 160]
  for key in ("val/retrieval/en-de", "val/retrieval/de-en"):
    assert after[key] > before[key] + 0.1, (key, before[key], after[key])
  assert before["val/lid_acc"] < 0.2 and after["val/lid_acc"] > 0.25, after["val/lid_acc"]
  train = [r for r in rows if "contrastive_loss" in r]
  assert train[-1]["contrastive_loss"] < train[0]["contrastive_loss"]
  assert {"lid_loss", "lid_acc", "contrastive_acc"} <= set(train[-1])
  assert (wd / "checkpoints" / "160" / "data" / "process_0" / "pairs.json").exists()
  # The model also generates with no language hint.
  g = subprocess.run([sys.executable, "-m", "xlingo.generate", "--config",
                      os.path.join(root, "configs", "tiny.py"), f"--workdir={wd}",
                      "--lang", "none", "--prompt", "Debian", "--max_len", "4"],
                     cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert g.returncode == 0 and g.stdout.startswith("[none] Debian"), g.stdout + g.stderr[-1000:]


@pytest.mark.parametrize("name,arg", [
    ("lang_emb", "on"), ("lang_emb", "off"), ("lang_emb", "dropout,tiny"), ("lid", "0"),
    ("lid", "0.1,tiny"), ("contrastive", "0"), ("contrastive", "0.1,tiny"),
    ("contrastive", "adapt:0.1"), ("loss_weights", "de,0.3"), ("loss_weights", "ja,0.5,tiny"),
    ("temperature", "1"), ("temperature", "unimax,tiny")])
def test_experiment_configs_are_valid(name, arg):
  import importlib

  from xlingo import adapt

  c = importlib.import_module(f"configs.experiments.{name}").get_config(arg)
  if "adapt" in c:
    c.checkpoint.init_from = "/nonexistent"  # checked when the run starts, not here
    adapt.check_config(c)
  loop.validate_config(c)


def test_experiment_config_arguments_are_checked():
  from configs.experiments import lang_emb, lid, temperature

  with pytest.raises(ConfigError, match="variant 'of' is unknown"):
    lang_emb.get_config("of")
  with pytest.raises(ConfigError, match="is not a loss weight"):
    lid.get_config("x")
  with pytest.raises(ConfigError, match="neither a temperature nor 'unimax'"):
    temperature.get_config("hot")
  assert temperature.get_config("100").data.temperature == 100.0
  assert temperature.get_config("unimax").data.sampling == "unimax"
