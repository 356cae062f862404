"""TFDS-backed tasks (data.source='tfds'): wiki40b through seqio.TfdsDataSource, on mock data.

Nothing is downloaded: ``tfds.testing.mock_data`` yields random examples from the builders' own
feature specs. Split sizes come from metadata written here (as a prepared dataset has), since
seqio's ``num_input_examples`` reads them from the builder's info.
"""

import gc
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from data_tasks import tfds_corpora
from xlingo.data import inputs, packing
from xlingo.errors import DataError

SIZES = {"train": 30, "validation": 10}


def _write_metadata(data_dir, tfds_name):
  """dataset_info.json with split sizes, as ``tfds build`` leaves next to the data."""
  b = tfds.builder(tfds_name, data_dir=str(data_dir))
  b.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in SIZES.items()]))
  os.makedirs(b.data_dir, exist_ok=True)
  b.info.write_to_directory(b.data_dir)


def test_wiki40b_mock_batches_carry_language_ids(tmp_path):
  langs = ("en", "de")
  for lang in langs:
    _write_metadata(tmp_path, tfds_corpora.tfds_spec("wiki40b", lang)[0])
  cfg = tiny.get_config()
  cfg.data.source = "tfds"
  cfg.data.tfds_name = "wiki40b"
  cfg.data.tfds_data_dir = str(tmp_path)
  cfg.data.languages = langs
  with tfds.testing.mock_data(num_examples=SIZES["train"],
                              policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
    plan = inputs.plan_inputs(cfg)
    assert {s.lang: s.examples for s in plan.stats} == {"en": 30, "de": 30}
    assert all(s.tokens > 30 for s in plan.stats)
    assert sum(plan.rates.values()) == pytest.approx(1.0)
    it = inputs.train_iterator(plan, cfg)
    batches = [next(it) for _ in range(3)]
    ev = inputs.eval_batches(plan, cfg, "de", 1)
    del it
    gc.collect()
  for b in batches:
    assert b["targets"].shape == (cfg.train.batch_size, cfg.data.seq_len)
    seg = b["segment_ids"]
    assert np.all(b["loss_weights"][seg == 0] == 0)
    for r in range(seg.shape[0]):
      for s in set(seg[r].tolist()) - {0}:
        assert len(set(b["lang_ids"][r][seg[r] == s].tolist())) == 1
  seen = set(np.concatenate([b["lang_ids"][b["segment_ids"] > 0] for b in batches]).tolist())
  assert seen == {plan.table.id("en"), plan.table.id("de")}
  assert len(ev) == 1 and set(ev[0]["lang_ids"][ev[0]["segment_ids"] > 0].tolist()) == {1}
  assert set(packing.FEATURES) <= set(batches[0])


def test_tfds_spec_names_and_splits():
  assert tfds_corpora.tfds_spec("wiki40b", "de") == (
      "wiki40b/de:1.3.0", {"train": "train", "validation": "validation"})
  assert tfds_corpora.tfds_spec("c4/multilingual", "de") == (
      "c4/multilingual:3.1.0", {"train": "de", "validation": "de-validation"})
  with pytest.raises(DataError, match="not supported"):
    tfds_corpora.tfds_spec("oscar", "de")
