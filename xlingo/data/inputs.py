"""From a config to iterators: register tasks, size them, set rates, build train/eval streams."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging

import numpy as np
import seqio

from xlingo import paths
from xlingo.data import (
  counts,
  iterator,
  lineindex,
  mixing,
  packing,
  pairs,
  readers,
  tasks,
  vocabulary,
)
from xlingo.data.languages import LanguageTable
from xlingo.errors import ConfigError, DataError

SOURCES = {"embedded": "data_tasks.embedded", "files": "data_tasks.files",
           "tfds": "data_tasks.tfds_corpora", "tfds_corpora": "data_tasks.tfds_corpora"}


@dataclasses.dataclass
class InputPlan:
  """Everything decided about the input before the first batch."""

  table: LanguageTable
  vocab: seqio.Vocabulary  # either kind behind one face (vocabulary.py)
  vocab_path: str
  lm_tasks: dict  # lang -> task name, for the languages trained on (replayed ones included)
  mt_tasks: dict  # "src-tgt" -> task name
  stats: list
  rates: dict  # example rates at the start of the run
  mixture: str
  seq_len: int
  # lang -> task name for validation: every language of data.languages that has data, so a
  # run on some languages (adaptation) still reports what happens to the others
  eval_tasks: dict = dataclasses.field(default_factory=dict)
  # what training reads: the seqio mixture ``mixture`` (per example, group_size 0), or each
  # task's grouped twin (groups of ``group_size`` texts, drawn on the host at the rates:
  # readers.GroupReader), in the order of ``stats``
  train_streams: tuple = ()
  group_size: int = 0
  examples_per_read: int = readers.EXAMPLES_PER_READ
  # "src-tgt" -> parallel task name, for train.contrastive.pairs (xlingo/data/pairs.py)
  pair_tasks: dict = dataclasses.field(default_factory=dict)
  mix: mixing.Plan | None = None  # the rates over the run
  no_validation: tuple = ()  # languages evaluated on nothing
  no_validation_pairs: tuple = ()  # pairs (trained or contrastive) without validation pairs
  source: str = ""  # data.source, for messages

  def table_text(self, run_tokens: float | None = None) -> str:
    mix = self.mix
    if run_tokens is not None and run_tokens != mix.run_tokens:
      mix = dataclasses.replace(mix, run_tokens=float(run_tokens))
    return mixing.format_table(mix, self.seq_len, self.no_validation,
                               self.no_validation_pairs)

  def planned_shares(self, tokens: float | None = None) -> dict[str, dict[str, float]]:
    """Planned example and token shares by language over the run's first ``tokens`` tokens
    (default: the whole run)."""
    run = self.mix.run_tokens
    return self.mix.shares(0.0, 1.0 if tokens is None else min(tokens / max(run, 1.0), 1.0))


def load_vocab_for(data_cfg, model_vocab_size: int | None = None):
  """(absolute path, vocabulary) of ``data.vocab_path`` (``vocabulary.load_configured``)."""
  return vocabulary.load_configured(data_cfg, model_vocab_size)


def _prefix(data_cfg, vocab_path: str) -> str:
  src = data_cfg.source
  if src == "embedded" and not data_cfg.vocab_path:
    return "xlingo"
  h = hashlib.sha1(paths.resolve(vocab_path).encode()).hexdigest()[:8]
  return f"xlingo.{src}.v{h}"


def register_tasks(data_cfg, vocab, vocab_path):
  if data_cfg.source not in SOURCES:
    raise ConfigError(f"data.source={data_cfg.source!r} is unknown; use one of "
                      f"{sorted(set(SOURCES) - {'tfds_corpora'})}")
  module = importlib.import_module(SOURCES[data_cfg.source])
  prefix = _prefix(data_cfg, vocab_path)
  if prefix == "xlingo" and hasattr(module, "DEFAULT"):
    return module.DEFAULT
  return module.register(data_cfg, vocab, prefix)


def task_examples(name: str, split: str, num: int, table: LanguageTable, vocab) -> list[dict]:
  """The first ``num`` examples of a task's split (unshuffled), tokenized as training and
  evaluation tokenize them (pairs whole: no row to fit): ``targets`` (tokens, EOS included),
  ``prefix_len`` (a conditional example's source tokens), ``lang_id`` and ``src_lang_id`` (0
  without a source), ``raw_bytes`` per token."""
  ds = iterator.mixture_dataset(name, split=split, seed=0, shuffle=False, repeat=False,
                                shard=None)
  reader = readers.ExampleReader(ds, table, vocab, locate=tasks.find_line)
  out: list[dict] = []
  while len(out) < num:
    raw = reader.fetch()
    if raw is None:
      break
    g = reader.examples(raw)
    bounds = g["row_splits"].tolist()
    out += [{"targets": g["values"][a:b], "prefix_len": int(g["prefix_len"][i]),
             "lang_id": int(g["lang_ids"][i]), "src_lang_id": int(g["src_lang_ids"][i]),
             "raw_bytes": g["raw_bytes"][a:b]}
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
  return out[:num]


def plan_inputs(config) -> InputPlan:
  """Validate the data config, register tasks and the mixture, count the tasks' tokens and
  compute the rates (with their schedule and replay). Built once per run."""
  d = config.data
  packing.check_packing(d.packing)
  group_size = check_group_size(d.group_size, d.examples_per_read)
  schedule = mixing.check_schedule(d.temperature_schedule, d.sampling)
  if schedule and not group_size:
    raise ConfigError("data.temperature_schedule draws groups of examples on the host; set "
                      "data.group_size > 0 (e.g. --config.data.group_size=64)")
  table = LanguageTable(d.languages)
  if len(table) > config.model.num_languages and config.model.use_lang_emb:
    raise ConfigError(
        f"data.languages has {len(table)} languages but model.num_languages="
        f"{config.model.num_languages}; raise model.num_languages")
  vocab_path, vocab = load_vocab_for(d, config.model.vocab_size)
  reg = register_tasks(d, vocab, vocab_path)
  train_langs = tuple(d.train_languages or d.languages)
  lm_tasks = {}
  for lang in train_langs:
    if lang not in reg.lm:
      raise DataError(f"language {lang!r} has no data in source {d.source!r} "
                      f"(available: {sorted(reg.lm)}); remove it from data.languages")
    lm_tasks[lang] = reg.lm[lang]
  mt_tasks = {}
  for pair in d.translation_pairs:
    if pair not in reg.mt:
      raise DataError(f"translation pair {pair!r} has no data in source {d.source!r} "
                      f"(available: {sorted(reg.mt)}); fix data.translation_pairs")
    for lang in pair.split("-"):
      table.id(lang)
    mt_tasks[pair] = reg.mt[pair]
  pair_tasks = pairs.pair_tasks(config, reg.mt, table)
  replay_ratio = float(config.adapt.replay_ratio) if "adapt" in config else 0.0
  replay = {}
  if replay_ratio > 0:
    replay = {lang: reg.lm[lang] for lang in d.languages
              if lang not in lm_tasks and lang in reg.lm}
    if not d.train_languages and not mt_tasks:
      raise ConfigError("adapt.replay_ratio needs data.train_languages (the languages adapted "
                        "to); the other languages of data.languages are replayed")
    if not replay:
      raise ConfigError("adapt.replay_ratio > 0 but no other language of data.languages has "
                        "data to replay; add one or set adapt.replay_ratio=0")
  eval_tasks = {lang: reg.lm[lang] for lang in d.languages if lang in reg.lm}
  eval_tasks.update(lm_tasks)
  stats = [_task_stats(name, lang, src, vocab, d.seq_len, eval_tasks)
           for name, lang, src in ([(n, lang, "") for lang, n in {**lm_tasks, **replay}.items()]
                                   + [(n, *reversed(p.split("-"))) for p, n in mt_tasks.items()])]
  run_tokens = float(config.train.steps * config.train.batch_size * d.seq_len)
  rule = mixing.RateRule(
      sampling=d.sampling, temperature=d.temperature, budget_tokens=run_tokens,
      unimax_max_epochs=d.unimax_max_epochs, weights=dict(d.language_weights),
      replay=tuple(replay.values()), replay_ratio=replay_ratio)
  mix = mixing.Plan(tuple(stats), rule, run_tokens, schedule)
  rates = mix.rates_at(0.0)
  mixing.check_epochs(stats, mix.epochs(), d.max_epochs)
  mixture = mixing.register_mixture({s.name: rates[s.name] * s.lines_per_example for s in stats})
  train_streams = (mixture,)
  if group_size:
    train_streams = tuple(tasks.register_grouped(s.name, group_size, d.shuffle_buffer)
                          for s in stats)
  no_validation = tuple(lang for lang, name in eval_tasks.items()
                        if "validation" not in seqio.get_mixture_or_task(name).splits)
  no_validation_pairs = tuple(sorted(
      pair for pair, name in {**mt_tasks, **pair_tasks}.items()
      if "validation" not in seqio.get_mixture_or_task(name).splits))
  return InputPlan(table=table, vocab=vocab, vocab_path=vocab_path,
                   lm_tasks={**lm_tasks, **replay}, mt_tasks=mt_tasks, stats=stats, rates=rates,
                   mixture=mixture, seq_len=d.seq_len, eval_tasks=eval_tasks,
                   train_streams=train_streams, group_size=group_size,
                   examples_per_read=d.examples_per_read, mix=mix, no_validation=no_validation,
                   pair_tasks=pair_tasks, no_validation_pairs=no_validation_pairs,
                   source=d.source)


def _task_stats(name: str, lang: str, src_lang: str, vocab, seq_len: int,
                eval_tasks: dict) -> mixing.TaskStats:
  """A task's train split counted as training reads it (counts.py)."""
  task = seqio.get_mixture_or_task(name)
  c = counts.task_counts(name, "train", vocab, seq_len)
  if not c.examples:
    raise DataError(f"task {name}: its train split yields no examples; check its files")
  lines = int(task.num_input_examples("train") or 0) or c.examples + c.dropped
  # A pair's own validation pairs (BLEU/chrF, retrieval); a language's text (val/bpb).
  evaluated = name if src_lang else eval_tasks.get(lang)
  has_val = evaluated is not None and "validation" in seqio.get_mixture_or_task(evaluated).splits
  return mixing.TaskStats(
      name=name, lang=lang, examples=lines, tokens=c.tokens, src_lang=src_lang,
      source_tokens=c.source_tokens, truncated=c.truncated, cut_tokens=c.cut_tokens,
      dropped=max(lines - c.examples, 0), exact=c.exact, validation=has_val)


def check_group_size(k, examples_per_read) -> int:
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ConfigError(f"data.group_size={k!r} must be an integer >= 0 (examples per sampled "
                      "group; 0 samples single examples); e.g. --config.data.group_size=64")
  if k and examples_per_read < 1:
    raise ConfigError(f"data.examples_per_read={examples_per_read} must be >= 1 (examples "
                      "tokenized per read); e.g. --config.data.examples_per_read=4096")
  return k


def local_batch_size(global_batch: int) -> int:
  import jax

  n = jax.process_count()
  if global_batch % n:
    raise ConfigError(f"train.batch_size={global_batch} does not divide by the {n} processes; "
                      "make it a multiple")
  return global_batch // n


class RowSlice(iterator.Wrapped):
  """This process's rows of a global batch that every process packs identically.

  Used when a source cannot be split among processes (a line task with fewer files than
  processes, e.g. the embedded corpus; iterator.reads_its_share): every process reads the same
  full stream, packs the whole global batch and
  keeps rows [i*B/n, (i+1)*B/n). The global batch is then the one a single process would
  build, whatever the process count, and so is the iterator state (``replicated``): a
  checkpoint's data state resumes under any number of processes. The price is that each
  process tokenizes and packs n times its share.
  """

  replicated = True

  def __init__(self, it: iterator.PackedIterator, lo: int, hi: int):
    super().__init__(it)
    self.lo, self.hi = lo, hi

  def __next__(self) -> dict:
    return {k: v[self.lo:self.hi] for k, v in next(self.inner).items()}


def _packed(plan: InputPlan, names: list[str], split: str, global_batch: int, packing: str,
            make_reader, *, repeat: bool):
  """A PackedIterator for this process over the reader ``make_reader(shard)`` of tasks or
  mixtures ``names``: over its own share of the data, or over the full stream and sliced by
  rows (RowSlice)."""
  import jax

  shard = iterator.shard_info()
  local = local_batch_size(global_batch)

  def packed(shard, batch):
    # Training streams read ahead in a thread; evaluation reads a few batches and stops.
    return iterator.PackedIterator(make_reader(shard), batch, plan.seq_len, packing,
                                   background=repeat)

  if shard is None or all(iterator.reads_its_share(seqio.get_mixture_or_task(n), split,
                                                   shard.num_shards) for n in names):
    return packed(shard, local)
  logging.info("%s: fewer %s files than the %d processes; every process packs the global "
               "batch from the full stream and keeps its rows", names, split, shard.num_shards)
  lo = jax.process_index() * local
  return RowSlice(packed(None, global_batch), lo, lo + local)


def train_iterator(plan: InputPlan, config):
  """This process's training batches (a PackedIterator or a RowSlice over one; with a
  contrastive term, joined to the pair stream: pairs.WithPairs)."""
  d = config.data
  seed, k = d.seed, plan.group_size
  common = dict(locate=tasks.find_line, max_len=plan.seq_len)

  def stream(name, shard):
    return iterator.mixture_dataset(name, split="train", shard=shard, seed=seed, shuffle=True,
                                    repeat=True)

  if not k:
    def make_reader(shard):
      return readers.ExampleReader(stream(plan.mixture, shard), plan.table, plan.vocab, **common)
  else:
    stats = plan.mix.stats
    specs = [tasks.task_spec(s.name) for s in stats]
    # examples trained per group: a group rate is an example rate over this (a line file's
    # groups run on across epochs, so all are full)
    mean = [(k if sp.kind != "tfds" else tasks.mean_group_size(s.name, k)) / s.lines_per_example
            for s, sp in zip(stats, specs, strict=True)]
    group_tokens = [m * s.tokens_per_example for m, s in zip(mean, stats, strict=True)]

    def rates_at(x):
      rates = plan.mix.rates_at(x)
      return [rates[s.name] for s in stats]

    codes = [(sp.lang, sp.src_lang, sp.fmt) for sp in specs]

    def task_stream(t, shard):
      """Line files: this process's files in a global permutation per epoch (lineindex.py);
      TFDS: the grouped twin's tf.data stream (file-level shuffle and a buffer)."""
      sp = specs[t]
      if sp.kind == "tfds":
        return stream(plan.train_streams[t], shard)
      files = list(sp.files["train"])
      if shard is not None:
        files = files[shard.index::shard.num_shards]
      return lineindex.PermutedLines(files, k, seed, lineindex.salt(sp.kind, sp.lang,
                                                                     sp.src_lang),
                                     index_dir=d.line_index_dir)

    def make_reader(shard):
      # Each process reading its own share counts its progress against its share of the run.
      run = plan.mix.run_tokens / (shard.num_shards if shard else 1)
      return readers.GroupReader([task_stream(t, shard) for t in range(len(stats))], rates_at,
                                 mean, group_tokens, run, codes, plan.table, plan.vocab, k, seed,
                                 plan.examples_per_read, **common)

  lm = _packed(plan, list(plan.train_streams), "train", config.train.batch_size, d.packing,
               make_reader, repeat=True)
  return pairs.attach(lm, plan, config)


def check_validation(config) -> None:
  """ConfigError for validation settings that cannot be used (the loop checks them at start)."""
  t = config.train
  if t.eval_max_bytes < -1:
    raise ConfigError(f"train.eval_max_bytes={t.eval_max_bytes}: use -1 (the first "
                      "train.eval_batches batches), 0 (the whole validation split) or a number "
                      "of bytes")
  if not 0 <= t.eval_context < config.data.seq_len:
    raise ConfigError(f"train.eval_context={t.eval_context}: the tokens of context a window "
                      f"keeps must be in [0, data.seq_len={config.data.seq_len})")


def validation_set(plan: InputPlan, config, lang: str, split: str = "validation") -> list[dict]:
  """One language's validation batches as the loop and ``xlingo.evaluate`` score them:
  ``train.eval_max_bytes`` bytes of whole lines (0: the whole split), or with -1 the first
  ``train.eval_batches`` batches; ``split="test"`` the same over the test split
  (``evaluate --split test``)."""
  check_validation(config)
  t = config.train
  if t.eval_max_bytes == -1:
    return eval_batches(plan, config, lang, t.eval_batches, context=t.eval_context, split=split)
  return eval_batches(plan, config, lang, 0, max_bytes=t.eval_max_bytes, context=t.eval_context,
                      split=split)


def eval_batches(plan: InputPlan, config, lang: str, num_batches: int,
                 max_bytes: int = 0, context: int = 0, split: str = "validation") -> list[dict]:
  """The first ``num_batches`` packed validation batches of one language (fixed, unshuffled;
  0: as many as the lines take), over the split's first ``max_bytes`` bytes of whole lines
  (0: all; each of several processes reading its own files takes its share of the bytes).
  A line longer than a row is scored in sliding windows keeping ``context`` tokens of context
  (packing.sliding_windows; 0: cut into rows that restart without context).

  Always first-fit packed, whatever ``data.packing``: every example is scored whole.
  """
  name = (plan.eval_tasks or plan.lm_tasks)[lang]
  if split not in seqio.get_mixture_or_task(name).splits:
    return []

  def make_reader(shard):
    ds = iterator.mixture_dataset(name, split=split, shard=shard, seed=0, shuffle=False,
                                  repeat=False)
    if max_bytes > 0:
      ds = iterator.first_bytes(ds, max_bytes // (shard.num_shards if shard else 1))
    return readers.ExampleReader(ds, plan.table, plan.vocab, locate=tasks.find_line,
                                 max_len=plan.seq_len, context=context)

  it = _packed(plan, [name], split, config.train.batch_size, "first_fit", make_reader,
               repeat=False)
  out = []
  for batch in it:
    out.append(batch)
    if len(out) == num_batches:
      break
  if not out:
    logging.warning("language %s: empty %s split", lang, split)
  # Every process evaluates the same number of batches (the step is collective); a process
  # whose shard ran short gets batches that carry no weight.
  wanted = num_batches or _most_over_processes(len(out))
  if not out and not num_batches and wanted:  # only other processes have lines: take part
    shape = (local_batch_size(config.train.batch_size), plan.seq_len)
    out.append({k: np.zeros(shape, np.float32 if k == "loss_weights" else np.int32)
                for k in packing.FEATURES})
  while out and len(out) < wanted:
    out.append({k: np.zeros_like(v) for k, v in out[0].items()})
  return out


def _most_over_processes(n: int) -> int:
  import jax

  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


__all__ = ["InputPlan", "plan_inputs", "train_iterator", "eval_batches", "validation_set",
           "check_validation", "task_examples", "load_vocab_for", "DataError", "tasks"]
