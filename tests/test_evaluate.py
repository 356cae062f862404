"""xlingo.evaluate: the loop's validation numbers, translation scores, the transfer matrix."""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import metrics_rows

from configs import tiny
from xlingo import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TEXT = ("--config.train.eval_max_bytes=2000", "--config.train.eval_context=16")


def test_transfer_matrix_and_table_from_results():
  codes = ("en", "de", "ja")
  results = {
      "de": {"step": 4, "metrics": {"val/bpb": 3.0, "val/bpb/en": 3.1, "val/bpb/de": 2.5,
                                    "val/bpb/ja": 4.0}},
      "ja": {"step": 4, "metrics": {"val/bpb": 3.2, "val/bpb/en": 3.3, "val/bpb/ja": 2.0,
                                    "translate/en-ja/bleu": 1.5, "translate/en-ja/chrf": 9.0}},
  }
  t = evaluate.transfer_matrix(results, codes)
  assert t["rows"] == ["de", "ja"] and t["cols"] == ["en", "de", "ja"]
  assert t["values"][0] == [3.1, 2.5, 4.0]
  assert math.isnan(t["values"][1][1])
  text = evaluate.format_table({"results": results, "transfer": t}, codes)
  assert "zero-shot transfer" in text and "1.5/9.0" in text


def test_test_split_table():
  results = {"m": {"step": 4, "metrics": {"test/bpb": 3.0, "test/bpb/en": 3.1,
                                          "test/bytes/en": 900}}}
  text = evaluate.format_table({"results": results, "split": "test"}, ("en", "de"))
  assert text.splitlines()[0] == "test bits per byte" and "3.100" in text
  assert "bytes scored: en 900" in text and " de" not in text.splitlines()[1]
  assert evaluate.metric_prefix("test") == "test/" and evaluate.metric_prefix("validation") == "val/"


def test_translation_pairs_both_directions_and_unknown():
  cfg = tiny.get_config()
  pairs = evaluate.translation_pairs(cfg, ["en-de", "de-en"], {})
  assert pairs["en-de"][0] == pairs["de-en"][0][::-1]
  with pytest.raises(evaluate.ConfigError, match="translate_tsv"):
    evaluate.translation_pairs(cfg, ["de-fr"], {})


@pytest.mark.slow
def test_evaluate_matches_training_log(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "xlingo.train", "--config", "configs/tiny.py",
                  "--workdir", workdir, "--config.train.steps=2", "--config.train.eval_every=2",
                  "--config.checkpoint.every_steps=2", *EVAL_TEXT], cwd=ROOT, env=env,
                 check=True, capture_output=True)
  logged = [r for r in metrics_rows(workdir) if r["step"] == 2 and "val/bpb" in r][-1]
  cfg = tiny.get_config()
  # the same text scored: 2,000 bytes of whole lines per language, long lines in windows
  cfg.train.eval_max_bytes, cfg.train.eval_context = 2000, 16
  out = str(tmp_path / "results.json")
  report = evaluate.run(cfg, {"de": workdir, "ja": workdir}, translate_pairs=["en-de"],
                        max_examples=4, output=out)
  saved = json.load(open(out))
  for label in ("de", "ja"):
    m = saved["results"][label]["metrics"]
    assert saved["results"][label]["step"] == 2
    for lang in cfg.data.languages:
      assert m[f"val/bpb/{lang}"] == pytest.approx(logged[f"val/bpb/{lang}"], rel=1e-5)
      assert m[f"val/bytes/{lang}"] == logged[f"val/bytes/{lang}"] <= 2000
    assert {"translate/en-de/bleu", "translate/en-de/chrf"} <= set(m)
    tr = saved["results"][label]["translation"]["en-de"]
    assert tr["examples"] + tr["skipped_too_long"] == 4 and tr["examples"] > 0
  t = report["transfer"]
  assert (len(t["values"]), len(t["values"][0])) == (2, len(cfg.data.languages))
  # --split test: the same scoring over each language's test lines, named test/*
  test = evaluate.run(cfg, {"m": workdir}, split="test")
  m, v = test["results"]["m"]["metrics"], saved["results"]["de"]["metrics"]
  assert not any(k.startswith("val/") for k in m)
  for lang in cfg.data.languages:
    assert 0 < m[f"test/bytes/{lang}"] <= 2000 and math.isfinite(m[f"test/bpb/{lang}"])
    assert m[f"test/bpb/{lang}"] != v[f"val/bpb/{lang}"]
  assert evaluate.format_table(test, cfg.data.languages).startswith("test bits per byte")
