"""The SeqIO data layer: rates, packing with language ids, determinism, resume, bad input."""

import collections
import json
import math
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
from scipy import stats as scipy_stats

from configs import tiny
from xlingo.data import inputs, iterator, mixing, packing, readers, tasks
from xlingo.data.languages import LanguageTable
from xlingo.errors import ConfigError, DataError


def _stream_of(*chunks):
  """A TokenStream of (tokens, lang) examples."""
  st = packing.TokenStream()
  for tokens, lang in chunks:
    n = len(tokens)
    st.add(np.asarray(tokens, np.int32), np.full(n, lang, np.int32), np.ones(n, np.float32),
           np.arange(n) == 0)
  return st


def test_first_fit_ids_positions_and_shift():
  st = _stream_of(([5, 6, 1], 3), ([7, 1], 1), ([8, 9, 10, 1], 2), ([11, 12, 13, 14, 1], 4))
  (b,) = packing.first_fit_batches(st, batch_size=2, seq_len=6)
  # first fit: row 0 <- [5 6 1][7 1]; row 1 <- [8 9 10 1]; the 5-token chunk fits nowhere.
  np.testing.assert_array_equal(b["targets"][0], [5, 6, 1, 7, 1, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0, 1, 0])
  np.testing.assert_array_equal(b["lang_ids"][0], [3, 3, 3, 1, 1, 0])
  np.testing.assert_array_equal(b["inputs"][0], [0, 5, 6, 0, 7, 0])
  np.testing.assert_array_equal(b["loss_weights"][0], [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(b["targets"][1], [8, 9, 10, 1, 0, 0])
  np.testing.assert_array_equal(b["lang_ids"][1], [2, 2, 2, 2, 0, 0])
  # the last batch is incomplete until the stream ends: its chunk stays in the stream
  assert len(st) == 5 and packing.first_fit_batches(st, 2, 6) == []
  (b2,) = packing.first_fit_batches(st, 2, 6, final=True)
  np.testing.assert_array_equal(b2["targets"][0], [11, 12, 13, 14, 1, 0])
  np.testing.assert_array_equal(b2["lang_ids"][0], [4, 4, 4, 4, 4, 0])
  assert len(st) == 0 and packing.first_fit_batches(st, 2, 6, final=True) == []


def test_first_fit_splits_long_examples_and_packs_many_batches():
  # a 10-token example at seq_len 4 -> chunks 4, 4, 2, each its own segment
  st = _stream_of((list(range(20, 30)), 1), ([3, 1], 0))
  cstart, clens = packing._chunks(st.starts, 4)
  np.testing.assert_array_equal(cstart, [0, 4, 8, 10])
  np.testing.assert_array_equal(clens, [4, 4, 2, 2])
  batches = packing.first_fit_batches(st, batch_size=1, seq_len=4, final=True)
  got = [b["targets"][0].tolist() for b in batches]
  assert got == [[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 3, 1]]
  np.testing.assert_array_equal(batches[2]["segment_ids"][0], [1, 1, 2, 2])
  np.testing.assert_array_equal(batches[2]["positions"][0], [0, 1, 0, 1])
  np.testing.assert_array_equal(batches[1]["inputs"][0], [0, 24, 25, 26])


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
      preprocessors=[], shuffle_buffer_size=64,
      output_features={"targets": seqio.Feature(vocabulary=vocab, dtype=tf.int32)})


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


@pytest.mark.parametrize("temperature", [1.0, 3.33, 1e6])
def test_grouped_reader_draws_examples_at_the_rates(plan, temperature):
  """Training takes groups from the real grouped tasks on the host (readers.GroupReader): over
  2,500 groups each task's group count is within one of its group rate's share (rate / mean
  group size) at every read, and the examples they carry match the example rates n^(1/T)."""
  k = 8  # small groups: many short block-end groups, so the size correction matters
  rates = mixing.compute_rates(plan.stats, sampling="temperature", temperature=temperature,
                               budget_tokens=1e6, unimax_max_epochs=4.0)
  names = [s.name for s in plan.stats]
  mean = [tasks.mean_group_size(t, k) for t in names]
  assert all(1 <= m <= k for m in mean) and min(mean) < k
  streams = [iterator.mixture_dataset(tasks.register_grouped(t, k, 64), split="train", seed=1,
                                      shuffle=True, repeat=True, shard=None) for t in names]
  codes = [(tasks.task_spec(t).lang, "", "") for t in names]
  reader = readers.GroupReader(streams, lambda x: [rates[t] for t in names], mean,
                               [1.0] * len(names), 1e9, codes, plan.table, plan.vocab, k,
                               seed=1, examples_per_read=8 * k)
  g = np.array([rates[t] / m for t, m in zip(names, mean, strict=True)])
  g /= g.sum()
  groups, examples = collections.Counter(), collections.Counter()
  for r in range(1, 2501 // 8 + 1):
    b = reader.fetch()
    for lang, n in zip(b["lang"], np.diff(b["row_splits"]), strict=True):
      groups[lang.decode()] += 1
      examples[lang.decode()] += int(n)
    got = np.array([groups[s.lang] for s in plan.stats])
    assert np.all(np.abs(got - g * 8 * r) < 1.0 + 1e-9), (r, got, g * 8 * r)
  n = {s.lang: s.examples for s in plan.stats}
  langs = sorted(n)
  want = np.array([n[lang] ** (1 / temperature) for lang in langs])
  share = np.array([examples[lang] for lang in langs]) / sum(examples.values())
  np.testing.assert_allclose(share, want / want.sum(), rtol=0.03)


def test_mean_group_size_counts_block_end_groups(tmp_path):
  # 37 lines, 2 blank: one block (k=4 -> 64 lines) of 35 non-blank lines = 8 groups of 4 + 3
  lines = [f"Zeile {i}" if i not in (5, 20) else "  " for i in range(37)]
  (tmp_path / "de.txt").write_text("\n".join(lines) + "\n")
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.txt"))
  p = inputs.plan_inputs(cfg)
  assert tasks.mean_group_size(p.lm_tasks["de"], 4) == pytest.approx(35 / 9)
  r = _group_reader(p.lm_tasks["de"], p, group_size=4)
  texts = [p.vocab.decode([int(t) for t in ex[0][:-1]]) for ex in _examples_of(_pieces(r))]
  assert sorted(texts) == sorted(x for x in lines if x.strip())


def test_grouped_source_shuffles_lines_within_blocks(tmp_path):
  """Shuffled, a group is not a run of consecutive lines; unshuffled, it is (file order)."""
  (tmp_path / "de.txt").write_text("".join(f"Zeile {i}\n" for i in range(300)))
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.txt"))
  p = inputs.plan_inputs(cfg)
  g = tasks.register_grouped(p.lm_tasks["de"], 8, 64)
  task = seqio.get_mixture_or_task(g)

  def first_groups(shuffle, seed):
    ds = task.source.get_dataset("train", shuffle=shuffle, seed=seed)
    return [[int(x.split()[1]) for x in grp["targets"]] for grp in ds.take(3).as_numpy_iterator()]

  assert first_groups(False, None) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
  a = first_groups(True, 3)
  assert a == first_groups(True, 3) and a != first_groups(True, 4)
  assert all(max(x) - min(x) > 8 for x in a) and all(max(x) < 128 for x in a)  # one block


def test_grouped_jsonl_and_tsv_files(tmp_path):
  """JSONL records (text field, blank or missing ones skipped) and TSV pairs from files."""
  recs = [{"text": "Hallo Welt"}, {"text": "  "}, {"other": 1}, {"text": "Guten Tag"}]
  (tmp_path / "de.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
  (tmp_path / "en-de.tsv").write_text("Hello\tHallo\nGood day\tGuten Tag\n")
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.jsonl"))
  cfg.data.languages = ("de", "en")
  cfg.data.train_languages = ("de",)
  cfg.data.file_pair_patterns["en-de"] = str(tmp_path / "en-de.tsv")
  cfg.data.translation_pairs = ("en-de",)
  p = inputs.plan_inputs(cfg)
  got = _examples_of(_pieces(_group_reader(p.lm_tasks["de"], p)))
  assert sorted(p.vocab.decode([int(t) for t in ex[0][:-1]]) for ex in got) == [
      "Guten Tag", "Hallo Welt"]
  pairs = _examples_of(_pieces(_group_reader(p.mt_tasks["en-de"], p)))
  assert len(pairs) == 2
  for toks, langs, weights in pairs:
    k = weights.index(1.0)
    assert p.vocab.decode([int(t) for t in toks[:k]]) in ("Hello", "Good day")
    assert set(langs[:k]) == {p.table.id("en")} and set(langs[k:]) == {p.table.id("de")}
  batch = next(inputs.train_iterator(p, cfg))
  assert batch["loss_weights"].sum() > 0


def test_jsonl_bad_record_is_named(tmp_path):
  (tmp_path / "de.jsonl").write_text('{"text": "ok"}\n{not json\n')
  cfg = _files_cfg(tmp_path, de=str(tmp_path / "de.jsonl"))
  with pytest.raises(DataError, match="de.jsonl line 2 is not valid JSON"):
    inputs.plan_inputs(cfg)
  # planning reads every record (exact token counts): a bad one far down is named there
  lines = [json.dumps({"text": f"Zeile {i}"}) for i in range(600)]
  (tmp_path / "de.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
  with pytest.raises(DataError, match=r"de\.jsonl line 601 is not valid JSON"):
    inputs.plan_inputs(cfg)
  # and the readers name the file and line too (the file changed after planning)
  (tmp_path / "de.jsonl").write_text("\n".join(lines) + "\n")
  p = inputs.plan_inputs(cfg)
  (tmp_path / "de.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
  it = inputs.train_iterator(p, cfg)
  with pytest.raises(DataError, match=r"de\.jsonl line 601 is not valid JSON \(b'\{not json'\)"):
    for _ in range(20):
      next(it)
  cfg.data.group_size = 0  # the per-example reader (evaluation's) as well
  (tmp_path / "de.jsonl").write_text("\n".join(lines) + "\n")
  p = inputs.plan_inputs(cfg)
  (tmp_path / "de.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
  it = inputs.train_iterator(p, cfg)
  with pytest.raises(DataError, match=r"de\.jsonl line 601 is not valid JSON"):
    for _ in range(20):
      next(it)


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
    for k in packing.FEATURES:
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
    for k in packing.FEATURES:
      np.testing.assert_array_equal(got[k], want[k])


def _group_reader(name, plan, group_size=64, seed=0, shuffle=False, repeat=False):
  g = tasks.register_grouped(name, group_size, 1024)
  ds = iterator.mixture_dataset(g, split="train", seed=seed, shuffle=shuffle, repeat=repeat,
                                shard=None)
  spec = tasks.task_spec(name)
  return readers.GroupReader([ds], lambda x: [1.0], [1.0], [1.0], 1.0,
                             [(spec.lang, spec.src_lang, spec.fmt)], plan.table, plan.vocab,
                             group_size, seed)


def _examples_of(pieces):
  """Pieces of the token stream -> [(tokens, lang_ids, weights)] per example."""
  out = []
  for tokens, lang_ids, weights, starts, *_ in pieces:
    bounds = list(np.flatnonzero(starts)) + [len(tokens)]
    out += [(tuple(tokens[a:b]), tuple(lang_ids[a:b]), tuple(weights[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:])]
  return out


def _pieces(reader):
  return list(iter(reader.read, None))


@pytest.mark.parametrize("kind", ["lm", "mt"])
def test_training_and_evaluation_tokenize_lines_identically(kind):
  """The training reader (groups, GroupReader) and evaluation's (single examples,
  ExampleReader) give exactly the same examples (tokens, language tags, weights), as a multiset
  (training shuffles each read), over a whole pass of the de LM task / the en-de pairs; and
  they are SentencePiece's own ids of each line (source, target, EOS)."""
  cfg = tiny.get_config()
  cfg.data.translation_pairs = ("en-de",)
  p = inputs.plan_inputs(cfg)
  name = p.lm_tasks["de"] if kind == "lm" else p.mt_tasks["en-de"]
  ds = iterator.mixture_dataset(name, split="train", seed=0, shuffle=False, repeat=False,
                                shard=None)
  evaluation = _examples_of(_pieces(readers.ExampleReader(ds, p.table, p.vocab)))
  training = _examples_of(_pieces(_group_reader(name, p)))
  assert len(training) == len(evaluation) == seqio.get_mixture_or_task(
      name).num_input_examples("train")
  assert collections.Counter(training) == collections.Counter(evaluation)
  sp = p.vocab.tokenizer
  spec = tasks.task_spec(name)
  want = []
  for line in open(spec.files["train"][0], encoding="utf-8").read().split("\n"):
    if line.strip():
      src, tgt = line.split("\t", 1) if kind == "mt" else ("", line)
      want.append(tuple(sp.EncodeAsIds(src) + sp.EncodeAsIds(tgt) + [p.vocab.eos_id]))
  assert sorted(want) == sorted(ex[0] for ex in evaluation)
  if kind == "mt":  # the source is tagged en with no loss, the target de
    toks, langs, weights = evaluation[0]
    k = weights.index(1.0)
    assert k > 0 and set(langs[:k]) == {p.table.id("en")} and set(langs[k:]) == {p.table.id("de")}


def test_grouped_reads_are_shuffled_across_groups(plan):
  """One read's examples come from many groups, in a seeded order."""
  r = _group_reader(plan.lm_tasks["de"], plan, group_size=8, seed=0, shuffle=True, repeat=True)
  first = _examples_of([r.read()])
  again = _examples_of([_group_reader(plan.lm_tasks["de"], plan, 8, 0, True, True).read()])
  other = _examples_of([_group_reader(plan.lm_tasks["de"], plan, 8, 5, True, True).read()])
  assert first == again and first != other
  assert len(first) >= 0.9 * readers.EXAMPLES_PER_READ  # (block-end groups are short)


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
  (ex,) = inputs.task_examples(p.mt_tasks["en-de"], "train", 1, p.table, p.vocab)
  tokens, lang_ids, weights, *_ = packing.flatten_group(
      {"values": ex["targets"], "row_splits": np.array([0, len(ex["targets"])]),
       "lang_ids": np.array([ex["lang_id"]]), "src_lang_ids": np.array([ex["src_lang_id"]]),
       "prefix_len": np.array([ex["prefix_len"]])}, p.table, {})
  k = ex["prefix_len"]
  assert k > 0 and np.all(weights[:k] == 0) and np.all(weights[k:] == 1)
  assert np.all(lang_ids[:k] == p.table.id("en")) and np.all(lang_ids[k:] == p.table.id("de"))
  src_text = p.vocab.decode(tokens[:k].tolist())
  tgt_text = p.vocab.decode(tokens[k:-1].tolist())
  assert src_text.isascii() and tgt_text and tokens[-1] == p.vocab.eos_id


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
    ds = iterator.mixture_dataset(p.lm_tasks["de"], split="train", seed=0, shuffle=False,
                                  repeat=False, shard=seqio.ShardInfo(idx, 2))
    seen.append([ex["targets"].decode() for ex in ds.as_numpy_iterator()])
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
  table = LanguageTable(["en", "de", "fr"])
  group = _stream([([5, 6, 1], "de", 0, ""), ([7, 8, 9, 10, 11, 1], "fr", 2, "en"),
                   ([12, 1], "en", 0, ""), ([13, 14, 15, 16, 17, 18, 19, 1], "de", 0, "")])
  st = packing.TokenStream()
  st.add(*packing.flatten_group(group, table, {}))
  assert len(st) == 19
  b1, b2 = packing.concat_batches(st, batch_size=2, seq_len=4)  # the two full batches
  assert len(st) == 3
  b = b1
  # rows: [5 6 1 | 7] [8 9 10 11] -- the fr example continues in row 1 as a new segment
  np.testing.assert_array_equal(b["targets"], [[5, 6, 1, 7], [8, 9, 10, 11]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["inputs"], [[0, 5, 6, 0], [0, 8, 9, 10]])
  # fr example: its first 2 tokens are the en source, no loss there; its target continues in
  # row 1, where the source is not: no loss there either (never trained without its source)
  np.testing.assert_array_equal(b["lang_ids"], [[1, 1, 1, 0], [0, 2, 2, 2]])
  np.testing.assert_array_equal(b["loss_weights"], [[1, 1, 1, 0], [0, 0, 0, 0]])
  b = b2
  np.testing.assert_array_equal(b["targets"], [[1, 12, 1, 13], [14, 15, 16, 17]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 2, 2, 3], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["lang_ids"], [[2, 0, 0, 1], [1, 1, 1, 1]])
  # the end of a finite stream: zero padding, segment 0, no weight
  (b,) = packing.concat_batches(st, 2, 4, final=True)
  np.testing.assert_array_equal(b["targets"], [[18, 19, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["inputs"], [[0, 18, 19, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loss_weights"], [[1, 1, 1, 0], [0, 0, 0, 0]])
  assert packing.concat_batches(st, 2, 4, final=True) == []


def test_flatten_group_tags_sources_and_starts():
  table = LanguageTable(["en", "de"])
  examples = [([11, 12, 13, 14, 1], "de", 3, "en"), ([15], "en", 0, ""), ([16, 17, 1], "de", 0, "")]
  tokens, lang_ids, weights, starts, _, sourced = packing.flatten_group(_stream(examples),
                                                                       table, {})
  np.testing.assert_array_equal(tokens, [11, 12, 13, 14, 1, 15, 16, 17, 1])
  np.testing.assert_array_equal(lang_ids, [0, 0, 0, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(weights, [0, 0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.flatnonzero(starts), [0, 5, 6])
  np.testing.assert_array_equal(sourced, [1, 1, 1, 1, 1, 0, 0, 0, 0])
  # ids given instead of codes: the same
  g = _stream(examples)
  g["lang_ids"] = np.array([1, 0, 1], np.int32)
  g["src_lang_ids"] = np.array([0, 0, 0], np.int32)
  for a, b in zip(packing.flatten_group(g, table, {}),
                  (tokens, lang_ids, weights, starts, np.zeros(9), sourced)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(DataError, match="unknown language 'xx'"):
    packing.flatten_group(_stream([([3, 1], "xx", 0, "")]), table, {})


def test_concat_packing_loses_and_duplicates_no_token(plan):
  """A finite stream packed with concat: the batches' tokens are the examples', in order."""
  name = plan.lm_tasks["de"]
  examples = [ex["targets"] for ex in inputs.task_examples(name, "validation", 10**6, plan.table,
                                                            plan.vocab)]
  ds = iterator.mixture_dataset(name, split="validation", seed=0, shuffle=False, repeat=False,
                                shard=None)
  it = iterator.PackedIterator(readers.ExampleReader(ds, plan.table, plan.vocab), 4, 64,
                               packing="concat")
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
    for k in packing.FEATURES:
      np.testing.assert_array_equal(got[k], w[k])
  # the same seed gives the same batches
  again = inputs.train_iterator(plan, cfg)
  np.testing.assert_array_equal(next(again)["targets"], first[0]["targets"])


def test_packing_change_at_restore_repacks_unplaced_tokens(plan, stream):
  """A first_fit state restored under concat keeps every token read (no loss, no repeat):
  its packed batches come first, then its unplaced stream, concatenated."""
  _, state, after = stream
  cfg = tiny.get_config()
  cfg.data.packing = "concat"
  it = inputs.train_iterator(plan, cfg)
  it.restore(state)
  with np.load(os.path.join(state, "stream.npz")) as z:
    ready = len(z["ready_targets"]) if "ready_targets" in z else 0
    head = z["tokens"]
  got = [next(it) for _ in range(ready + 3)]
  for g, w in zip(got[:ready], after, strict=False):
    np.testing.assert_array_equal(g["targets"], w["targets"])
  rest = np.concatenate([b["targets"].reshape(-1) for b in got[ready:]])
  n = min(len(head), len(rest))
  assert n > 0
  np.testing.assert_array_equal(rest[:n], head[:n])


def test_restore_under_another_group_size_is_refused(plan, stream, tmp_path):
  _, state, _ = stream
  cfg = tiny.get_config()
  cfg.data.group_size = 0
  p = inputs.plan_inputs(cfg)
  with pytest.raises(DataError, match="resume with --config.data.group_size=64 "
                     "--config.data.examples_per_read=4096"):
    inputs.train_iterator(p, cfg).restore(state)


def test_bad_group_size():
  cfg = tiny.get_config()
  cfg.data.group_size = -1  # (a non-integer is refused by the typed ConfigDict itself)
  with pytest.raises(ConfigError, match="data.group_size=-1"):
    inputs.plan_inputs(cfg)
  cfg = tiny.get_config()
  cfg.data.examples_per_read = 0
  with pytest.raises(ConfigError, match="data.examples_per_read=0"):
    inputs.plan_inputs(cfg)


def test_unknown_packing():
  cfg = tiny.get_config()
  cfg.data.packing = "best_fit"
  with pytest.raises(ConfigError, match="data.packing"):
    inputs.plan_inputs(cfg)


def test_restore_into_another_pipeline_is_one_line(tmp_path):
  """A tf.data state of another graph (a data config or an xlingo version whose pipeline
  differs, e.g. per-example tasks that tokenized in tf.data) is refused in one line; a
  damaged one is left to the checkpoint layer as unreadable."""
  saved = iter(tf.data.Dataset.range(100).batch(4).prefetch(2))
  next(saved)
  tf.train.Checkpoint(iterator=saved).write(str(tmp_path / iterator.TF_ITERATOR))
  other = iter(tf.data.Dataset.range(100).shuffle(8, seed=0).batch(4))
  with pytest.raises(DataError, match="written by another input pipeline than this run's"):
    iterator._read_tf_iterator(other, str(tmp_path))
  same = iter(tf.data.Dataset.range(100).batch(4).prefetch(2))
  iterator._read_tf_iterator(same, str(tmp_path))
  assert next(same).numpy().tolist() == [4, 5, 6, 7]
  (data,) = tmp_path.glob(iterator.TF_ITERATOR + ".data-*")
  data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
  with pytest.raises(tf.errors.OpError):
    iterator._read_tf_iterator(iter(tf.data.Dataset.range(100).batch(4).prefetch(2)),
                               str(tmp_path))


def test_validation_set_scores_first_bytes_of_whole_lines(plan):
  """train.eval_max_bytes: the split's first N bytes of whole lines, whatever the batching (or
  the tokenizer: the cut is made on the text); every token of them scored once."""
  path = os.path.join(os.path.dirname(tasks.__file__), "corpus", "mono", "de.validation.txt")
  lines = open(path, encoding="utf-8").read().splitlines()
  cfg = tiny.get_config()
  cfg.train.eval_max_bytes = 3000
  sizes = np.cumsum([len(x.encode()) for x in lines])
  want = int(sizes[sizes <= 3000][-1])
  for batch_size in (cfg.train.batch_size, 2):
    cfg.train.batch_size = batch_size
    got = inputs.validation_set(plan, cfg, "de")
    scored = sum(float((b["raw_bytes"] * b["loss_weights"]).sum()) for b in got)
    assert scored == want
  cfg.train.eval_max_bytes = 0  # the whole split
  whole = sum(float((b["raw_bytes"] * b["loss_weights"]).sum())
              for b in inputs.validation_set(plan, cfg, "de"))
  assert whole == int(sizes[-1])
  cfg.train.eval_max_bytes = -2
  with pytest.raises(ConfigError, match="eval_max_bytes"):
    inputs.validation_set(plan, cfg, "de")
  cfg.train.eval_max_bytes, cfg.train.eval_context = 0, cfg.data.seq_len
  with pytest.raises(ConfigError, match="eval_context"):
    inputs.validation_set(plan, cfg, "de")
