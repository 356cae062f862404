"""TFDS-backed tasks (data.source='tfds'): wiki40b through seqio's TFDS source.

Nothing is downloaded: ``tfds.testing.mock_data`` yields random examples from the builders' own
feature specs (split sizes come from metadata written here, as a prepared dataset has, since
seqio's ``num_input_examples`` reads them from the builder's info). The mock ignores which part
of a split is asked for, so the per-process shares are tested on a tiny dataset prepared here
in wiki40b's own layout (its features, TFRecord shards and metadata).
"""

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import free_port

from configs import tiny
from data_tasks import tfds_corpora
from xlingo.data import inputs, iterator, packing
from xlingo.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    for s in plan.stats:  # sampled from 16 parts of the split (the mock gives each all 30)
      whole = inputs.task_examples(s.name, "train", 100, plan.table, plan.vocab)
      assert len(whole) == 30 and s.tokens == sum(len(ex["targets"]) for ex in whole)
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


# --- each process reads its share --------------------------------------------------------------

SHARDS = {"train": [7, 7, 7], "validation": [9]}  # examples per file: 3 train files, 1 validation


def _prepare(data_dir, lang):
  """wiki40b/<lang> with SHARDS' files, written as ``tfds build`` leaves a dataset."""
  b = tfds.builder(tfds_corpora.tfds_spec("wiki40b", lang)[0], data_dir=str(data_dir))
  os.makedirs(b.data_dir, exist_ok=True)
  infos = []
  for split, shards in SHARDS.items():
    template = tfds.core.ShardedFileTemplate(data_dir=b.data_dir, dataset_name="wiki40b",
                                             split=split, filetype_suffix="tfrecord")
    k = 0
    for i, n in enumerate(shards):
      with tf.io.TFRecordWriter(os.fspath(template.sharded_filepath(
          shard_index=i, num_shards=len(shards)))) as w:
        for _ in range(n):
          w.write(b.info.features.serialize_example(
              {"wikidata_id": f"Q{k}", "text": f"{lang} {split} Satz {k}", "version_id": "1"}))
          k += 1
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=shards, num_bytes=0,
                                     filename_template=template))
  b.info.set_splits(tfds.core.SplitDict(infos))
  b.info.write_to_directory(b.data_dir)


def _tfds_cfg(data_dir):
  cfg = tiny.get_config()
  cfg.data.source = "tfds"
  cfg.data.tfds_name = "wiki40b"
  cfg.data.tfds_data_dir = str(data_dir)
  cfg.data.languages = ("de",)
  return cfg


def _texts(ds) -> list[str]:
  """The raw texts of a per-example or grouped stream."""
  out = []
  for ex in ds.as_numpy_iterator():
    t = ex["targets"]
    out += [x.decode() for x in ([t] if isinstance(t, bytes) else t)]
  return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare(data_dir, "de")
  return data_dir


@pytest.mark.parametrize("split", ["train", "validation"])
def test_each_process_reads_its_share_of_a_tfds_split(prepared, split):
  """Two processes' shares of a TFDS split (3 files: whole files; 1 file: an even slice of
  its examples) are disjoint and together the one process's stream, for the per-example task
  (evaluation) and the grouped training mixture alike."""
  plan = inputs.plan_inputs(_tfds_cfg(prepared))
  for name in (plan.lm_tasks["de"], plan.train_streams[0]):
    assert iterator.reads_its_share(seqio.get_mixture_or_task(name), split, 2)
    one = _texts(iterator.mixture_dataset(name, split=split, seed=0, shuffle=False,
                                          repeat=False, shard=None))
    assert len(one) == sum(SHARDS[split])
    parts = [_texts(iterator.mixture_dataset(name, split=split, seed=0, shuffle=False,
                                             repeat=False, shard=seqio.ShardInfo(i, 2)))
             for i in range(2)]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(one)


def _decoded(batches, vocab) -> list[str]:
  """The examples (one segment each: they are short) of packed batches, as text."""
  out = []
  for b in batches:
    for row, segs in zip(b["targets"], b["segment_ids"], strict=True):
      for s in sorted(set(segs.tolist()) - {0}):
        out.append(vocab.decode([int(t) for t in row[segs == s][:-1]]))
  return out


def _worker(data_dir: str, out: str) -> None:
  """One process of a 2-process run: its evaluation batches and one pass of its training
  mixture, as texts."""
  from xlingo import cli

  cli.maybe_initialize_distributed()
  import jax

  cfg = _tfds_cfg(data_dir)
  plan = inputs.plan_inputs(cfg)
  ev = inputs.eval_batches(plan, cfg, "de", 20)
  train = iterator.mixture_dataset(plan.train_streams[0], split="train", seed=0, shuffle=True,
                                   repeat=False, shard=iterator.shard_info())
  # Where a source cannot be split, every process reads the whole stream and keeps its rows
  # (inputs.RowSlice, whose state is the same in every process: "replicated").
  replicated = getattr(inputs.train_iterator(plan, cfg), "replicated", False)
  with open(out, "w") as f:
    json.dump({"process": jax.process_index(), "processes": jax.process_count(),
               "replicated": replicated, "eval": _decoded(ev, plan.vocab),
               "train": _texts(train)}, f)


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_of_tfds(prepared, tmp_path):
  """Two real processes (jax.distributed on CPU): each reads and packs only its share of the
  validation split (evaluation) and of the training mixture; the union of both is what one
  process reads."""
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               XLINGO_COORDINATOR=f"127.0.0.1:{port}", XLINGO_NUM_PROCESSES="2",
               XLINGO_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(prepared), str(tmp_path / f"{i}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  got = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
  assert [g["process"] for g in got] == [0, 1] and {g["processes"] for g in got} == {2}
  assert not any(g["replicated"] for g in got)

  cfg = _tfds_cfg(prepared)
  plan = inputs.plan_inputs(cfg)
  one_eval = _decoded(inputs.eval_batches(plan, cfg, "de", 20), plan.vocab)
  one_train = _texts(iterator.mixture_dataset(plan.train_streams[0], split="train", seed=0,
                                              shuffle=True, repeat=False, shard=None))
  assert len(one_eval) == sum(SHARDS["validation"]) and len(one_train) == sum(SHARDS["train"])
  for key, one in (("eval", one_eval), ("train", one_train)):
    a, b = got[0][key], got[1][key]
    assert a and b and not set(a) & set(b), key
    assert sorted(a + b) == sorted(one), key


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
