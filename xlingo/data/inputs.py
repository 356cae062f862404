"""From a config to iterators: register tasks, size them, set rates, build train/eval streams."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os

import numpy as np
import seqio

from xlingo.data import mixing, pipeline, tasks
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError, DataError

SOURCES = {"embedded": "data_tasks.embedded", "files": "data_tasks.files",
           "tfds": "data_tasks.tfds_corpora", "tfds_corpora": "data_tasks.tfds_corpora"}


@dataclasses.dataclass
class InputPlan:
  """Everything decided about the input before the first batch."""

  table: pipeline.LanguageTable
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
  examples_per_read: int = pipeline.EXAMPLES_PER_READ

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
  h = hashlib.sha1(os.path.abspath(vocab_path).encode()).hexdigest()[:8]
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


def _estimate_tokens(task_name: str, examples: int, vocab, sample: int = 256) -> int:
  """Tokens in a task's train split: exact when it is small, else scaled from a sample.

  Line-file tasks are sampled straight from their first lines with SentencePiece (a second or
  less for every task together); other sources go through the task's own tf.data pipeline.
  """
  task = seqio.get_mixture_or_task(task_name)
  lens = _line_file_lengths(task, vocab, sample)
  if lens is None:
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, num_epochs=1,
                          trim_output_features=False, try_in_mem_cache=False)
    lens = [int(ex["targets"].shape[0]) for ex in ds.take(sample).as_numpy_iterator()]
  if not lens:
    raise DataError(f"task {task_name}: its train split yields no examples; check its files")
  if len(lens) < sample:
    return int(sum(lens))
  return int(round(np.mean(lens) * examples))


def _line_file_lengths(task, vocab, sample: int) -> list[int] | None:
  """Token counts (with EOS) of the first ``sample`` examples of a text/TSV/JSONL line task."""
  src = task.source
  if not isinstance(src, seqio.TextLineDataSource) or "train" not in src.splits:
    return None
  spec = tasks.task_spec(task.name)
  texts: list[str] = []
  for path in src.list_shards("train"):
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if spec.kind == "jsonl":
          line = _json_text(line, spec.field, path, lineno)
          if not line.strip():
            continue
        # Parallel (TSV) tasks put source and target in one sequence.
        texts.extend((line.split("\t", 1) + [""])[:2] if spec.kind == "tsv" else [line])
        if len(texts) >= sample * 2:
          break
    if len(texts) >= sample * 2:
      break
  ids = vocab.tokenizer.EncodeAsIds(texts)
  if spec.kind == "tsv":
    return [len(a) + len(b) + 1 for a, b in zip(ids[::2], ids[1::2])][:sample]
  return [len(x) + 1 for x in ids][:sample]


def _json_text(line: str, field: str, path: str, lineno: int) -> str:
  try:
    obj = json.loads(line)
  except ValueError:
    raise DataError(f"{path} line {lineno} is not valid JSON ({line[:60]!r}); fix or remove "
                    "that line") from None
  text = obj.get(field, "") if isinstance(obj, dict) else ""
  return text if isinstance(text, str) else ""


def plan_inputs(config) -> InputPlan:
  """Validate the data config, register tasks and the mixture, and compute the rates."""
  d = config.data
  pipeline.check_packing(d.packing)
  group_size = check_group_size(d.group_size, d.examples_per_read)
  table = pipeline.LanguageTable(d.languages)
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
                                  tokens=_estimate_tokens(name, int(n), vocab)))
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
                   examples_per_read=d.examples_per_read)


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

  Used when the input cannot be split by files (fewer files per task than processes, e.g. the
  embedded corpus): every process reads the same full stream, packs the whole global batch and
  keeps rows [i*B/n, (i+1)*B/n). The global batch is then the one a single process would
  build, whatever the process count, and so is the iterator state (``replicated``): a
  checkpoint's data state resumes under any number of processes. The price is that each
  process tokenizes and packs n times its share.
  """

  replicated = True

  def __init__(self, it: pipeline.PackedIterator, lo: int, hi: int):
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
  """A PackedIterator for this process: file-sharded, or the full stream sliced by rows."""
  import jax

  shard = pipeline.shard_info()
  local = local_batch_size(global_batch)
  provider = seqio.get_mixture_or_task(name)

  def packed(shard, batch):
    ds = pipeline.mixture_dataset(name, split=split, shard=shard, seed=seed, repeat=repeat,
                                  grouped=grouped, **kw)
    if grouped:
      reader = pipeline.TextGroupReader(ds, plan.table, plan.vocab, plan.group_size, seed,
                                        plan.examples_per_read)
    else:
      reader = pipeline.ExampleReader(ds, plan.table)
    # Training streams read ahead in a thread; evaluation reads a few batches and stops.
    return pipeline.PackedIterator(reader, batch, plan.seq_len, packing, background=repeat)

  if shard is None or pipeline._files_per_task_at_least(provider, split, shard.num_shards):
    return packed(shard, local)
  logging.info("%s: fewer %s files than the %d processes; every process packs the global "
               "batch from the full stream and keeps its rows", name, split, shard.num_shards)
  lo = jax.process_index() * local
  return RowSlice(packed(None, global_batch), lo, lo + local)


def train_iterator(plan: InputPlan, config):
  """This process's training batches (a PackedIterator or a RowSlice over one)."""
  return _packed(plan, plan.train_mixture or plan.mixture, "train", config.train.batch_size,
                 config.data.packing, seed=config.data.seed, grouped=plan.group_size > 0,
                 shuffle=True, repeat=True)


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


__all__ = ["InputPlan", "plan_inputs", "train_iterator", "eval_batches", "load_vocab_for",
           "DataError", "tasks"]
