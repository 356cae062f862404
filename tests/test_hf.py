"""xlingo.hf against transformers' own numbers (tests/fixtures/hf, made by
bench/make_hf_fixtures.py): logits on unpacked and packed rows, greedy generation, the sharded
read, export <-> import round trips, the language-embedding fold, and bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from xlingo import config as config_lib
from xlingo import decode, paths, sharding
from xlingo.errors import XlingoError
from xlingo.hf import exporter, importer
from xlingo.model import decoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
# exported_llama_tied: an adapted model as xlingo.hf exports it (bench/check_hf_export.py).
FAMILIES = ("llama", "llama_tied", "mistral", "qwen2", "exported_llama_tied")
EOS = 1  # the fixtures' EOS, where xlingo's generation stops


def fixture(name):
  return os.path.join(FIXTURES, name)


def shifted(row):
  """A reference row (BOS first) as xlingo's inputs: the placeholder 0 at position 0."""
  x = np.array(row)
  x[..., 0] = 0
  return x


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_match_transformers(name):
  ref = np.load(os.path.join(fixture(name), "reference.npz"))
  c = importer.convert(fixture(name), max_len=128)
  logits, _ = c.model.apply({"params": c.params}, jnp.asarray(shifted(ref["unpacked_inputs"])))
  np.testing.assert_allclose(np.asarray(logits), ref["unpacked_logits"], atol=1e-4, rtol=0)

  lens = ref["packed_segment_lengths"]
  seg = np.repeat(np.arange(1, len(lens) + 1), lens)[None]
  pos = np.concatenate([np.arange(n) for n in lens])[None]
  toks = np.where(pos == 0, 0, ref["packed_inputs"][None])
  logits, _ = c.model.apply({"params": c.params}, jnp.asarray(toks), jnp.asarray(seg),
                            jnp.asarray(pos))
  np.testing.assert_allclose(np.asarray(logits[0]), ref["packed_logits"], atol=1e-4, rtol=0)

  want = list(ref["greedy_tokens"])
  want = want[:want.index(EOS)] if EOS in want else want
  got = decode.generate_ids(c.model, c.params, [list(ref["greedy_prompt"][1:])], 0,
                              max_len=len(ref["greedy_tokens"]))
  assert got[0] == want


def test_sharded_import_reads_only_device_blocks():
  """fsdp 4 x tensor 2: every read is a device's block, never a whole tensor, and the
  arrays equal the unsharded import's."""
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.fsdp, mesh_cfg.tensor = 4, 2
  mesh = sharding.make_mesh(mesh_cfg)
  reads = []
  c = importer.convert(fixture("qwen2"), max_len=128, mesh=mesh,
                       rules=sharding.logical_rules(mesh_cfg),
                       record=lambda name, idx: reads.append((name, idx)))
  src = importer.read_model(fixture("qwen2"), 128)[0]
  assert len({n for n, _ in reads}) == 3 + 12 * 2  # every tensor, lm_head and biases included
  for name, idx in reads:
    full = src.shape(name)
    got = [len(range(*s.indices(n))) for s, n in zip(idx, full)]
    assert np.prod(got) < np.prod(full), (name, idx)
  plain = importer.convert(fixture("qwen2"), max_len=128)
  for a, b in zip(jax.tree.leaves(c.params), jax.tree.leaves(plain.params)):
    assert len(a.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write_export(c, out, lang_row=None):
  """What export writes for ``c``'s parameters (the exporter's own functions)."""
  from safetensors.numpy import save_file

  params = jax.tree.map(np.asarray, jax.device_get(c.params))
  tensors, tied = exporter.hf_tensors(params, c.config.model, lang_row)
  os.makedirs(out)
  save_file(tensors, os.path.join(out, "model.safetensors"))
  cfg = importer.layout.hf_config(c.config.model, tie=tied, eos_id=EOS, max_positions=128)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f)
  for name, text in c.tokenizer.items():
    with open(os.path.join(out, name), "w") as f:
      f.write(text)
  return tensors, tied


@pytest.mark.parametrize("name", ["llama_tied", "qwen2"])
def test_export_is_the_original_and_round_trips(name, tmp_path):
  c = importer.convert(fixture(name), max_len=128)
  assert decoder.param_count(c.config.model) == sum(x.size for x in jax.tree.leaves(c.params))
  tensors, tied = _write_export(c, str(tmp_path / "out"))
  original = load_file(os.path.join(fixture(name), "model.safetensors"))
  assert sorted(tensors) == sorted(original) and tied == (name == "llama_tied")
  for k, v in original.items():
    np.testing.assert_array_equal(tensors[k], v, err_msg=k)
  again = importer.convert(str(tmp_path / "out"), max_len=128)
  for a, b in zip(jax.tree.leaves(c.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_language_fold_is_exact_and_unties(tmp_path):
  """A trained language row folded into the table of a tied model: the export (untied) gives
  the logits xlingo gives with that language's id."""
  c = importer.convert(fixture("llama_tied"), max_len=128, languages=("en", "de"))
  row = np.random.default_rng(0).normal(0, 0.5, c.config.model.d_model).astype(np.float32)
  c.params["lang_embedding"] = c.params["lang_embedding"].at[1].set(row)
  _, tied = _write_export(c, str(tmp_path / "out"), lang_row=row)
  assert not tied
  again = importer.convert(str(tmp_path / "out"), max_len=128, languages=("en",))
  x = jnp.asarray(shifted(np.load(os.path.join(fixture("llama_tied"), "reference.npz"))[
      "unpacked_inputs"]))
  want, _ = c.model.apply({"params": c.params}, x, lang_ids=jnp.ones_like(x))
  got, _ = again.model.apply({"params": again.params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# --- bad input ------------------------------------------------------------------------------


def _copy(name, tmp_path, edit_config=None, drop=(), tokenizer_from=None):
  d = str(tmp_path / name)
  shutil.copytree(fixture(name), d)
  for f in drop:
    os.remove(os.path.join(d, f))
  if edit_config:
    path = os.path.join(d, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    cfg.update(edit_config)
    with open(path, "w") as f:
      json.dump(cfg, f)
  return d


def _refused(model, *match, **kw):
  with pytest.raises(XlingoError) as e:
    importer.convert(model, max_len=kw.pop("max_len", 128), **kw)
  msg = str(e.value)
  assert "\n" not in msg
  for m in match:
    assert m in msg, msg
  return msg


def test_bad_models_are_refused_in_one_line(tmp_path):
  _refused(_copy("llama", tmp_path / "a", {"architectures": ["GPT2LMHeadModel"]}),
           "config.json", "GPT2LMHeadModel", "LlamaForCausalLM")
  _refused(_copy("llama", tmp_path / "b", drop=["tokenizer.json"]), "no tokenizer.json",
           "save_pretrained")
  _refused(_copy("llama", tmp_path / "c", {"vocab_size": 300}), "tokenizer.json has 320",
           "another model")
  _refused(_copy("llama", tmp_path / "d", {"intermediate_size": 48}), "model.safetensors",
           "(64, 32)", "(48, 32)", "config.json")
  _refused(_copy("mistral", tmp_path / "e", {"sliding_window": 64}), "sliding_window=64",
           "--max_len 64")
  torn = _copy("llama", tmp_path / "f")
  st = os.path.join(torn, "model.safetensors")
  data = open(st, "rb").read()
  with open(st, "wb") as f:
    f.write(data[: len(data) // 2])
  _refused(torn, "model.safetensors", "download the model again")
  with open(st, "wb") as f:
    f.write(b"\x00" * 64)
  _refused(torn, "model.safetensors", "not a readable safetensors file")


def test_import_and_export_refuse_non_empty_targets(tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "x").write_text("keep")
  with pytest.raises(XlingoError, match="not empty"):
    importer.import_model(fixture("llama"), str(tmp_path / "w"), max_len=128)
  with pytest.raises(XlingoError, match="already exists and is not empty"):
    exporter.export_model(str(tmp_path / "nowhere"), str(tmp_path / "w"))
  assert paths.listdir(str(tmp_path / "w")) == ["x"]


def test_cli_import_then_tools_and_export(tmp_path):
  """The command line writes a workdir that load_model reads as a tool and as init_from does,
  and exporting it gives back the original tensors."""
  import subprocess
  import sys

  from xlingo.training.load import load_model

  work, out = str(tmp_path / "w"), str(tmp_path / "hf")
  r = subprocess.run([sys.executable, "-m", "xlingo.hf", "import", "--model", fixture("qwen2"),
                      "--workdir", work, "--languages", "en,de", "--max_len", "128"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = config_lib.base_config()
  lm = load_model(cfg, work)
  assert lm.table.codes == ("en", "de") and lm.vocab.vocab_size == 320
  assert lm.config.model.qkv_bias and lm.config.model.bos_id == 1
  assert lm.vocab.start_id == lm.config.model.bos_id
  from xlingo.training import restore

  for k in restore.MODEL_KEYS:
    cfg.model[k] = lm.config.model[k]
  cfg.data.languages, cfg.data.vocab_path = ("en", "de", "fr"), lm.vocab_path
  cfg.model.num_languages, cfg.model.lang_emb_init_std = 3, 0.0
  grown = load_model(cfg, work, model_from="config")  # what checkpoint.init_from does
  assert not np.any(np.asarray(grown.params["lang_embedding"]))
  exporter.export_model(work, out)
  original = load_file(os.path.join(fixture("qwen2"), "model.safetensors"))
  exported = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"]


def test_export_refusals():
  meta = {"peft": {"adapter_bottleneck": 8}}
  with pytest.raises(XlingoError, match="no Hugging Face equivalent"):
    exporter._check_peft(meta, False, "W")
  with pytest.raises(XlingoError, match="has no LoRA factors"):
    exporter._check_peft({}, True, "W")
  from xlingo.data.languages import LanguageTable

  table = LanguageTable(("en", "de"))
  rows = np.zeros((2, 4), np.float32)
  assert exporter._language_row({"lang_embedding": rows}, table, None, "W") is None
  rows[1, 0] = 1.0
  with pytest.raises(XlingoError, match="pass --lang"):
    exporter._language_row({"lang_embedding": rows}, table, None, "W")
  with pytest.raises(XlingoError, match="not a language of W"):
    exporter._language_row({"lang_embedding": rows}, table, "fr", "W")
  np.testing.assert_array_equal(
      exporter._language_row({"lang_embedding": rows}, table, "de", "W"), rows[1])
  m = config_lib.base_config().model
  exporter._check_task_head(m, "W")  # an LM (task_classes 0) exports
  m.task_classes = 12
  with pytest.raises(XlingoError, match="fine-tuned classifier"):
    exporter._check_task_head(m, "W")
