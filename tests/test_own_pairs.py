"""A user's own parallel files with validation and test splits (data.file_pair_val_patterns,
data.file_pair_test_patterns): registered splits, the start-of-run table, retrieval, BLEU's
pairs, evaluate --translate, and the refusals of bad pair files."""

import logging
import shutil

import pytest

from configs import tiny
from xlingo import evaluate, scoring
from xlingo.data import inputs, pairs, tasks
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError, DataError


def _corpus(tmp_path):
  """en/de/fr text and en-de, en-fr pairs, copied from the embedded corpus into files; en-de
  split into train / validation / test files."""
  corpus = xvocab.corpus_dir()
  for lang in ("en", "de", "fr"):
    shutil.copy(f"{corpus}/mono/{lang}.train.txt", tmp_path / f"{lang}.txt")
    shutil.copy(f"{corpus}/mono/{lang}.validation.txt", tmp_path / f"{lang}.valid.txt")
  lines = open(f"{corpus}/parallel/en-de.validation.tsv", encoding="utf-8").readlines()
  shutil.copy(f"{corpus}/parallel/en-de.train.tsv", tmp_path / "en-de.train.tsv")
  (tmp_path / "en-de.valid.tsv").write_text("".join(lines[:40]), encoding="utf-8")
  (tmp_path / "en-de.test.tsv").write_text("".join(lines[40:60]), encoding="utf-8")
  shutil.copy(f"{corpus}/parallel/en-fr.train.tsv", tmp_path / "en-fr.train.tsv")
  return lines


def _config(tmp_path):
  cfg = tiny.get_config()
  d = cfg.data
  d.source = "files"
  d.languages = ("en", "de", "fr")
  for lang in d.languages:
    d.file_patterns[lang] = str(tmp_path / f"{lang}.txt")
    d.file_val_patterns[lang] = str(tmp_path / f"{lang}.valid.txt")
  d.file_pair_patterns["en-de"] = str(tmp_path / "en-de.train.tsv")
  d.file_pair_patterns["en-fr"] = str(tmp_path / "en-fr.train.tsv")
  d.file_pair_val_patterns["en-de"] = str(tmp_path / "en-de.valid.tsv")
  d.file_pair_test_patterns["en-de"] = str(tmp_path / "en-de.test.tsv")
  d.translation_pairs = ("en-de", "en-fr")
  cfg.train.contrastive.pairs = ("en-de", "en-fr")
  return cfg


def test_pair_splits_registered_tabled_and_read(tmp_path, caplog, capsys):
  lines = _corpus(tmp_path)
  cfg = _config(tmp_path)
  plan = inputs.plan_inputs(cfg)
  de, fr = plan.mt_tasks["en-de"], plan.mt_tasks["en-fr"]
  assert sorted(tasks.task_spec(de).files) == ["test", "train", "validation"]
  assert sorted(tasks.task_spec(fr).files) == ["train"]
  assert plan.no_validation_pairs == ("en-fr",)
  # The table: a pair's own validation pairs, columns aligned under long task names.
  text = plan.table_text()
  rows = text.splitlines()
  head = rows[0]
  assert len(de) > 24 and head.startswith("task" + " " * (len(de) - 4 + 1) + "lang")
  body = [r for r in rows[2:2 + len(plan.stats)]]
  assert all(len(r) == len(head) for r in body), text
  valid = {r.split()[0]: r.split()[-1] for r in body}
  assert valid[de] == "yes" and valid[fr] == "NONE" and valid[plan.lm_tasks["de"]] == "yes"
  assert ("no validation pairs for en-fr: no val/retrieval and no BLEU/chrF on them "
          "(data.file_pair_val_patterns)") in text
  # Retrieval's validation sets: en-de's 40 pairs; en-fr named with the key that gives some.
  from xlingo.training import contrastive

  settings = contrastive.Settings.from_config(cfg)
  with caplog.at_level(logging.WARNING):
    sets = pairs.validation_sets(plan, settings)
  assert list(sets) == ["en-de"] and sets["en-de"][1].shape == (40, 2)
  assert "en-fr: no validation pairs, so no val/retrieval (set " \
         "data.file_pair_val_patterns.en-fr" in caplog.text
  # BLEU's and evaluate's pairs: validation or test, either way round.
  want = [tuple(x.rstrip("\n").split("\t")) for x in lines[:40]]
  assert scoring.validation_pairs(cfg, "en-de") == want
  assert scoring.validation_pairs(cfg, "de-en") == [(t, s) for s, t in want]
  assert len(scoring.validation_pairs(cfg, "en-de", split="test")) == 20
  assert evaluate.translation_pairs(cfg, ["en-de"], {}, "test")["en-de"][0] == \
      tuple(lines[40].rstrip("\n").split("\t"))
  with pytest.raises(ConfigError, match=r"--translate en-fr: no validation pairs; set "
                     r"data\.file_pair_val_patterns\.en-fr \(a glob"):
    evaluate.translation_pairs(cfg, ["en-fr"], {})
  # Adaptation's report names the key that gives a pair BLEU/chrF.
  from xlingo import adapt

  assert adapt.translation_report(cfg, {}) == {"en-de": {}}  # no model to score; en-fr skipped
  assert "en-fr: no validation pairs, so no BLEU/chrF (set data.file_pair_val_patterns.en-fr" \
      in capsys.readouterr().out
  scored = {"m": {"step": 1, "metrics": {"translate/en-de/bleu": 1.5,
                                         "translate/en-de/chrf": 9.0}}}
  head = evaluate.format_table({"results": scored, "translate_split": "test"}, ["en"])
  assert head.startswith("validation bits per byte, translation BLEU/chrF (test pairs)\n")


@pytest.mark.slow
def test_a_short_run_reports_retrieval_on_own_pairs(tmp_path):
  """Pretraining with contrastive alignment on the user's pairs reports val/retrieval for the
  pair given validation files, with no other setting."""
  import json

  from xlingo import train

  _corpus(tmp_path)
  cfg = _config(tmp_path)
  cfg.data.translation_pairs = ()
  cfg.train.contrastive.weight = 0.1
  cfg.train.steps = cfg.train.eval_every = cfg.checkpoint.every_steps = 2
  train.run(cfg, str(tmp_path / "run"))
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  val = [r for r in rows if "val/bpb" in r][-1]
  assert val["step"] == 2
  assert {k for k in val if k.startswith("val/retrieval/")} == {
      "val/retrieval/en-de", "val/retrieval/de-en"}


def _refused(cfg, match):
  with pytest.raises(DataError, match=match) as e:
    inputs.plan_inputs(cfg)
  assert "\n" not in str(e.value)


def test_bad_pair_files_are_refused_before_training(tmp_path):
  _corpus(tmp_path)
  cfg = _config(tmp_path)
  cfg.data.file_pair_val_patterns["en-fr"] = str(tmp_path / "en-fr.valid*.tsv")
  _refused(cfg, r"data\.file_pair_val_patterns\.en-fr: no file matches .*en-fr\.valid\*\.tsv")
  (tmp_path / "en-fr.valid.tsv").write_text("Hello\tBonjour\nGood night\n\nThanks\tMerci\n")
  _refused(cfg, r"data\.file_pair_val_patterns\.en-fr: .*en-fr\.valid\.tsv line 2 has 0 tabs; "
           "each line of a pair file must be source<TAB>target")
  (tmp_path / "en-fr.valid.tsv").write_text("1\tHello\tBonjour\n")
  _refused(cfg, r"en-fr\.valid\.tsv line 1 has 2 tabs")
  (tmp_path / "en-fr.valid.tsv").write_text("Hello\tBonjour\nGood night\tBonne nuit\n")
  cfg.data.file_pair_test_patterns["en-fr"] = str(tmp_path / "en-fr.valid.tsv")
  _refused(cfg, r"data\.file_pair_test_patterns\.en-fr matches .*en-fr\.valid\.tsv, which is "
           r"also a validation file \(data\.file_pair_val_patterns\.en-fr\)")
  del cfg.data.file_pair_test_patterns["en-fr"]
  cfg.data.file_pair_patterns["en-fr"] = str(tmp_path / "en-fr.*.tsv")
  _refused(cfg, r"data\.file_pair_patterns\.en-fr matches .*en-fr\.valid\.tsv, which is also "
           "a validation file")
  cfg.data.file_pair_patterns["en-fr"] = str(tmp_path / "en-fr.train.tsv")
  cfg.data.file_pair_val_patterns["en-es"] = str(tmp_path / "en-fr.valid.tsv")
  _refused(cfg, r"data\.file_pair_val_patterns\.en-es: no data\.file_pair_patterns\.en-es")
  del cfg.data.file_pair_val_patterns["en-es"]
  assert inputs.plan_inputs(cfg).no_validation_pairs == ()
