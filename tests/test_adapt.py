"""Language adaptation: init_from with appended languages, LoRA, targets-only loss, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import adapt_tiny, tiny
from xlingo import adapt, sharding
from xlingo.config import EMBEDDED_LANGUAGES, ConfigError
from xlingo.data import packing
from xlingo.data.languages import LanguageTable
from xlingo.errors import CheckpointError, DataError
from xlingo.model import decoder as decoder_lib
from xlingo.model import lora
from xlingo.training import loop, step
from xlingo.training import restore as restore_lib

OLD_LANGS = EMBEDDED_LANGUAGES[:-1]  # the pretrained model lacks 'zh'


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-step tiny LM on 8 languages (its checkpoint is what adaptation starts from)."""
  c = tiny.get_config()
  c.data.languages = OLD_LANGS
  c.model.num_languages = len(OLD_LANGS)
  c.train.steps = 2
  c.train.eval_every = 2
  c.checkpoint.every_steps = 2
  wd = str(tmp_path_factory.mktemp("pre"))
  loop.run(c, wd)
  return wd


def metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _adapt_config(init_from: str, **adapt_kw):
  c = adapt_tiny.get_config()
  c.checkpoint.init_from = init_from
  for k, v in adapt_kw.items():
    c.adapt[k] = v
  return c


def _params(workdir, config, objective=None):
  s = loop.build(config, objective)
  return restore_lib.restore_params(os.path.join(workdir, "checkpoints"),
                                 s.factory.abstract_with_shardings().params)


def _small_model(num_languages=3):
  c = tiny.get_config()
  c.model.vocab_size = 64
  c.model.num_languages = num_languages
  return c, decoder_lib.Decoder(c.model)


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_adaptation_end_to_end(pretrained, tmp_path):
  """LoRA to a new language (zh) + en-zh pairs: base frozen bit for bit, report, export."""
  c = _adapt_config(pretrained, mode="lora", l2_init_weight=0.1, bleu_examples=2,
                    export_merged=str(tmp_path / "merged"))
  c.data.train_languages = ("zh",)
  c.data.translation_pairs = ("en-zh",)
  c.train.steps = 2
  c.train.eval_every = 1
  wd = str(tmp_path / "adapt")
  report = adapt.run(c, wd)

  # before/after for every language, the new one included
  assert set(report["bpb"]["languages"]) == set(EMBEDDED_LANGUAGES)
  assert report["target"] == "zh"
  assert set(report["translation"]["en-zh"]) >= {"before", "after"}
  assert os.path.isdir(os.path.join(wd, "best"))
  saved = json.load(open(os.path.join(wd, "adapt_report.json")))
  assert saved["mode"] == "lora"

  pre_cfg = tiny.get_config()
  pre_cfg.data.languages = OLD_LANGS
  pre_cfg.model.num_languages = len(OLD_LANGS)
  before = jax.device_get(_params(pretrained, pre_cfg))
  objective, _ = adapt.make_objective(c)
  after = jax.device_get(_params(wd, c, objective))
  # LoRA trained, everything else is exactly the checkpoint's (or the fresh zh row)
  assert np.abs(after["lora"]["blocks"]["layers"]["attn"]["query"]["b"]).max() > 0
  for path, x in jax.tree_util.tree_leaves_with_path(before):
    key = sharding.path_str(path)
    y = after
    for part in key.split("/"):
      y = y[part]
    if key == "lang_embedding":
      np.testing.assert_array_equal(y[: len(OLD_LANGS)], x)
      assert y.shape[0] == len(EMBEDDED_LANGUAGES)
    else:
      np.testing.assert_array_equal(y, x, err_msg=key)

  # the export is plain model params, loadable by init_from, equal to the merge
  merged = jax.device_get(lora.merge(after, c.adapt.lora))
  s = loop.build(c, objective)
  exported = jax.device_get(restore_lib.restore_params(
      str(tmp_path / "merged"), s.factory.model_abstract_with_shardings(), c))
  assert set(exported) == set(merged)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_full_adaptation_with_replay_and_early_stop(pretrained, tmp_path):
  c = _adapt_config(pretrained, replay_ratio=0.25, early_stop_patience=1)
  c.data.languages = OLD_LANGS
  c.model.num_languages = len(OLD_LANGS)
  c.train.steps = 4
  c.train.eval_every = 1
  adapt.resolve_config(c)
  objective, stopper = adapt.make_objective(c)
  wd = str(tmp_path / "full")
  loop.run(c, wd, objective)
  assert stopper.best_step is not None
  text, bpb = adapt.bpb_table(wd, c.data.languages, "de")
  assert "(target)" in text and set(bpb["languages"]) == set(OLD_LANGS)
  # replay: the other languages were trained on too (tests/test_mixture_delivery.py checks
  # the share delivered)
  last = [r for r in metrics_rows(wd) if "tokens/de" in r][-1]
  assert last["tokens/de"] > 0 and sum(last[f"tokens/{x}"] for x in OLD_LANGS if x != "de") > 0


# --- losses and LoRA, without the loop --------------------------------------------------------


def test_targets_only_loss_matches_numpy():
  c, model = _small_model()
  table = LanguageTable(("en", "de", "fr"))
  rng = np.random.default_rng(0)
  examples = [
      {"targets": rng.integers(3, 64, 9), "lang": "de", "src_lang": "en", "prefix_len": 4},
      {"targets": rng.integers(3, 64, 5), "lang": "fr", "src_lang": "en", "prefix_len": 2},
      {"targets": rng.integers(3, 64, 7), "lang": "de", "src_lang": "", "prefix_len": 0},
  ]
  (batch,) = packing.pack_examples(examples, table, 2, 16)
  assert batch["loss_weights"][0, :4].sum() == 0  # no loss on the first pair's source
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"], batch["segment_ids"],
                               batch["positions"], batch["lang_ids"])["params"]
  params = nn.unbox(params)
  ac = adapt_tiny.get_config()
  ac.model = c.model
  ac.checkpoint.init_from = "unused"
  objective, _ = adapt.make_objective(ac)
  ctx = step.StepContext(model=model, config=ac, deterministic=True)
  # jitted: op by op on 8 fake devices is slow
  got, _ = jax.jit(lambda p, b: objective.loss_fn(ctx, p, b, jax.random.PRNGKey(0), {}))(
      params, jax.tree.map(jnp.asarray, batch))
  logits, _ = jax.jit(model.apply)({"params": params}, batch["inputs"], batch["segment_ids"],
                                   batch["positions"], batch["lang_ids"])
  z = np.asarray(logits, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  want = (nll * batch["loss_weights"]).sum()
  assert batch["loss_weights"].sum() == 9 - 4 + 5 - 2 + 7
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_lora_merge_equals_base_plus_adapters():
  c, model = _small_model()
  boxed = sharding.abstract_params(model, c.model, 8)
  cfg = adapt_tiny.get_config().adapt.lora
  factors = lora.init_factors(jax.random.PRNGKey(1), nn.unbox(lora.abstract_factors(boxed, cfg)))
  # B starts at 0 (merge is the identity then); give it values to test the merge itself
  factors = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
      if sharding.path_str(p).endswith("/b") else x, factors)
  x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
  base = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])
  merged = jax.jit(lambda p: lora.merge(p, cfg))({**base, "lora": factors})
  assert set(merged) == set(base)
  assert lora.merge(base, cfg) is base

  # reference: W + (alpha / r) * A @ B per layer, in NumPy, on the kernels' own axes
  scale = cfg.alpha / cfg.rank
  ref = jax.tree.map(np.asarray, base)
  layers = ref["blocks"]["layers"]
  f = jax.tree.map(np.asarray, factors)["blocks"]["layers"]
  for mod, name, eq in (("attn", "query", "ldr,lrnh->ldnh"), ("attn", "key", "ldr,lrkh->ldkh"),
                        ("attn", "value", "ldr,lrkh->ldkh"), ("attn", "out", "lnhr,lrd->lnhd"),
                        ("mlp", "gate", "ldr,lrf->ldf"), ("mlp", "up", "ldr,lrf->ldf"),
                        ("mlp", "down", "lfr,lrd->lfd")):
    ab = f[mod][name]
    layers[mod][name] = layers[mod][name] + scale * np.einsum(eq, ab["a"], ab["b"])
  apply = jax.jit(model.apply)
  got, _ = apply({"params": merged}, x)
  want, _ = apply({"params": ref}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  plain, _ = apply({"params": base}, x)
  assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-4


def test_early_stopping_tracks_target():
  s = adapt.EarlyStopping("val/bpb/de", patience=2)
  assert s.on_eval(1, {"val/bpb/de": 3.0})
  assert not s.on_eval(2, {"val/bpb/de": 3.1}) and not s.should_stop()
  assert not s.on_eval(3, {"val/bpb/de": 3.0}) and s.should_stop()
  assert s.best_step == 1


# --- bad input ----------------------------------------------------------------------------------


def test_lora_targets_matching_nothing():
  c, model = _small_model()
  boxed = sharding.abstract_params(model, c.model, 8)
  cfg = adapt_tiny.get_config().adapt.lora
  cfg.targets = "attn/nothing_like_this"
  with pytest.raises(ConfigError, match="matches no parameter"):
    lora.abstract_factors(boxed, cfg)


def test_init_from_required():
  c = adapt_tiny.get_config()
  with pytest.raises(ConfigError, match="init_from"):
    adapt.check_config(c)


def test_target_language_absent_from_data(tmp_path):
  c = _adapt_config(str(tmp_path))
  c.data.languages = EMBEDDED_LANGUAGES + ("sw",)
  c.model.num_languages = len(c.data.languages)
  c.data.train_languages = ("sw",)
  with pytest.raises(DataError, match="'sw' has no data"):
    adapt.run(c, str(tmp_path / "wd"))
  c.data.train_languages = ("xx",)
  with pytest.raises(ConfigError, match="not in data.languages"):
    adapt.check_config(c)


def _restore_with(pretrained, tmp_path, edit_meta=None, **cfg_kw):
  step_dir = os.path.join(pretrained, "checkpoints", "2")
  copy = str(tmp_path / "ckpt")
  shutil.copytree(step_dir, copy)
  if edit_meta:
    path = os.path.join(copy, "meta", "metadata")
    meta = json.load(open(path))
    edit_meta(meta)
    json.dump(meta, open(path, "w"))
  c = _adapt_config(copy)
  for k, v in cfg_kw.items():
    section, key = k.split("__")
    c[section][key] = v
  s = loop.build(c)
  return restore_lib.restore_params(
      copy, s.factory.model_abstract_with_shardings(), c,
      init_fresh=lambda n: s.factory.init_model_param(jax.random.PRNGKey(0), n))


def test_checkpoint_with_other_vocabulary(pretrained, tmp_path):
  def other_vocab(meta):
    meta["vocab_sha1"] = "0" * 40

  with pytest.raises(CheckpointError, match="different vocabulary"):
    _restore_with(pretrained, tmp_path, other_vocab)


def test_checkpoint_shape_mismatch_and_reordered_languages(pretrained, tmp_path):
  with pytest.raises(CheckpointError, match="mlp_dim"):
    _restore_with(pretrained, tmp_path / "a", model__mlp_dim=256)

  def drop_meta_shape(meta):  # without the fingerprint, the saved shapes still catch it
    for k in ("mlp_dim",):
      meta.pop(k)

  with pytest.raises(CheckpointError, match="shape"):
    _restore_with(pretrained, tmp_path / "b", drop_meta_shape, model__mlp_dim=256)
  with pytest.raises(CheckpointError, match="append"):
    _restore_with(pretrained, tmp_path / "c", data__languages=("de", "en") + OLD_LANGS[2:] +
                  ("zh",))
