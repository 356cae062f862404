"""Parameter-efficient adaptation in the model (LoRA, adapters, prefixes) and the frozen split of
the train step: side paths start at the base model, packed rows and the KV cache work, and
frozen parameters get no gradient, no optimizer state and no share of grad_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import adapt_tiny, tiny
from xlingo import adapt, sharding
from xlingo import decode as gen
from xlingo.config import LORA_TARGETS, ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import state as state_lib
from xlingo.training import step as step_lib

LORA = peft.PeftSpec(lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)
PER_LANGUAGE = peft.PeftSpec(adapter_bottleneck=8, adapter_per_language=True)
PREFIX = peft.PeftSpec(prefix_length=5)
ALL = peft.PeftSpec(lora_rank=4, lora_targets=LORA_TARGETS, adapter_bottleneck=8,
                    adapter_per_language=True, prefix_length=3)


def _model_cfg(scan_layers=True, max_len=64):
  cfg = tiny.get_config().model
  cfg.vocab_size = 96
  cfg.num_languages = 3
  cfg.scan_layers = scan_layers
  cfg.max_len = max_len
  return cfg


def _flat(tree):
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# Compiled once per model object (kept alive by the entry): op by op on 8 fake devices is slow.
_JITTED: dict = {}


def _jitted(model, kind):
  key = (id(model), kind)
  if key not in _JITTED:
    if kind == "init":
      fn = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))
    else:
      fn = jax.jit(lambda p, x, lang, seg, pos: model.apply({"params": p}, x, seg, pos, lang)[0])
    _JITTED[key] = (model, fn)
  return _JITTED[key][1]


def _init(model, base_params=None, peft_scale=0.0, seed=0):
  """The model's params; base parameters from ``base_params`` where given, the PEFT ones
  shifted by ``peft_scale`` * N(0, 1) (0: as initialised)."""
  params = _jitted(model, "init")(jax.random.PRNGKey(seed))
  base = _flat(base_params or {})
  rng = np.random.default_rng(seed)

  def fill(path, x):
    key = sharding.path_str(path)
    if key in base:
      return base[key]
    if peft_scale and peft.PEFT_PARAM.search(key):
      return np.asarray(x) + (peft_scale * rng.normal(size=x.shape)).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(fill, params)


def _batch(b=2, t=12, vocab=96, langs=3, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32),
          jnp.asarray(rng.integers(0, langs, (b, t)), jnp.int32))


def _logits(model, params, x, lang=None, seg=None, pos=None):
  return np.asarray(_jitted(model, "apply")(params, x, lang, seg, pos))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_side_paths_start_at_the_base_model_and_then_act(scan_layers):
  """LoRA (B = 0), adapters (up = 0) and prefixes (values = 0) leave the base model's output
  exactly as it was until they train."""
  cfg = _model_cfg(scan_layers)
  base = decoder_lib.Decoder(cfg)
  base_params = _init(base)
  x, lang = _batch()
  want = _logits(base, base_params, x, lang)
  model = decoder_lib.Decoder(cfg, ALL)
  np.testing.assert_array_equal(_logits(model, _init(model, base_params), x, lang), want)
  moved = _logits(model, _init(model, base_params, 0.1), x, lang)
  assert np.abs(moved - want).max() > 1e-3


def test_every_peft_parameter_has_logical_axes():
  boxed = jax.eval_shape(lambda: decoder_lib.Decoder(_model_cfg(), ALL).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(
      v, nn.Partitioned))
  found = set()
  for path, leaf in leaves:
    key = sharding.path_str(path)
    assert isinstance(leaf, nn.Partitioned), key
    assert len(leaf.names) == leaf.value.ndim and all(leaf.names), key
    if peft.PEFT_PARAM.search(key):
      found.add(key.rsplit("/", 1)[1])
  assert found == {"query_lora_a", "query_lora_b", "key_lora_a", "key_lora_b", "value_lora_a",
                   "value_lora_b", "out_lora_a", "out_lora_b", "gate_lora_a", "gate_lora_b",
                   "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b", "down", "up",
                   "prefix_key", "prefix_value"}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_merge_equals_side_path(scan_layers):
  """``merge_lora`` (the export) folds W + (alpha / r) A B into the kernels: the plain model on
  merged params computes what the side paths compute."""
  cfg = _model_cfg(scan_layers)
  model = decoder_lib.Decoder(cfg, LORA)
  params = _init(model, peft_scale=0.05)
  merged = peft.merge_lora(params, LORA)
  assert not any(peft.PEFT_PARAM.search(k) for k in _flat(merged))
  x, lang = _batch()
  np.testing.assert_allclose(_logits(decoder_lib.Decoder(cfg), merged, x, lang),
                             _logits(model, params, x, lang), rtol=2e-4, atol=2e-4)
  # The reference for one kernel, in NumPy on the kernel's own axes.
  layer = (lambda t: t["blocks"]["layers"]) if scan_layers else (
      lambda t: t["blocks"]["layers_0"])
  p, m = jax.tree.map(np.asarray, layer(params)), np.asarray(layer(merged)["attn"]["out"])
  eq = "...nhr,...rd->...nhd"
  ref = p["attn"]["out"] + (8.0 / 4) * np.einsum(eq, p["attn"]["out_lora_a"],
                                                 p["attn"]["out_lora_b"])
  np.testing.assert_allclose(m, ref, rtol=1e-5, atol=1e-6)


def test_per_language_adapters_act_only_on_their_language():
  """Token t uses the adapter of lang_ids[t]: changing language 2's adapter leaves every
  position whose language (and whose context's languages) is not 2 unchanged."""
  cfg = _model_cfg()
  model = decoder_lib.Decoder(cfg, PER_LANGUAGE)
  params = _init(model, peft_scale=0.1)
  x, _ = _batch(b=1, t=10)
  lang = jnp.asarray([[0, 0, 1, 1, 0, 2, 2, 0, 1, 2]], jnp.int32)
  out = _logits(model, params, x, lang)

  def bump(path, v):
    if sharding.path_str(path).endswith("adapter/down"):
      return jnp.asarray(v).at[..., 2, :].add(1.0)  # [layers, d, languages, r]
    return v

  out2 = _logits(model, jax.tree_util.tree_map_with_path(bump, params), x, lang)
  diff = np.abs(out2 - out).max(-1)[0]
  # Causal: positions before the first language-2 token cannot see it.
  np.testing.assert_array_equal(diff[:5], 0.0)
  assert diff[5] > 1e-3


def test_prefix_with_packed_rows():
  """Two documents packed in one row give each document's logits alone: the prefix belongs to
  the layer and is seen by every segment, nothing crosses the segment mask."""
  cfg = _model_cfg()
  model = decoder_lib.Decoder(cfg, PREFIX)
  params = _init(model, peft_scale=0.5)
  a, _ = _batch(b=1, t=5, seed=1)
  b, _ = _batch(b=1, t=7, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
  both = _logits(model, params, packed, seg=seg, pos=pos)
  np.testing.assert_allclose(both[:, :5], _logits(model, params, a), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(both[:, 5:], _logits(model, params, b), rtol=1e-4, atol=1e-4)


def test_kv_cache_generation_with_every_side_path():
  """``generate``'s KV-cache decoding of a model with LoRA, per-language adapters and prefixes
  (all non-zero) equals greedy decoding by full forward passes."""
  cfg = _model_cfg(max_len=24)
  model = decoder_lib.Decoder(cfg, ALL)
  params = _init(model, peft_scale=0.3)
  fwd = jax.jit(lambda p, x, lg: model.apply({"params": p}, x, None, None, lg)[0])
  prompts, lang, prompt_lang = [[45, 30, 12, 7], [9]], 2, 1
  got = gen.generate_ids(model, params, prompts, lang, max_len=6, prompt_lang_ids=prompt_lang)
  for prompt, out in zip(prompts, got):
    seq, want = [0] + prompt, []
    while len(want) < 6:
      x = np.zeros((1, 24), np.int32)
      x[0, :len(seq)] = seq
      lg = np.full((1, 24), lang, np.int32)
      lg[0, :len(prompt)] = prompt_lang
      tok = int(jnp.argmax(fwd(params, jnp.asarray(x), jnp.asarray(lg))[0, len(seq) - 1]))
      if tok == 1:
        break
      want.append(tok)
      seq.append(tok)
    assert out == want


# --- the frozen split of the train step -------------------------------------------------------


def _adapt_config(mode, **over):
  c = adapt_tiny.get_config()
  c.checkpoint.init_from = "unused"  # nothing is loaded here
  c.adapt.mode = mode
  for k, v in over.items():
    section, key = k.split("__")
    c[section][key] = v
  adapt.resolve_config(c)
  return c


def _step_setup(c):
  model = decoder_lib.Decoder(c.model, peft.spec_from_config(c))
  mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c.mesh)
  factory = state_lib.StateFactory(model, c, mesh, rules)
  byte_table = np.ones(c.model.vocab_size, np.float32)
  fn = step_lib.make_train_step(step_lib.LM_OBJECTIVE, model, c, factory.tx, byte_table,
                                len(c.data.languages))
  return model, mesh, rules, factory, fn


def _step_flops(mode, **over):
  c = _adapt_config(mode, **over)
  _, mesh, rules, factory, fn = _step_setup(c)
  batch_sh = sharding.batch_sharding(mesh)
  with sharding.mesh_context(mesh, rules):
    lowered = step_lib.jit_train_step(fn, factory, batch_sh).lower(
        factory.abstract_with_shardings(), step_lib.abstract_batch(c, batch_sh), {})
  return float(lowered.cost_analysis()["flops"])


def test_frozen_parameters_cost_no_gradient():
  """The train step of every parameter-efficient mode computes fewer FLOPs than full
  fine-tuning: the weight gradients of the frozen parameters are never formed (with value_and_grad
  over all parameters and zeroed updates they were, and cost as much as full fine-tuning)."""
  full = _step_flops("full")
  for mode in ("lora", "adapter", "prefix", "lang_emb"):
    assert _step_flops(mode) < 0.8 * full, mode
  # train.trainable freezing goes the same way
  assert _step_flops("freeze", train__trainable="blocks/layers/mlp/") < 0.9 * full


@pytest.mark.parametrize("mode", ["lora", "adapter", "prefix"])
def test_side_paths_shard_over_fsdp_and_tensor(mode):
  """The PEFT parameters' logical axes divide and lower on a data=1, fsdp=4, tensor=2 mesh."""
  c = _adapt_config(mode, mesh__data=1, mesh__fsdp=4, mesh__tensor=2)
  c.adapt.adapter.per_language = True
  _, mesh, rules, factory, fn = _step_setup(c)
  shardings = _flat(factory.param_shardings)
  peft_keys = [k for k in shardings if peft.PEFT_PARAM.search(k)]
  assert peft_keys
  # A parameter with an 'embed' axis is split over fsdp like the kernel it sits beside.
  assert any("fsdp" in str(shardings[k].spec) for k in peft_keys) or mode == "prefix"
  batch_sh = sharding.batch_sharding(mesh)
  with sharding.mesh_context(mesh, rules):
    step_lib.jit_train_step(fn, factory, batch_sh).lower(
        factory.abstract_with_shardings(), step_lib.abstract_batch(c, batch_sh), {})


def test_grad_norm_and_optimizer_state_cover_trained_parameters_only():
  c = _adapt_config("adapter", train__grad_clip=0.0, train__warmup_steps=1)
  model, mesh, rules, factory, fn = _step_setup(c)
  trained_keys = {k for k in _flat(factory.params_abstract) if "/adapter/" in k}
  state = factory.init(jax.random.PRNGKey(0))
  # Adam's moments exist for the adapters alone.
  moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moment_shapes == sorted(2 * [v.shape for k, v in _flat(state.params).items()
                                      if k in trained_keys])
  x, lang = _batch(b=8, t=c.data.seq_len, vocab=c.model.vocab_size, langs=9)
  batch = {"inputs": x, "targets": jnp.roll(x, -1, 1), "segment_ids": jnp.ones_like(x),
           "positions": jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape), "lang_ids": lang,
           "loss_weights": jnp.ones(x.shape, jnp.float32)}
  with sharding.mesh_context(mesh, rules):
    step = jax.jit(fn)
    new, m = step(state, batch, {})
    new, _ = step(new, batch, {})  # the learning rate is 0 at step 0 (warmup)
  before, after = _flat(jax.device_get(state.params)), _flat(jax.device_get(new.params))
  for k in before:
    if k in trained_keys and k.endswith("/up"):
      assert np.abs(after[k] - before[k]).max() > 0, k
    elif k not in trained_keys:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)

  # grad_norm is the norm of the adapters' gradient, not of every parameter's.
  ctx = step_lib.StepContext(model=model, config=c, deterministic=False, step=state.step)
  w = jnp.sum(batch["loss_weights"])

  def loss(p):
    return step_lib.lm_loss(ctx, p, batch, jax.random.fold_in(
        jax.random.PRNGKey(c.train.seed), 0), None)[0] / w

  with sharding.mesh_context(mesh, rules):
    grads = _flat(jax.device_get(jax.jit(jax.grad(loss))(state.params)))
  want = np.sqrt(sum(np.sum(np.square(g)) for k, g in grads.items() if k in trained_keys))
  everything = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  np.testing.assert_allclose(float(m["grad_norm"]), want, rtol=1e-4)
  assert everything > 2 * want


def test_bad_peft_settings_are_one_line():
  with pytest.raises(ConfigError, match="matches no projection kernel"):
    c = _adapt_config("lora")
    c.adapt.lora.targets = "attn/nothing_like_this$"
    model = decoder_lib.Decoder(c.model, peft.spec_from_config(c))
    peft.check_lora_targets(list(_flat(nn.unbox(sharding.abstract_params(model, c.model, 8)))),
                            peft.spec_from_config(c))
  with pytest.raises(ConfigError, match="adapt.adapter.bottleneck"):
    c = adapt_tiny.get_config()
    c.checkpoint.init_from = "unused"
    c.adapt.mode = "adapter"
    c.adapt.adapter.bottleneck = 0
    adapt.check_config(c)
  with pytest.raises(ConfigError, match="not weights to merge"):
    c = adapt_tiny.get_config()
    c.checkpoint.init_from = "unused"
    c.adapt.mode = "prefix"
    c.adapt.export_merged = "/tmp/x"
    adapt.check_config(c)
