"""Export check against transformers itself: an adapted model, exported, gives in transformers
the logits it gives in xlingo.

  .venv/bin/python bench/check_hf_export.py [--peer_python .venv-bench/bin/python]
      [--out /tmp/xlingo_hf_check] [--write_fixture]

xlingo's half (this process): imports two of tests/fixtures/hf's tiny models, adapts them a few
steps on the embedded corpus (``python -m xlingo.adapt``'s ``run``: llama_tied in full
fine-tuning, so its German language embedding trains and the export must fold it and untie the
output; qwen2 with LoRA), exports each (LoRA merged, and for qwen2 also ``--peft``), and
records xlingo's own logits of the adapted checkpoints (German language id, LoRA unmerged) and
its greedy continuation. The peer's half (a subprocess in an environment with torch,
transformers and peft: the ``bench`` extra) loads each export with ``AutoModelForCausalLM`` and
``AutoTokenizer`` (the adapter with ``peft.PeftModel`` on the exported base) and compares.
Prints one JSON line; exits 1 when a difference exceeds 1e-4 or a token differs.
``--write_fixture`` also stores the full export and transformers' logits on it as
tests/fixtures/hf/exported_llama_tied, which tests/test_hf.py checks on every CI run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
TEXT = "Debian is a free operating system."
TOL = 1e-4


def adapt_config(import_dir: str, mode: str):
  from xlingo import config as config_lib
  from xlingo.training import load, restore

  _, meta = load.newest_meta(import_dir, "--workdir")
  c = config_lib.base_config()
  for k in restore.MODEL_KEYS:
    c.model[k] = type(c.model[k])(meta[k])
  c.model.max_len, c.model.dtype, c.model.lang_emb_init_std = 128, "float32", 0.0
  c.data.languages, c.data.train_languages = tuple(meta["languages"]), ("de",)
  c.data.vocab_path = meta["vocab_path"]
  c.data.seq_len = 64
  c.adapt = config_lib.adapt_section()
  c.adapt.mode, c.adapt.target_language = mode, "de"
  c.train.steps, c.train.warmup_steps, c.train.learning_rate = 4, 1, 2e-2
  c.train.batch_size, c.train.eval_every, c.train.eval_batches = 8, 4, 1
  c.checkpoint.init_from, c.checkpoint.every_steps = import_dir, 4
  c.checkpoint.async_save = False
  c.adapt.lora.rank = 4
  return c


def xlingo_half(out: str) -> dict:
  """Adapt, export and record xlingo's logits; returns the cases for the peer."""
  import jax.numpy as jnp
  import numpy as np

  from xlingo import adapt, decode
  from xlingo import config as config_lib
  from xlingo.hf import exporter, importer
  from xlingo.training.load import load_model

  cases = []
  for name, mode, peft in (("llama_tied", "full", False), ("qwen2", "lora", True)):
    imp, run = os.path.join(out, f"{name}_import"), os.path.join(out, f"{name}_{mode}")
    importer.import_model(os.path.join(FIXTURES, name), imp, languages=("en", "de"),
                          max_len=128)
    adapt.run(adapt_config(imp, mode), run)
    base = config_lib.base_config()
    base.model.dtype = "float32"
    lm = load_model(base, run)
    de = lm.table.id("de")
    # The Hugging Face model's input is [BOS] + text: xlingo's model.bos_id at position 0.
    ids = [int(lm.config.model.bos_id)] + list(lm.vocab.encode(TEXT))
    x = jnp.asarray([[0] + ids[1:]])
    logits, _ = lm.model.apply({"params": lm.params}, x, lang_ids=jnp.full_like(x, de))
    greedy = decode.generate_ids(lm.model, lm.params, [ids[1:]], de, max_len=8,
                                   eos_id=lm.vocab.eos_id, start_id=lm.vocab.start_id)[0]
    np.save(os.path.join(out, f"{name}_logits.npy"), np.asarray(logits[0]))
    for as_peft in ([False, True] if peft else [False]):
      export = os.path.join(out, f"{name}_{mode}_hf" + ("_peft" if as_peft else ""))
      exporter.export_model(run, export, lang="de", peft=as_peft)
      cases.append({"name": name, "export": export, "peft": as_peft, "ids": ids,
                    "greedy": greedy, "logits": os.path.join(out, f"{name}_logits.npy")})
  return {"cases": cases, "text": TEXT}


def peer_half(spec_path: str, write_fixture: str) -> None:
  """In the bench environment: transformers' logits on each export, compared with xlingo's."""
  import numpy as np
  import torch
  import transformers

  spec = json.load(open(spec_path))
  report, ok = [], True
  for case in spec["cases"]:
    tok = transformers.AutoTokenizer.from_pretrained(case["export"])
    model = transformers.AutoModelForCausalLM.from_pretrained(case["export"],
                                                              dtype=torch.float32).eval()
    if case["peft"]:
      import peft

      model = peft.PeftModel.from_pretrained(model, os.path.join(case["export"], "adapter"))
      model = model.eval()
    ids = case["ids"]
    same_ids = tok(spec["text"], add_special_tokens=False)["input_ids"] == ids[1:]
    with torch.no_grad():
      logits = model(torch.tensor([ids])).logits[0].float().numpy()
      gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                           pad_token_id=0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    gen = gen[:gen.index(eos)] if eos in gen else gen
    diff = float(np.abs(logits - np.load(case["logits"])).max())
    case_ok = diff <= TOL and same_ids and gen == case["greedy"]
    ok &= case_ok
    report.append({"export": os.path.basename(case["export"]), "max_abs_logit_diff": diff,
                   "tokenizer_ids_equal": same_ids, "greedy_equal": gen == case["greedy"],
                   "ok": case_ok})
    if write_fixture and case["name"] == "llama_tied" and not case["peft"]:
      sys.path.insert(0, HERE)
      import make_hf_fixtures

      shutil.rmtree(write_fixture, ignore_errors=True)
      shutil.copytree(case["export"], write_fixture)
      make_hf_fixtures.write_reference(model, write_fixture, ids[0],
                                       np.random.default_rng(7))
  print(json.dumps({"ok": ok, "cases": report}))
  sys.exit(0 if ok else 1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--peer_python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"))
  ap.add_argument("--out", default="/tmp/xlingo_hf_check")
  ap.add_argument("--write_fixture", action="store_true")
  ap.add_argument("--peer", default="", help=argparse.SUPPRESS)  # the peer's half
  ap.add_argument("--fixture_dir", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.peer:
    peer_half(args.peer, args.fixture_dir)
    return
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  spec = xlingo_half(args.out)
  spec_path = os.path.join(args.out, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  fixture = os.path.join(FIXTURES, "exported_llama_tied") if args.write_fixture else ""
  r = subprocess.run([args.peer_python, os.path.abspath(__file__), "--peer", spec_path,
                      "--fixture_dir", fixture])
  sys.exit(r.returncode)


if __name__ == "__main__":
  main()
