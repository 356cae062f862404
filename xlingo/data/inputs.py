"""From a config to iterators: register tasks, size them, set rates, build train/eval streams."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging

import numpy as np
import seqio

from xlingo import paths
from xlingo.data import iterator, mixing, packing, pairs, readers, tasks
from xlingo.data import vocab as xvocab
from xlingo.data.languages import LanguageTable
from xlingo.errors import ConfigError, DataError

SOURCES = {"embedded": "data_tasks.embedded", "files": "data_tasks.files",
           "tfds": "data_tasks.tfds_corpora", "tfds_corpora": "data_tasks.tfds_corpora"}


@dataclasses.dataclass
class InputPlan:
  """Everything decided about the input before the first batch."""

  table: LanguageTable
  vocab: seqio.SentencePieceVocabulary
  vocab_path: str
  lm_tasks: dict  # lang -> task name, for the languages in the run
  mt_tasks: dict  # "src-tgt" -> task name
  stats: list
  rates: dict
  mixture: str
  seq_len: int
  # lang -> task name for validation: every language of data.languages that has data, so a
  # run on some languages (adaptation) still reports what happens to the others
  eval_tasks: dict = dataclasses.field(default_factory=dict)
  # the mixture training reads: ``mixture`` itself (per example, group_size 0) or the same
  # rates over the tasks' grouped twins (groups of ``group_size`` texts)
  train_mixture: str = ""
  group_size: int = 0
  examples_per_read: int = readers.EXAMPLES_PER_READ
  # "src-tgt" -> parallel task name, for train.contrastive.pairs (xlingo/data/pairs.py)
  pair_tasks: dict = dataclasses.field(default_factory=dict)

  def table_text(self, run_tokens: float) -> str:
    return mixing.format_table(self.stats, self.rates, run_tokens)


def load_vocab_for(data_cfg, model_vocab_size: int | None = None):
  path = data_cfg.vocab_path or xvocab.embedded_vocab_path()
  vocab = xvocab.load_vocab(path)
  if model_vocab_size is not None:
    xvocab.check_vocab_matches(vocab, model_vocab_size)
  return path, vocab


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


def _estimate_tokens(task_name: str, examples: int, table: LanguageTable, vocab,
                     sample: int = 256) -> int:
  """Tokens in a task's train split: exact when it is small, else scaled from a sample.

  The sample is the split's first examples, parsed and tokenized as training reads them
  (readers.py). Line-file tasks are read straight from their files (a second or less for
  every task together); other sources go through the task's own tf.data pipeline.
  """
  spec = tasks.task_spec(task_name)
  if spec.files.get("train"):
    texts, sources = [], []
    for path in spec.files["train"]:
      for text, source in readers.file_examples(path, spec.fmt, limit=sample - len(texts)):
        texts.append(text)
        sources.append(source or "")
      if len(texts) >= sample:
        break
    srcs = np.array(sources, object) if spec.fmt == readers.FORMAT_TSV else None
    lens = np.diff(readers.encode_examples(vocab.tokenizer, vocab.eos_id, texts, srcs)[1])
  else:
    lens = [len(ex["targets"]) for ex in task_examples(task_name, "train", sample, table, vocab)]
  if not len(lens):
    raise DataError(f"task {task_name}: its train split yields no examples; check its files")
  if len(lens) < sample:
    return int(sum(lens))
  return int(round(np.mean(lens) * examples))


def task_examples(name: str, split: str, num: int, table: LanguageTable, vocab) -> list[dict]:
  """The first ``num`` examples of a task's split (unshuffled), tokenized as training and
  evaluation tokenize them: ``targets`` (tokens, EOS included), ``prefix_len`` (a conditional
  example's source tokens), ``lang_id`` and ``src_lang_id`` (0 without a source)."""
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
             "lang_id": int(g["lang_ids"][i]), "src_lang_id": int(g["src_lang_ids"][i])}
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
  return out[:num]


def plan_inputs(config) -> InputPlan:
  """Validate the data config, register tasks and the mixture, and compute the rates."""
  d = config.data
  packing.check_packing(d.packing)
  group_size = check_group_size(d.group_size, d.examples_per_read)
  table = LanguageTable(d.languages)
  if len(table) > config.model.num_languages and config.model.use_lang_emb:
    raise ConfigError(
        f"data.languages has {len(table)} languages but model.num_languages="
        f"{config.model.num_languages}; raise model.num_languages")
  vocab_path, vocab = load_vocab_for(d, config.model.vocab_size)
  reg = register_tasks(d, vocab, vocab_path)
  train_langs = tuple(d.get("train_languages", ()) or d.languages)
  lm_tasks = {}
  for lang in train_langs:
    if lang not in reg.lm:
      raise DataError(f"language {lang!r} has no data in source {d.source!r} "
                      f"(available: {sorted(reg.lm)}); remove it from data.languages")
    lm_tasks[lang] = reg.lm[lang]
  mt_tasks = {}
  for pair in d.get("translation_pairs", ()) or ():
    if pair not in reg.mt:
      raise DataError(f"translation pair {pair!r} has no data in source {d.source!r} "
                      f"(available: {sorted(reg.mt)}); fix data.translation_pairs")
    for lang in pair.split("-"):
      table.id(lang)
    mt_tasks[pair] = reg.mt[pair]
  stats = []
  for lang, name in list(lm_tasks.items()) + [(p.split("-")[1], n) for p, n in mt_tasks.items()]:
    n = seqio.get_mixture_or_task(name).num_input_examples("train") or 0
    stats.append(mixing.TaskStats(name=name, lang=lang, examples=int(n),
                                  tokens=_estimate_tokens(name, int(n), table, vocab)))
  run_tokens = float(config.train.steps * config.train.batch_size * d.seq_len)
  rates = mixing.compute_rates(
      stats, sampling=d.sampling, temperature=d.temperature, budget_tokens=run_tokens,
      unimax_max_epochs=d.unimax_max_epochs, weights=dict(d.get("language_weights", {}) or {}))
  mixing.check_epochs(stats, rates, run_tokens, d.get("max_epochs", 0.0))
  mixture = mixing.register_mixture(rates)
  train_mixture = mixture
  if group_size:
    # The mixture draws groups: a task's group rate is its example rate over its mean group
    # size, so that examples are still drawn at the example rates.
    grouped = {tasks.register_grouped(k, group_size, d.shuffle_buffer):
               v / tasks.mean_group_size(k, group_size) for k, v in rates.items()}
    train_mixture = mixing.register_mixture(grouped, prefix="xlingo.gmix")
  eval_tasks = {lang: reg.lm[lang] for lang in d.languages if lang in reg.lm}
  eval_tasks.update(lm_tasks)
  return InputPlan(table=table, vocab=vocab, vocab_path=vocab_path, lm_tasks=lm_tasks,
                   mt_tasks=mt_tasks, stats=stats, rates=rates, mixture=mixture,
                   seq_len=d.seq_len, eval_tasks=eval_tasks, train_mixture=train_mixture,
                   group_size=group_size,
                   examples_per_read=d.examples_per_read,
                   pair_tasks=pairs.pair_tasks(config, reg.mt, table))


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


class RowSlice:
  """This process's rows of a global batch that every process packs identically.

  Used when a source cannot be split among processes (a line task with fewer files than
  processes, e.g. the embedded corpus; iterator.reads_its_share): every process reads the same full stream, packs the whole global batch and
  keeps rows [i*B/n, (i+1)*B/n). The global batch is then the one a single process would
  build, whatever the process count, and so is the iterator state (``replicated``): a
  checkpoint's data state resumes under any number of processes. The price is that each
  process tokenizes and packs n times its share.
  """

  replicated = True

  def __init__(self, it: iterator.PackedIterator, lo: int, hi: int):
    self.it, self.lo, self.hi = it, lo, hi

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {k: v[self.lo:self.hi] for k, v in next(self.it).items()}

  @property
  def batches(self) -> int:
    return self.it.batches

  def save(self, directory: str) -> None:
    self.it.save(directory)

  def restore(self, directory: str) -> None:
    self.it.restore(directory)


def _packed(plan: InputPlan, name: str, split: str, global_batch: int, packing: str, *,
            seed: int, repeat: bool, grouped: bool = False, **kw):
  """A PackedIterator for this process: over its own share of the data, or over the full
  stream and sliced by rows (RowSlice)."""
  import jax

  shard = iterator.shard_info()
  local = local_batch_size(global_batch)
  provider = seqio.get_mixture_or_task(name)

  def packed(shard, batch):
    ds = iterator.mixture_dataset(name, split=split, shard=shard, seed=seed, repeat=repeat, **kw)
    if grouped:
      reader = readers.TextGroupReader(ds, plan.table, plan.vocab, plan.group_size, seed,
                                       plan.examples_per_read, locate=tasks.find_line)
    else:
      reader = readers.ExampleReader(ds, plan.table, plan.vocab, locate=tasks.find_line)
    # Training streams read ahead in a thread; evaluation reads a few batches and stops.
    return iterator.PackedIterator(reader, batch, plan.seq_len, packing, background=repeat)

  if shard is None or iterator.reads_its_share(provider, split, shard.num_shards):
    return packed(shard, local)
  logging.info("%s: fewer %s files than the %d processes; every process packs the global "
               "batch from the full stream and keeps its rows", name, split, shard.num_shards)
  lo = jax.process_index() * local
  return RowSlice(packed(None, global_batch), lo, lo + local)


def train_iterator(plan: InputPlan, config):
  """This process's training batches (a PackedIterator or a RowSlice over one; with a
  contrastive term, joined to the pair stream: pairs.WithPairs)."""
  lm = _packed(plan, plan.train_mixture or plan.mixture, "train", config.train.batch_size,
               config.data.packing, seed=config.data.seed, grouped=plan.group_size > 0,
               shuffle=True, repeat=True)
  return pairs.attach(lm, plan, config)


def eval_batches(plan: InputPlan, config, lang: str, num_batches: int) -> list[dict]:
  """The first ``num_batches`` packed validation batches of one language (fixed, unshuffled).

  Always first-fit packed, whatever ``data.packing``: every example is scored whole.
  """
  name = (plan.eval_tasks or plan.lm_tasks)[lang]
  if "validation" not in seqio.get_mixture_or_task(name).splits:
    return []
  it = _packed(plan, name, "validation", config.train.batch_size, "first_fit", seed=0,
               shuffle=False, repeat=False)
  out = []
  for batch in it:
    out.append(batch)
    if len(out) >= num_batches:
      break
  if not out:
    logging.warning("language %s: empty validation split", lang)
  # Every process evaluates the same number of batches (the step is collective); a process
  # whose shard ran short gets batches that carry no weight.
  while out and len(out) < num_batches:
    out.append({k: np.zeros_like(v) for k, v in out[0].items()})
  return out


__all__ = ["InputPlan", "plan_inputs", "train_iterator", "eval_batches", "task_examples",
           "load_vocab_for", "DataError", "tasks"]
