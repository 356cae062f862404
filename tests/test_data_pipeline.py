"""The SeqIO data layer: rates, packing with language ids, determinism, resume, bad input."""

import collections
import math
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
from scipy import stats as scipy_stats

from configs import tiny
from xlingo.config import ConfigError
from xlingo.data import inputs, mixing, pipeline, tasks
from xlingo.data.tasks import DataError


def _chunk(tokens, lang, w=None):
  tokens = np.asarray(tokens, np.int32)
  return pipeline._Chunk(tokens, np.full(len(tokens), lang, np.int32),
                         np.ones(len(tokens), np.float32) if w is None else np.asarray(w, np.float32))


def test_packer_ids_positions_and_shift():
  p = pipeline.Packer(batch_size=2, seq_len=6)
  chunks = iter([_chunk([5, 6, 1], 3), _chunk([7, 1], 1), _chunk([8, 9, 10, 1], 2),
                 _chunk([11, 12, 13, 14, 1], 4)])
  b = p.pack(chunks)
  # first fit: row 0 <- [5 6 1][7 1]; row 1 <- [8 9 10 1]; the 5-token chunk fits nowhere.
  np.testing.assert_array_equal(b["targets"][0], [5, 6, 1, 7, 1, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(b["lang_ids"][0], [3, 3, 3, 1, 1, 0])
  np.testing.assert_array_equal(b["inputs"][0], [0, 5, 6, 0, 7, 0])
  np.testing.assert_array_equal(b["loss_weights"][0], [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(b["targets"][1], [8, 9, 10, 1, 0, 0])
  np.testing.assert_array_equal(b["lang_ids"][1], [2, 2, 2, 2, 0, 0])
  assert len(p.pending) == 1
  b2 = p.pack(chunks)
  np.testing.assert_array_equal(b2["targets"][0], [11, 12, 13, 14, 1, 0])
  np.testing.assert_array_equal(b2["lang_ids"][0], [4, 4, 4, 4, 4, 0])
  with pytest.raises(StopIteration):
    p.pack(chunks)


def test_example_to_chunks_prefix_and_long_split():
  table = pipeline.LanguageTable(["en", "de"])
  ex = {"targets": np.arange(2, 9), "lang": b"de", "src_lang": b"en", "prefix_len": 3}
  (c,) = pipeline.example_to_chunks(ex, table, 16)
  np.testing.assert_array_equal(c.lang_ids, [0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(c.weights, [0, 0, 0, 1, 1, 1, 1])
  long = {"targets": np.arange(2, 12), "lang": b"en", "src_lang": b"", "prefix_len": 0}
  chunks = pipeline.example_to_chunks(long, table, 4)
  assert [len(c.tokens) for c in chunks] == [4, 4, 2]
  with pytest.raises(DataError, match="unknown language 'xx'"):
    pipeline.example_to_chunks({**long, "lang": b"xx"}, table, 4)


def test_unimax_budgets_cap_small_languages():
  budgets = mixing.unimax_token_budgets({"a": 10, "b": 100, "c": 10_000}, budget=3000,
                                        max_epochs=2)
  assert budgets["a"] == 20 and budgets["b"] == 200
  assert math.isclose(budgets["c"], 2780)
  # Large enough data everywhere: uniform.
  budgets = mixing.unimax_token_budgets({"a": 1e6, "b": 1e6}, budget=1000, max_epochs=1)
  assert budgets == {"a": 500, "b": 500}


@pytest.fixture(scope="module")
def plan():
  return inputs.plan_inputs(tiny.get_config())


def _light_task(name, lang, index, n, vocab):
  """A seqio Task with ``n`` examples of one language and no tokenizing: cheap to sample."""

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensors(
        {"targets": tf.constant([index], tf.int32), "lang": tf.constant(lang)}).repeat(n)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"],
                                            num_input_examples={"train": n}),
      preprocessors=[], output_features=tasks.output_features(vocab), shuffle_buffer_size=64)


@pytest.mark.parametrize("temperature", [1.0, 3.33, 1e6])
def test_mixture_proportions_match_temperature(plan, temperature):
  """Rates from seqio.mixing_rate_num_examples are n^(1/T); a seqio.Mixture samples them.

  The rates are computed on the plan's real tasks (as plan_inputs does); the 20,000 draws go
  through seqio's mixture sampling over stand-in tasks with the same example counts and rates,
  which carry no text, so that sampling is cheap.
  """
  cfg = tiny.get_config()
  rates = mixing.compute_rates(plan.stats, sampling="temperature", temperature=temperature,
                               budget_tokens=1e6, unimax_max_epochs=4.0)
  if temperature == cfg.data.temperature:  # the plan fixture is tiny's config: same path
    assert plan.rates == pytest.approx(rates)
  n = {s.lang: s.examples for s in plan.stats}
  raw = {k: v ** (1 / temperature) for k, v in n.items()}
  expected = {k: v / sum(raw.values()) for k, v in raw.items()}
  by_lang = {s.lang: s.name for s in plan.stats}
  for lang, want in expected.items():
    assert rates[by_lang[lang]] == pytest.approx(want, rel=1e-6)
  # The registered mixture over the real tasks carries these rates.
  real = seqio.get_mixture_or_task(mixing.register_mixture(rates))
  for t in real.tasks:
    assert real.get_rate(t) == pytest.approx(rates[t.name] / sum(rates.values()))
  light = {}
  for i, s in enumerate(plan.stats):
    light[s.name] = _light_task(f"test.light.{s.lang}", s.lang, i, s.examples, plan.vocab)
  name = mixing.register_mixture({light[k].name: v for k, v in rates.items()},
                                 prefix="test.light.mix")
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split="train", shuffle=True, seed=1, num_epochs=None,
      trim_output_features=False, passthrough_features=["lang"])
  num = 20_000
  counts = collections.Counter()
  for b in ds.take(num).batch(4096).as_numpy_iterator():
    counts.update(x.decode() for x in b["lang"])
  assert sum(counts.values()) == num
  langs = sorted(expected)
  obs = np.array([counts[lang] for lang in langs], float)
  exp = np.array([expected[lang] * num for lang in langs])
  chi2, pvalue = scipy_stats.chisquare(obs, exp)
  assert pvalue > 1e-3, (temperature, dict(zip(langs, obs, strict=True)), exp, chi2)


def test_plan_table_lists_every_language(plan):
  text = plan.table_text(run_tokens=1e6)
  for lang in tiny.get_config().data.languages:
    assert f" {lang} " in text
  assert "epochs" in text and sum(plan.rates.values()) == pytest.approx(1.0)


def _first_batches(plan, cfg, n, it=None):
  it = it or inputs.train_iterator(plan, cfg)
  return it, [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def stream(plan, tmp_path_factory):
  """One train stream: its first 5 batches, its state saved then, and the 4 batches after."""
  cfg = tiny.get_config()
  it, first = _first_batches(plan, cfg, 5)
  state = str(tmp_path_factory.mktemp("iterator") / "state")
  it.save(state)
  after = [next(it) for _ in range(4)]
  return first, state, after


def test_batches_are_deterministic_and_language_tagged(plan, stream):
  cfg = tiny.get_config()
  a = stream[0][:3]
  _, b = _first_batches(plan, cfg, 3)
  for x, y in zip(a, b):
    for k in pipeline.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])
  batch = a[0]
  assert batch["targets"].shape == (cfg.train.batch_size, cfg.data.seq_len)
  seg = batch["segment_ids"]
  # Within a segment one language (LM tasks); padding is segment 0 with no weight.
  for r in range(seg.shape[0]):
    for s in set(seg[r]) - {0}:
      assert len(set(batch["lang_ids"][r][seg[r] == s])) == 1
  assert np.all(batch["loss_weights"][seg == 0] == 0)
  # Tokens decode to text of the tagged language's script for CJK rows.
  table = plan.table
  ja = table.id("ja")
  rows = [(r, s) for r in range(seg.shape[0]) for s in set(seg[r]) - {0}]
  assert len({int(batch["lang_ids"][r][seg[r] == s][0]) for r, s in rows}) > 1
  del ja
  # Different seed, different stream.
  cfg2 = tiny.get_config()
  cfg2.data.seed = 7
  _, c = _first_batches(plan, cfg2, 1)
  assert not np.array_equal(c[0]["targets"], a[0]["targets"])


def test_iterator_state_restores_exactly(plan, stream):
  cfg = tiny.get_config()
  _, state, expected = stream
  fresh = inputs.train_iterator(plan, cfg)
  fresh.restore(state)
  assert fresh.batches == 5
  for want in expected:
    got = next(fresh)
    for k in pipeline.FEATURES:
      np.testing.assert_array_equal(got[k], want[k])


def test_batched_chunks_match_per_example_chunks(plan):
  """The ragged-group path gives exactly the chunks of example_to_chunks, example by example."""
  cfg = tiny.get_config()
  cfg.data.translation_pairs = ("en-de",)
  ds = pipeline.mixture_dataset(plan.lm_tasks["de"], split="train", seed=0, shuffle=False,
                                repeat=False, shard=None).take(40)
  examples = list(ds.as_numpy_iterator())
  # Include a conditional example and a long one that is split.
  examples.append({"targets": np.arange(2, 30, dtype=np.int32), "lang": b"de",
                   "src_lang": b"en", "prefix_len": np.int32(5)})
  seq_len = 16
  want = [c for ex in examples for c in pipeline.example_to_chunks(ex, plan.table, seq_len)]
  lens = [len(ex["targets"]) for ex in examples]
  b = {"values": np.concatenate([ex["targets"] for ex in examples]).astype(np.int32),
       "row_splits": np.concatenate([[0], np.cumsum(lens)]),
       "lang": np.array([ex["lang"] for ex in examples], object),
       "src_lang": np.array([ex["src_lang"] for ex in examples], object),
       "prefix_len": np.array([ex["prefix_len"] for ex in examples], np.int32)}
  got = pipeline._batch_to_chunks(b, plan.table, seq_len, {})
  assert len(got) == len(want) > len(examples)
  for g, w in zip(got, want, strict=True):
    for k in ("tokens", "lang_ids", "weights"):
      np.testing.assert_array_equal(getattr(g, k), getattr(w, k))


def test_eval_batches_fixed_per_language(plan):
  cfg = tiny.get_config()
  a = inputs.eval_batches(plan, cfg, "de", 2)
  b = inputs.eval_batches(plan, cfg, "de", 2)
  assert len(a) == 2
  np.testing.assert_array_equal(a[0]["targets"], b[0]["targets"])
  de = plan.table.id("de")
  lang = a[0]["lang_ids"][a[0]["segment_ids"] > 0]
  assert np.all(lang == de)


def test_translation_task_is_prefix_lm(plan):
  cfg = tiny.get_config()
  cfg.data.translation_pairs = ("en-de",)
  p = inputs.plan_inputs(cfg)
  ds = pipeline.mixture_dataset(p.mt_tasks["en-de"], split="train", seed=0, shuffle=False,
                                repeat=False, shard=None)
  ex = next(ds.as_numpy_iterator())
  (c,) = pipeline.example_to_chunks(ex, p.table, 10_000)
  k = int(ex["prefix_len"])
  assert k > 0 and np.all(c.weights[:k] == 0) and np.all(c.weights[k:] == 1)
  assert np.all(c.lang_ids[:k] == p.table.id("en")) and np.all(c.lang_ids[k:] == p.table.id("de"))
  vocab = p.vocab
  src_text = vocab.decode(c.tokens[:k].tolist())
  assert src_text and src_text.isascii() is not None


# --- bad input -----------------------------------------------------------------------------


def _files_cfg(tmp_path, **patterns):
  cfg = tiny.get_config()
  cfg.data.source = "files"
  cfg.data.languages = tuple(patterns)
  for lang, pat in patterns.items():
    cfg.data.file_patterns[lang] = pat
  return cfg


def test_files_source_trains_on_user_text(tmp_path):
  (tmp_path / "de.txt").write_text("Guten Morgen, wie geht es dir?\nDas ist gut.\n" * 50)
  (tmp_path / "fr.jsonl").write_text('{"text": "Bonjour tout le monde."}\n' * 50)
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.txt"), fr=str(tmp_path / "fr.jsonl"))
  p = inputs.plan_inputs(cfg)
  batch = next(inputs.train_iterator(p, cfg))
  langs = set(batch["lang_ids"][batch["segment_ids"] > 0].tolist())
  assert langs == {0, 1}
  text = p.vocab.decode(batch["targets"][0][batch["segment_ids"][0] == 1].tolist())
  assert "Bonjour" in text or "Guten" in text or "Das" in text


def test_missing_language_file(tmp_path):
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "nothing*.txt"))
  with pytest.raises(DataError, match="no file matches"):
    inputs.plan_inputs(cfg)


def test_empty_language_file(tmp_path):
  (tmp_path / "de.txt").write_text("")
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.txt"))
  with pytest.raises(DataError, match="is empty"):
    inputs.plan_inputs(cfg)


def test_invalid_utf8(tmp_path):
  (tmp_path / "de.txt").write_bytes(b"gut\nschlecht \xff\xfe kaputt\n")
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.txt"))
  with pytest.raises(DataError, match=r"line 2 is not valid UTF-8"):
    inputs.plan_inputs(cfg)


def test_unknown_language():
  cfg = tiny.get_config()
  cfg.data.languages = ("en", "xx")
  with pytest.raises(DataError, match="'xx' has no data"):
    inputs.plan_inputs(cfg)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_bad_temperature(t):
  cfg = tiny.get_config()
  cfg.data.temperature = t
  with pytest.raises(ConfigError, match="data.temperature"):
    inputs.plan_inputs(cfg)


def test_missing_and_mismatched_vocab(tmp_path):
  cfg = tiny.get_config()
  cfg.data.vocab_path = str(tmp_path / "nope.model")
  with pytest.raises(ValueError, match="nope.model"):
    inputs.plan_inputs(cfg)
  cfg = tiny.get_config()
  cfg.model.vocab_size = 1000
  with pytest.raises(ValueError, match="1000"):
    inputs.plan_inputs(cfg)


def test_file_level_sharding_splits_examples(tmp_path):
  for i in range(2):
    (tmp_path / f"de-{i}.txt").write_text("".join(f"Zeile {i}-{j}\n" for j in range(40)))
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de-*.txt"))
  p = inputs.plan_inputs(cfg)
  seen = []
  for idx in range(2):
    ds = pipeline.mixture_dataset(p.lm_tasks["de"], split="train", seed=0, shuffle=False,
                                  repeat=False, shard=seqio.ShardInfo(idx, 2))
    seen.append([p.vocab.decode(ex["targets"].tolist()) for ex in ds.as_numpy_iterator()])
  assert len(seen[0]) == len(seen[1]) == 40
  assert not set(seen[0]) & set(seen[1])
  assert {s.split("-")[0] for s in seen[0]} != {s.split("-")[0] for s in seen[1]}
  assert os.path.exists(tmp_path / "de-0.txt")


# --- concat packing ------------------------------------------------------------------------


def _stream(examples):
  """(tokens, lang, prefix, src) examples -> a ragged group as PackedIterator reads it."""
  lens = [len(t) for t, *_ in examples]
  return {"values": np.concatenate([np.asarray(t, np.int32) for t, *_ in examples]),
          "row_splits": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
          "lang": np.array([lang.encode() for _, lang, _, _ in examples], object),
          "src_lang": np.array([src.encode() for *_, src in examples], object),
          "prefix_len": np.array([p for _, _, p, _ in examples], np.int32)}


def test_concat_packer_cuts_the_stream_into_rows():
  table = pipeline.LanguageTable(["en", "de", "fr"])
  group = _stream([([5, 6, 1], "de", 0, ""), ([7, 8, 9, 10, 11, 1], "fr", 2, "en"),
                   ([12, 1], "en", 0, ""), ([13, 14, 15, 16, 17, 18, 19, 1], "de", 0, "")])
  p = pipeline.ConcatPacker(batch_size=2, seq_len=4)
  p.add(*pipeline.flatten_group(group, table, {}))
  assert len(p) == 19
  b = p.take()
  # rows: [5 6 1 | 7] [8 9 10 11] -- the fr example continues in row 1 as a new segment
  np.testing.assert_array_equal(b["targets"], [[5, 6, 1, 7], [8, 9, 10, 11]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["inputs"], [[0, 5, 6, 0], [0, 8, 9, 10]])
  # fr example: its first 2 tokens are the en source, no loss there
  np.testing.assert_array_equal(b["lang_ids"], [[1, 1, 1, 0], [0, 2, 2, 2]])
  np.testing.assert_array_equal(b["loss_weights"], [[1, 1, 1, 0], [0, 1, 1, 1]])
  b = p.take()
  np.testing.assert_array_equal(b["targets"], [[1, 12, 1, 13], [14, 15, 16, 17]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 2, 2, 3], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["lang_ids"], [[2, 0, 0, 1], [1, 1, 1, 1]])
  # the end of a finite stream: zero padding, segment 0, no weight
  b = p.take()
  np.testing.assert_array_equal(b["targets"], [[18, 19, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["inputs"], [[0, 18, 19, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loss_weights"], [[1, 1, 1, 0], [0, 0, 0, 0]])
  with pytest.raises(StopIteration):
    p.take()


def test_flatten_group_matches_example_to_chunks():
  table = pipeline.LanguageTable(["en", "de"])
  rng = np.random.default_rng(0)
  examples = [(rng.integers(3, 99, n).tolist(), lang, p, src)
              for n, lang, p, src in [(7, "de", 3, "en"), (1, "en", 0, ""), (12, "de", 0, ""),
                                      (5, "en", 5, "de")]]
  tokens, lang_ids, weights, starts = pipeline.flatten_group(_stream(examples), table, {})
  want = [pipeline.example_to_chunks({"targets": t, "lang": lang, "src_lang": src,
                                      "prefix_len": p}, table, 1000)[0]
          for t, lang, p, src in examples]
  np.testing.assert_array_equal(tokens, np.concatenate([c.tokens for c in want]))
  np.testing.assert_array_equal(lang_ids, np.concatenate([c.lang_ids for c in want]))
  np.testing.assert_array_equal(weights, np.concatenate([c.weights for c in want]))
  np.testing.assert_array_equal(np.flatnonzero(starts), [0, 7, 8, 20])
  with pytest.raises(DataError, match="unknown language 'xx'"):
    pipeline.flatten_group(_stream([([3, 1], "xx", 0, "")]), table, {})


def test_concat_packing_loses_and_duplicates_no_token(plan):
  """A finite stream packed with concat: the batches' tokens are the examples', in order."""
  ds = pipeline.mixture_dataset(plan.lm_tasks["de"], split="validation", seed=0, shuffle=False,
                                repeat=False, shard=None)
  examples = [ex["targets"] for ex in ds.as_numpy_iterator()]
  it = pipeline.PackedIterator(ds, plan.table, 4, 64, packing="concat")
  batches = list(it)
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  segs = np.concatenate([b["segment_ids"].reshape(-1) for b in batches])
  pos = np.concatenate([b["positions"].reshape(-1) for b in batches])
  assert np.all(segs[:-1][segs[:-1] == 0] == 0) and segs.size - np.count_nonzero(segs) < 4 * 64
  np.testing.assert_array_equal(targets[segs > 0], np.concatenate(examples))
  # every example starts a segment (position 0); a segment also starts at every row start
  starts = np.flatnonzero((pos == 0) & (segs > 0))
  ex_starts = np.concatenate([[0], np.cumsum([len(e) for e in examples])[:-1]])
  assert set(ex_starts) <= set(starts)
  assert set(starts) - set(ex_starts) <= set(range(0, segs.size, 64))
  de = plan.table.id("de")
  assert np.all(np.concatenate([b["lang_ids"][b["segment_ids"] > 0] for b in batches]) == de)
  assert all(np.all(b["loss_weights"] == (b["segment_ids"] > 0)) for b in batches)


def test_concat_state_restores_exactly(plan, tmp_path):
  cfg = tiny.get_config()
  cfg.data.packing = "concat"
  it = inputs.train_iterator(plan, cfg)
  first = [next(it) for _ in range(3)]
  assert all(np.all(b["segment_ids"] > 0) for b in first)  # no padding in a repeated stream
  it.save(str(tmp_path / "s"))
  want = [next(it) for _ in range(4)]
  fresh = inputs.train_iterator(plan, cfg)
  fresh.restore(str(tmp_path / "s"))
  assert fresh.batches == 3
  for w in want:
    got = next(fresh)
    for k in pipeline.FEATURES:
      np.testing.assert_array_equal(got[k], w[k])
  # the same seed gives the same batches
  again = inputs.train_iterator(plan, cfg)
  np.testing.assert_array_equal(next(again)["targets"], first[0]["targets"])


def test_packing_change_at_restore_repacks_unplaced_tokens(plan, stream):
  """A first_fit state restored under concat keeps every unplaced token (no loss, no repeat)."""
  _, state, _ = stream
  cfg = tiny.get_config()
  cfg.data.packing = "concat"
  it = inputs.train_iterator(plan, cfg)
  it.restore(state)
  with np.load(os.path.join(state, "pending.npz")) as z:
    pend = [z[k] for k in sorted((k for k in z.files if k.startswith("tokens_")),
                                 key=lambda k: int(k.split("_")[1]))]
  head = np.concatenate(pend) if pend else np.zeros(0, np.int32)
  got = np.concatenate([next(it)["targets"].reshape(-1) for _ in range(3)])
  n = min(len(head), len(got))
  assert n > 0
  np.testing.assert_array_equal(got[:n], head[:n])


def test_unknown_packing():
  cfg = tiny.get_config()
  cfg.data.packing = "best_fit"
  with pytest.raises(ConfigError, match="data.packing"):
    inputs.plan_inputs(cfg)
