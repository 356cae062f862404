"""Parallel sentence pairs for contrastive alignment (``train.contrastive``), beside the LM batches.

The pairs of the tasks named in ``train.contrastive.pairs`` (registered parallel tasks, e.g.
the embedded corpus's ``en-de``; ``data.file_pair_patterns`` for your own) are read once into
host memory as text (a few MB for the embedded corpus; about the size of the files in general)
and drawn as one pool: each epoch is a permutation of all pairs seeded by (``data.seed``,
epoch), and a global batch is the next P pairs of it (an epoch's tail continues into the next
epoch). Every process draws the same global batches and tokenizes only its own rows, so the
stream is replicated (its state resumes under any process count, like ``inputs.RowSlice``) and
the state is three numbers. Sentences are cut to ``train.contrastive.max_len - 1`` tokens.

:class:`WithPairs` joins this stream to the LM iterator: ``next`` gives one dict with both
batches' features, and ``save``/``restore`` (which the checkpoint calls) keep the LM state as it
was and the pair state beside it in ``pairs.json``.
"""

from __future__ import annotations

import json
import logging
import zlib

import numpy as np

from xlingo import paths
from xlingo.data import iterator, readers, tasks
from xlingo.data.languages import LanguageTable
from xlingo.errors import DataError

STATE_FILE = "pairs.json"


def text_key(text: str) -> int:
  """A 31-bit hash of a sentence: equal texts are never each other's negatives."""
  return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


# A user's parallel files (data.source="files"), by split: the config key of each split's globs.
FILE_PAIR_KEYS = {"train": "file_pair_patterns", "validation": "file_pair_val_patterns",
                  "test": "file_pair_test_patterns"}


def _read_files(files, fmt: str, limit: int | None) -> list[tuple[str, str]]:
  out: list[tuple[str, str]] = []
  for path in files:
    for text, source in readers.file_examples(path, fmt):
      if source and not readers.is_blank(source) and not readers.is_blank(text):
        out.append((source, text))
        if limit and len(out) >= limit:
          return out
  return out


def read_pairs(task_name: str, split: str, limit: int | None = None) -> list[tuple[str, str]]:
  """(source, target) texts of a parallel task's split, in file order; pairs with an empty
  side are skipped."""
  spec = tasks.task_spec(task_name)
  return _read_files(spec.files.get(split, ()), spec.fmt, limit)


def split_files(data_cfg, pair: str, split: str) -> list[str] | None:
  """The checked files (globbed, non-empty, UTF-8, source<TAB>target lines) of ``pair``'s
  ``split`` in ``data.file_pair_*patterns``; None when that split has no pattern."""
  key = FILE_PAIR_KEYS[split]
  pattern = dict(data_cfg.get(key, {}) or {}).get(pair)
  if pattern is None:
    return None
  what = f"data.{key}.{pair}"
  files = tasks.expand_pattern(pattern, what)
  tasks.check_utf8(files, what)
  tasks.check_pair_lines(files, what)
  return files


def configured_files(data_cfg) -> dict[str, dict[str, list[str]]]:
  """pair -> split -> checked files of the ``data.file_pair_*patterns``. A pair is SRC-TGT
  and has train files; its validation and test files are optional."""
  pats = {split: dict(data_cfg.get(key, {}) or {}) for split, key in FILE_PAIR_KEYS.items()}
  for split, key in FILE_PAIR_KEYS.items():
    for pair in pats[split]:
      if pair.count("-") != 1 or not all(pair.split("-")):
        raise DataError(f"data.{key}: {pair!r} is not a pair of language codes; name it "
                        "SRC-TGT, e.g. en-pl")
      if split != "train" and pair not in pats["train"]:
        raise DataError(f"data.{key}.{pair}: no data.file_pair_patterns.{pair} (its train "
                        f"pairs; given: {sorted(pats['train'])}); add it or fix the pair's name")
  return {pair: {split: split_files(data_cfg, pair, split) for split in FILE_PAIR_KEYS
                 if pair in pats[split]} for pair in sorted(pats["train"])}


def no_pairs_hint(source: str, pair: str, split: str = "validation") -> str:
  """Why ``pair`` has no ``split`` pairs, and what gives it some, for messages."""
  if source == "files":
    return f"set data.{FILE_PAIR_KEYS[split]}.{pair} (a glob of source<TAB>target files)"
  if source == "embedded":
    return (f"the embedded corpus has en-X and X-en {split} pairs only; use data.source="
            f"'files' with data.{FILE_PAIR_KEYS[split]}")
  return f"data.source={source!r} has no parallel data; use data.source='files'"


def file_split_pairs(data_cfg, pair: str, split: str) -> list[tuple[str, str]] | None:
  """(source, target) texts of ``pair``'s ``split`` in the user's pair files, either way round
  (``pl-en`` from the ``en-pl`` files, sides swapped); None when neither has that split."""
  src, tgt = pair.split("-")
  files = split_files(data_cfg, pair, split)
  if files is not None:
    return _read_files(files, readers.FORMAT_TSV, None)
  files = split_files(data_cfg, f"{tgt}-{src}", split)
  if files is not None:
    return [(t, s) for s, t in _read_files(files, readers.FORMAT_TSV, None)]
  return None


def encode_pairs(pairs, vocab, max_len: int) -> dict[str, np.ndarray]:
  """(source, target, source id, target id) tuples -> the pair features of
  ``xlingo.training.contrastive.PAIR_FEATURES`` for these rows (each row the vocabulary's
  start id, then the sentence's tokens)."""
  p = len(pairs)
  texts = [s for s, _, _, _ in pairs] + [t for _, t, _, _ in pairs]
  tokens, lens = readers.encode_flat(vocab, texts)
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
  n = np.minimum(lens, max_len - 1)
  inputs = np.zeros((2 * p, max_len), np.int32)
  inputs[:, 0] = vocab.start_id
  for i in range(2 * p):
    inputs[i, 1:1 + n[i]] = tokens[starts[i]:starts[i] + n[i]]
  side = lambda a: np.stack([a[:p], a[p:]], axis=1)  # [2P] (sources, then targets) -> [P, 2]
  return {"pair_inputs": np.stack([inputs[:p], inputs[p:]], axis=1),
          "pair_lengths": side(n.astype(np.int32)),
          "pair_lang_ids": np.array([[a, b] for _, _, a, b in pairs], np.int32).reshape(p, 2),
          "pair_keys": side(np.array([text_key(t) for t in texts], np.int32))}


class PairStream:
  """Global batches of P pairs from one pool, this process keeping rows [lo, hi)."""

  replicated = True

  def __init__(self, pool: list[tuple[str, str, int, int]], vocab, global_batch: int,
               max_len: int, seed: int, lo: int, hi: int, fingerprint: dict):
    if len(pool) < 2:
      raise DataError(f"train.contrastive.pairs hold {len(pool)} usable pair(s); contrastive "
                      "alignment needs at least 2 (check the pairs' train files)")
    self.pool, self.vocab, self.global_batch, self.max_len = pool, vocab, global_batch, max_len
    self.seed, self.lo, self.hi = int(seed), lo, hi
    self.fingerprint = fingerprint
    self.epoch = self.pos = self.batches = 0
    self._order: tuple[int, np.ndarray] | None = None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      rng = np.random.default_rng([self.seed, 0x9A1E5, epoch])
      self._order = (epoch, rng.permutation(len(self.pool)))
    return self._order[1]

  def _global_indices(self) -> np.ndarray:
    out = []
    while len(out) < self.global_batch:
      perm = self._permutation(self.epoch)
      take = perm[self.pos:self.pos + self.global_batch - len(out)]
      out.extend(take.tolist())
      self.pos += len(take)
      if self.pos >= len(perm):
        self.epoch, self.pos = self.epoch + 1, 0
    return np.asarray(out)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self._global_indices()[self.lo:self.hi]
    self.batches += 1
    return encode_pairs([self.pool[i] for i in rows], self.vocab, self.max_len)

  def state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos, "batches": self.batches,
            "fingerprint": self.fingerprint}

  def load_state(self, state: dict) -> bool:
    """Continue from ``state``; False (and nothing changed) if another pair config wrote it."""
    if state.get("fingerprint") != self.fingerprint:
      return False
    self.epoch, self.pos, self.batches = (int(state[k]) for k in ("epoch", "pos", "batches"))
    return True


class WithPairs(iterator.Wrapped):
  """The LM iterator with the pair stream's features added to each of its batches."""

  def __init__(self, lm, pairs: PairStream, summary: str = ""):
    super().__init__(lm)
    self.pairs, self.summary = pairs, summary
    # The checkpoint restores a replicated state under another process count; both streams
    # must be replicated for that (the pair stream always is).
    self.replicated = bool(getattr(lm, "replicated", False))

  def __next__(self) -> dict:
    batch = dict(next(self.inner))
    batch.update(next(self.pairs))
    return batch

  def save(self, directory: str) -> None:
    super().save(directory)
    paths.write_text(paths.join(directory, STATE_FILE), json.dumps(self.pairs.state()))

  def restore(self, directory: str) -> None:
    super().restore(directory)
    path = paths.join(directory, STATE_FILE)
    state = json.loads(paths.read_text(path)) if paths.exists(path) else None
    if state is None or not self.pairs.load_state(state):
      # The LM stream resumes exactly; the pair stream was not part of the checkpoint (the
      # contrastive term was off) or had other settings: it starts at its beginning.
      print(f"xlingo: the data state in {directory} holds no pair stream for this "
            "train.contrastive setting; the pair stream starts from its beginning", flush=True)


def pair_tasks(config, registered_mt: dict, table: LanguageTable) -> dict:
  """``train.contrastive.pairs`` -> their registered parallel task names (checked)."""
  out = {}
  for pair in config.train.contrastive.pairs or ():
    if pair not in registered_mt:
      raise DataError(f"train.contrastive.pairs: {pair!r} has no parallel data in source "
                      f"{config.data.source!r} (available: {sorted(registered_mt)}); fix "
                      "train.contrastive.pairs (or data.file_pair_patterns)")
    for lang in pair.split("-"):
      table.id(lang)
    out[pair] = registered_mt[pair]
  return out


def _pool(plan, split: str, limit: int | None = None):
  table: LanguageTable = plan.table
  pool, counts = [], {}
  for pair, name in plan.pair_tasks.items():
    src, tgt = pair.split("-")
    got = read_pairs(name, split, limit)
    counts[pair] = len(got)
    pool += [(s, t, table.id(src), table.id(tgt)) for s, t in got]
  return pool, counts


def _rows(global_batch: int) -> tuple[int, int]:
  import jax

  n = jax.process_count()
  if global_batch % n:
    raise DataError(f"train.contrastive.batch_size={global_batch} does not divide by the {n} "
                    "processes; make it a multiple")
  local = global_batch // n
  return jax.process_index() * local, (jax.process_index() + 1) * local


def attach(lm_iterator, plan, config):
  """``lm_iterator`` with the pair stream joined when the loss has a contrastive term
  (``train.contrastive.weight`` > 0), else ``lm_iterator`` itself. The stream's own settings
  are read here, where the stream is made (the term reads its own when it is built)."""
  c = config.train.contrastive
  p = int(c.batch_size or config.train.batch_size)  # 0: train.batch_size
  if not (c.weight and plan.pair_tasks):
    return lm_iterator
  pool, counts = _pool(plan, "train")
  lo, hi = _rows(p)
  fingerprint = {"pairs": list(plan.pair_tasks), "pool": len(pool), "batch_size": p,
                 "max_len": int(c.max_len), "seed": int(config.data.seed)}
  stream = PairStream(pool, plan.vocab, p, int(c.max_len), config.data.seed, lo, hi,
                      fingerprint)
  epochs = config.train.steps * p / len(pool)
  summary = (f"contrastive pairs: {', '.join(f'{k} {v:,d}' for k, v in counts.items())}; "
             f"{p} pairs per step, {epochs:.2f} epochs over the run; weight "
             f"{c.weight:g}, temperature {c.temperature:g}, layer {c.layer}, {c.pooling} pooling")
  return WithPairs(lm_iterator, stream, summary)


def validation_sets(plan, settings, split: str = "validation") -> dict:
  """pair -> (this process's rows of each global validation batch, text hashes [N, 2]) for
  retrieval (``contrastive.retrieval_metrics``): the first ``settings.eval_pairs`` validation
  pairs of each task (0: all), padded to whole batches of ``settings.batch_size`` pairs
  (``split="test"``: its test pairs, for ``evaluate --split test``).
  ``settings``: the contrastive term's (``xlingo.training.contrastive.Settings``)."""
  c, p = settings, settings.batch_size
  lo, hi = _rows(p)
  table: LanguageTable = plan.table
  out = {}
  for pair, name in plan.pair_tasks.items():
    src, tgt = pair.split("-")
    if split not in tasks.task_spec(name).files:
      logging.warning("%s: no %s pairs, so no retrieval score (%s)", pair, split,
                      no_pairs_hint(plan.source, pair, split))
      continue
    got = read_pairs(name, split, int(c.eval_pairs) or None)
    if len(got) < 2:
      logging.warning("%s: %d usable %s pair(s), fewer than the 2 retrieval needs; no "
                      "retrieval score reported", pair, len(got), split)
      continue
    rows = [(s, t, table.id(src), table.id(tgt)) for s, t in got]
    rows += [rows[-1]] * (-len(rows) % p)  # padding rows, dropped after embedding
    batches = [encode_pairs(rows[i:i + p][lo:hi], plan.vocab, int(c.max_len))
               for i in range(0, len(rows), p)]
    keys = np.array([[text_key(s), text_key(t)] for s, t in got], np.int32)
    out[pair] = (batches, keys)
  return out
