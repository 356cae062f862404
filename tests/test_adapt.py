"""Language adaptation: init_from with appended languages and an extended vocabulary, the
parameter-efficient modes end to end (tools read the adapted model as the run validated it),
targets-only loss, errors."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import metrics_rows

from configs import adapt_tiny, tiny
from xlingo import adapt, evaluate, sharding
from xlingo import decode as gen
from xlingo.config import EMBEDDED_LANGUAGES, ConfigError
from xlingo.data import inputs, packing, vocab_extend
from xlingo.data import vocab as xvocab
from xlingo.data.languages import LanguageTable
from xlingo.errors import CheckpointError, DataError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import hooks, load, loop
from xlingo.training import restore as restore_lib
from xlingo.training.load import load_model

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


def _adapt_config(init_from: str, **adapt_kw):
  c = adapt_tiny.get_config()
  c.checkpoint.init_from = init_from
  for k, v in adapt_kw.items():
    c.adapt[k] = v
  return c


def _params(workdir, config):
  s = loop.build(config)
  return load.restore_params(os.path.join(workdir, "checkpoints"),
                             s.factory.abstract_with_shardings().params)


def _flat(tree):
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tools_equal_validation(config, workdir, report):
  """evaluate on the workdir (loaded from its metadata alone) gives the run's own last
  validation bpb for every language, and loads the adapted model it trained."""
  result = evaluate.run(config, {"run": workdir})["results"]["run"]
  got = {k: v for k, v in result["metrics"].items() if k.startswith("val/bpb/")}
  want = {k: v for k, v in report["metrics"].items() if k.startswith("val/bpb/")}
  assert got and set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), k


def _small_model(num_languages=3):
  c = tiny.get_config()
  c.model.vocab_size = 64
  c.model.num_languages = num_languages
  return c, decoder_lib.Decoder(c.model)


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_adaptation_end_to_end(pretrained, tmp_path, monkeypatch):
  """LoRA to a new language (zh) + en-zh pairs: base frozen bit for bit, report, export, the
  data plan built once, and evaluate on the workdir equal to the run's validation."""
  plans = []
  plan_inputs = inputs.plan_inputs
  monkeypatch.setattr(inputs, "plan_inputs", lambda c: plans.append(1) or plan_inputs(c))
  c = _adapt_config(pretrained, mode="lora", l2_init_weight=0.1, bleu_examples=2,
                    export_merged=str(tmp_path / "merged"))
  c.data.train_languages = ("zh",)
  c.data.translation_pairs = ("en-zh",)
  c.train.steps = 2
  c.train.eval_every = 1
  wd = str(tmp_path / "adapt")
  report = adapt.run(c, wd)
  assert len(plans) == 1

  # before/after for every language, the new one included
  assert set(report["bpb"]["languages"]) == set(EMBEDDED_LANGUAGES)
  assert report["target"] == "zh"
  zh = report["translation"]["en-zh"]
  assert set(zh) == {"before", "after"} and "tok:zh" in zh["after"]["bleu_signature"]
  assert 0 < report["trained_params"] < report["params"] / 10
  assert os.path.isdir(os.path.join(wd, "best"))
  saved = json.load(open(os.path.join(wd, "adapt_report.json")))
  assert saved["mode"] == "lora"

  pre_cfg = tiny.get_config()
  pre_cfg.data.languages = OLD_LANGS
  pre_cfg.model.num_languages = len(OLD_LANGS)
  before = _flat(jax.device_get(_params(pretrained, pre_cfg)))
  after = _flat(jax.device_get(_params(wd, c)))
  # LoRA trained, everything else is exactly the checkpoint's (or the fresh zh row)
  assert np.abs(after["blocks/layers/attn/query_lora_b"]).max() > 0
  assert set(after) - set(before) == {k for k in after if peft.PEFT_PARAM.search(k)}
  for key, x in before.items():
    if key == "lang_embedding":
      np.testing.assert_array_equal(after[key][: len(OLD_LANGS)], x)
      assert after[key].shape[0] == len(EMBEDDED_LANGUAGES)
    else:
      np.testing.assert_array_equal(after[key], x, err_msg=key)

  _tools_equal_validation(c, wd, report)
  # the export is plain model params equal to the merge, loadable without the adapt section
  lm = load_model(tiny.get_config(), str(tmp_path / "merged"), what="--checkpoint")
  assert lm.model.peft is None
  merged = _flat(jax.device_get(peft.merge_lora(
      jax.device_get(_params(wd, c)), peft.spec_from_config(c))))
  exported = _flat(jax.device_get(lm.params))
  assert set(exported) == set(merged)
  for k in merged:
    np.testing.assert_allclose(exported[k], merged[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def el_vocab(tmp_path_factory):
  """The shipped vocabulary extended with 32 Greek pieces (``vocab extend``)."""
  prefix = str(tmp_path_factory.mktemp("el_vocab") / "el")
  vocab_extend.extend_vocab(xvocab.embedded_vocab_path(), {"el": [EL_TRAIN]}, 32, prefix)
  return prefix + ".model"


EL_TRAIN = os.path.join(xvocab.corpus_dir(), "new", "el.train.txt")


def _greek_config(init_from, vocab_path, **adapt_kw):
  """Adaptation to Greek (a script the shipped vocabulary lacks), appended to the checkpoint's
  languages, from the Greek files, with the extended vocabulary."""
  c = _adapt_config(init_from, **adapt_kw)
  c.data.languages = OLD_LANGS + ("el",)
  c.model.num_languages = len(c.data.languages)
  corpus = xvocab.corpus_dir()
  c.data.source = "files"
  c.data.file_patterns = {"el": EL_TRAIN, "de": os.path.join(corpus, "mono", "de.train.txt")}
  c.data.file_val_patterns = {"el": os.path.join(corpus, "new", "el.validation.txt"),
                              "de": os.path.join(corpus, "mono", "de.validation.txt")}
  c.data.train_languages = ("el",)
  c.data.vocab_path = vocab_path
  c.model.vocab_size = 8192 + 32
  return c


def test_init_from_extends_the_vocabulary(pretrained, el_vocab, tmp_path):
  """init_from a checkpoint whose vocabulary is a prefix of the config's: old rows kept, each
  new row the mean of the old rows of the pieces it decodes to; any other vocabulary is one
  line."""
  c = _greek_config(pretrained, el_vocab)
  old = jax.device_get(load_model(tiny.get_config(), pretrained).params["token_embedding"])
  lm = load_model(c, pretrained, what="checkpoint.init_from", model_from="config")
  new = jax.device_get(lm.params["token_embedding"])
  assert new.shape == (8192 + 32, old.shape[1]) and lm.vocab.vocab_size == 8192 + 32
  np.testing.assert_array_equal(new[:8192], old)
  sources = vocab_extend.new_piece_init_sources(xvocab.embedded_vocab_path(), el_vocab)
  for i, src in sources.items():
    np.testing.assert_allclose(new[i], old[src].mean(0), rtol=1e-6, atol=1e-7)
  assert any(len(src) > 1 for src in sources.values())

  # A model whose old pieces moved is not an extension: refused in one line, nothing written.
  proto = vocab_extend.load_model_proto(el_vocab)
  proto.pieces[100].piece, proto.pieces[101].piece = proto.pieces[101].piece, proto.pieces[
      100].piece
  moved = tmp_path / "moved.model"
  moved.write_bytes(proto.SerializeToString())
  c.data.vocab_path = str(moved)
  with pytest.raises(CheckpointError, match="neither the checkpoint's vocabulary") as e:
    load_model(c, pretrained, what="checkpoint.init_from", model_from="config")
  assert "\n" not in str(e.value)


def test_vocabulary_growth_of_an_untied_output_layer():
  """The output kernel [d, V] grows by columns, each the mean of its sources' columns."""
  old = np.arange(12, dtype=np.float32).reshape(3, 4)  # d = 3, V = 4
  sources = {4: [1, 3], 5: [2]}
  got = np.asarray(vocab_extend.grow_rows(old, sources, 1, None))
  np.testing.assert_array_equal(got[:, :4], old)
  np.testing.assert_allclose(got[:, 4], old[:, [1, 3]].mean(1))
  np.testing.assert_allclose(got[:, 5], old[:, 2])


@pytest.mark.slow
def test_per_language_adapters_new_script_extended_vocabulary(pretrained, el_vocab, tmp_path):
  """Adapters per language to Greek (appended language, extended vocabulary, files source):
  only the adapters train, evaluate on the workdir equals the run's validation, and generate
  loads the adapted model (adapters, table, vocabulary) from the workdir alone."""
  c = _greek_config(pretrained, el_vocab, mode="adapter")
  c.adapt.adapter.per_language = True
  c.train.steps = 2
  c.train.eval_every = 2
  wd = str(tmp_path / "el")
  report = adapt.run(c, wd)
  assert set(report["bpb"]["languages"]) == {"el", "de"}
  _tools_equal_validation(c, wd, report)
  lm = load_model(tiny.get_config(), wd)  # a config that knows nothing of the adaptation
  assert lm.model.peft == peft.PeftSpec(adapter_bottleneck=8, adapter_per_language=True)
  assert lm.table.codes[-1] == "el" and lm.vocab.vocab_size == 8192 + 32
  up = jax.device_get(lm.params["blocks"]["layers"]["adapter"]["up"])
  assert up.shape[1] == len(lm.table) and np.abs(up[:, -1]).max() > 0
  text = gen.generate(lm.model, lm.params, lm.vocab, ["Το αρχείο"], lm.table.id("el"),
                      max_len=4)
  assert isinstance(text[0], str)


@pytest.mark.slow
def test_prefix_adaptation_loads_in_the_tools(pretrained, tmp_path):
  c = _adapt_config(pretrained, mode="prefix")
  c.data.languages = OLD_LANGS
  c.model.num_languages = len(OLD_LANGS)
  c.train.steps = 2
  c.train.eval_every = 2
  wd = str(tmp_path / "prefix")
  report = adapt.run(c, wd)
  assert report["trained_params"] == 2 * 2 * 4 * 2 * 16  # layers x (k, v) x [P, K, H]
  _tools_equal_validation(c, wd, report)


@pytest.mark.slow
def test_full_adaptation_with_replay_and_early_stop(pretrained, tmp_path):
  c = _adapt_config(pretrained, replay_ratio=0.25, early_stop_patience=1)
  c.data.languages = OLD_LANGS
  c.model.num_languages = len(OLD_LANGS)
  c.train.steps = 4
  c.train.eval_every = 1
  adapt.resolve_config(c)
  recipe = adapt.make_recipe(c)
  wd = str(tmp_path / "full")
  loop.run(c, wd, recipe)
  stopper, _ = recipe.hooks
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
  objective = adapt.make_recipe(ac).build(ac, types.SimpleNamespace(model=model))
  # jitted: op by op on 8 fake devices is slow
  got, _ = jax.jit(lambda p, b: objective.loss(p, b, jax.random.PRNGKey(0), deterministic=True))(
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


def test_early_stopping_tracks_target():
  s = hooks.EarlyStopping("val/bpb/de", patience=2)
  assert s.on_eval(1, {"val/bpb/de": 3.0})
  assert not s.on_eval(2, {"val/bpb/de": 3.1}) and not s.should_stop()
  assert not s.on_eval(3, {"val/bpb/de": 3.0}) and s.should_stop()
  assert s.best_step == 1


def test_early_stopping_resumes_its_best_from_the_history(tmp_path):
  """A resumed run keeps the best so far: a worse first evaluation after the resume must not
  replace WORKDIR/best, and the count towards patience carries on."""
  rows = [{"step": 0, "val/bpb/de": 1.0}, {"step": 10, "train/loss": 2.0},
          {"step": 10, "val/bpb/de": 3.0}, {"step": 20, "val/bpb/de": 2.5},
          {"step": 30, "val/bpb/de": 2.7}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = hooks.EarlyStopping("val/bpb/de", patience=2)
  saved = []
  env = hooks.Env("adapt", adapt_tiny.get_config(), str(tmp_path), ["de"], None, {},
                  lambda state, step: saved.append(step))
  hook = s(env)
  assert (s.best, s.best_step, s.bad) == (2.5, 20, 1)  # step 0 is no candidate
  tick = hooks.Tick(step=40, state=None, is_last=False, val={"val/bpb/de": 2.6})
  assert hook.fn(tick) is True and saved == []  # worse than 2.5: no new best, patience spent
  s(env)  # a second factory call starts over from the file, not on top of itself
  assert (s.best_step, s.bad) == (20, 1)


# --- bad input ----------------------------------------------------------------------------------


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
  return load_model(c, copy, what="checkpoint.init_from", model_from="config").params


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


# --- init_from: the model's shape from the checkpoint ---------------------------------------


def _fake_step_dir(tmp_path, config):
  """A step directory with metadata alone: what adopting the init_from model reads."""
  step_dir = tmp_path / "pre" / "2"
  (step_dir / "state").mkdir(parents=True)
  (step_dir / "meta").mkdir()
  (step_dir / "meta" / "metadata").write_text(json.dumps(restore_lib.checkpoint_meta(config, 2)))
  return str(step_dir)


def test_init_from_takes_the_shape_the_config_leaves_at_its_default(tmp_path):
  pre = tiny.get_config()
  pre.model.lid_head = True
  pre.model.scan_layers = False
  step_dir = _fake_step_dir(tmp_path, pre)
  c = _adapt_config(step_dir)
  assert load.adopt_init_from_model(c) == ["lid_head", "scan_layers"]
  assert c.model.lid_head and not c.model.scan_layers
  meta = restore_lib.read_meta(step_dir)
  assert restore_lib.check_init_from_meta(meta, c, "init_from") is None
  assert load.adopt_init_from_model(c) == []  # once taken, nothing more to take

  # a key the config sets is meant: a checkpoint that disagrees is one line naming it
  c = _adapt_config(step_dir)
  c.model.d_model = 32
  load.adopt_init_from_model(c)
  with pytest.raises(CheckpointError, match=r"d_model: checkpoint 64 vs config 32"):
    restore_lib.check_init_from_meta(meta, c, "init_from")
  c = _adapt_config(step_dir)  # a removed language
  c.data.languages = tuple(x for x in EMBEDDED_LANGUAGES if x != "fr")
  load.adopt_init_from_model(c)
  with pytest.raises(CheckpointError, match="data.languages"):
    restore_lib.check_init_from_meta(meta, c, "init_from")


@pytest.mark.slow
def test_adapt_tiny_from_an_lm_with_lid_head_and_contrastive_alignment(tmp_path):
  """configs/adapt_tiny.py as it is starts from an LM pretrained with model.lid_head=True and
  contrastive alignment on (the user does not restate the model's shape)."""
  pre = tiny.get_config()
  pre.model.lid_head = True
  pre.train.contrastive.pairs = ("en-de",)
  pre.train.contrastive.weight = 0.1
  pre.train.steps = pre.train.eval_every = pre.checkpoint.every_steps = 2
  lm = str(tmp_path / "lm")
  loop.run(pre, lm)
  c = _adapt_config(lm)
  c.train.steps = c.train.eval_every = c.checkpoint.every_steps = 2
  wd = str(tmp_path / "adapt")
  report = adapt.run(c, wd)
  assert report["target"] == "de" and os.path.isdir(os.path.join(wd, "checkpoints", "2"))
  assert load_model(tiny.get_config(), wd).config.model.lid_head


def test_start_up_lines_state_every_structural_change(pretrained, el_vocab):
  """The lines adapt prints at start-up: vocabulary rows old -> new and how they start, the
  appended language and its id, what adapt.mode trains out of how many parameters."""
  c = _greek_config(pretrained, el_vocab, mode="lora")
  _, meta = load.newest_meta(pretrained, "checkpoint.init_from")
  vocab_line, lang_line = restore_lib.structural_changes(meta, c)
  assert vocab_line.startswith("vocabulary: 8,192 -> 8,224 pieces (+32, data.vocab_path=")
  assert "mean of the checkpoint's rows for the old pieces" in vocab_line
  assert lang_line.startswith(f"languages: {', '.join(OLD_LANGS)} + new el (id 8);")
  same = restore_lib.structural_changes(meta, _plain(c))
  assert same == [f"structure as in the checkpoint: 8,192 vocabulary pieces, languages "
                  f"{', '.join(OLD_LANGS)}"]
  adapt.resolve_config(c)
  line = adapt.trained_line(c)
  counts = adapt.parameter_counts(c)
  assert line.startswith("adapt.mode=lora: trains ")
  assert f"({counts['trained_params']:,} of {counts['params']:,} parameters" in line
  names = line.split("trains ")[1].split(" (")[0].split(" and ")[0].split(", ")
  assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names), names


def _plain(c):
  """``c`` with the checkpoint's own vocabulary and languages."""
  c = _adapt_config(c.checkpoint.init_from)
  c.data.languages = OLD_LANGS
  c.model.num_languages = len(OLD_LANGS)
  return c
