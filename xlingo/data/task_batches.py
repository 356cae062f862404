"""Labelled examples (``xlingo.data.labelled``) as the fixed-shape batches of a task head.

A batch holds the LM batch's features (``inputs``, ``targets``, ``segment_ids``, ``positions``,
``lang_ids``, ``loss_weights``, ``raw_bytes``; [B, L] each) and the task's:

  task_labels        [B]        the class index of each row's example
  choice_inputs      [B, C, L]  verbalizer: the row's text + prompt + the name of class c
  choice_segment_ids [B, C, L]  verbalizer: 1 on those tokens, 0 on padding
  name_pos           [B, C, N]  verbalizer: the positions whose next-token prediction is the
                                j-th token of class c's name
  name_ids           [B, C, N]  verbalizer: that token
  name_mask          [B, C, N]  verbalizer: 1 where the name has a j-th token

A row is one example: ``[0 (BOS), t_1, ..., t_n]`` (classifier) or ``[0, t_1, ..., t_k,
prompt]`` (verbalizer), every token carrying the example's language id, so zero-shot in
language X runs with X's id. The text is cut from the end to fit ``finetune.max_len`` (with
the prompt and the longest label name, for the verbalizer). ``loss_weights`` is 1 at the last
token of the row and 0 elsewhere: the step's total weight is the number of examples, and the
per-language metrics (``loss/<lang>``, ``acc/<lang>``) are per example. Rows past the last
example of an evaluation set are padding (all weights 0).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from xlingo import paths
from xlingo.data import labelled
from xlingo.errors import ConfigError, DataError

HEADS = ("classifier", "verbalizer")
CHOICE_FEATURES = ("choice_inputs", "choice_segment_ids", "name_pos", "name_ids", "name_mask")
LM_FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights",
               "raw_bytes")
MIN_TEXT_TOKENS = 4


def _ids(vocab, texts: list[str]) -> list[np.ndarray]:
  flat, lens = vocab.encode_flat(list(texts))
  return np.split(np.asarray(flat, np.int32), np.cumsum(lens)[:-1]) if len(texts) else []


@dataclasses.dataclass(frozen=True)
class Encoder:
  """How a task's examples become rows (see the module docstring), for one vocabulary and
  language table (``codes``: the model's languages, in id order)."""

  head: str
  max_len: int
  codes: tuple
  num_classes: int
  prompt: tuple = ()  # verbalizer: the prompt's ids
  names: dict = dataclasses.field(default_factory=dict)  # verbalizer: lang -> C id arrays
  name_len: int = 0  # verbalizer: N, the longest name in tokens

  @classmethod
  def build(cls, vocab, codes, label_set: labelled.LabelSet, settings: dict, languages):
    """``settings``: the ``finetune`` section (as a dict); ``languages``: those it will encode.
    A verbalizer label name that encodes to no token, or a max_len that leaves the text no
    room, is a one-line error here."""
    head = settings["head"]
    names, prompt, n = {}, (), 0
    if head == "verbalizer":
      prompt = tuple(int(i) for i in _ids(vocab, [settings["prompt"]])[0]) \
          if settings["prompt"] else ()
      for lang in languages:
        src = lang if settings["verbalizer_names"] == "same" else "en"
        ns = label_set.names_for(src)
        ids = _ids(vocab, [" " + x for x in ns])
        for name, i in zip(ns, ids, strict=True):
          if not len(i):
            raise DataError(f"verbalizer label name {name!r} ({src}) encodes to no token in "
                            "this vocabulary; give it a name made of text in labels.json, or "
                            "use finetune.head='classifier'")
        names[lang] = tuple(ids)
        n = max(n, max(len(i) for i in ids))
    room = int(settings["max_len"]) - 1 - len(prompt) - n
    if room < MIN_TEXT_TOKENS:
      raise ConfigError(f"finetune.max_len={settings['max_len']} leaves {room} token(s) for the "
                        f"text after BOS, the prompt ({len(prompt)}) and the longest label name "
                        f"({n}); raise finetune.max_len")
    return cls(head, int(settings["max_len"]), tuple(codes), len(label_set.labels), prompt,
               names, n)

  def encode(self, vocab, examples: list, lang: str) -> dict:
    """The rows of ``examples`` (of one language) as arrays with a leading example axis."""
    if lang not in self.codes:
      raise ConfigError(f"task language {lang!r} is not in the model's languages "
                        f"{self.codes}; finetune only languages the model has an id for")
    n, length, c, k = len(examples), self.max_len, self.num_classes, self.name_len
    lang_id = self.codes.index(lang)
    vb = self.head == "verbalizer"
    room = length - 1 - len(self.prompt) - k
    out = {f: np.zeros((n, length), np.float32 if f == "loss_weights" else np.int32)
           for f in LM_FEATURES}
    out["task_labels"] = np.asarray([e.label for e in examples], np.int32)
    if vb:
      out["choice_inputs"] = np.zeros((n, c, length), np.int32)
      out["choice_segment_ids"] = np.zeros((n, c, length), np.int32)
      for f in ("name_pos", "name_ids"):
        out[f] = np.zeros((n, c, k), np.int32)
      out["name_mask"] = np.zeros((n, c, k), np.float32)
    for r, ids in enumerate(_ids(vocab, [e.text for e in examples])):
      row = np.concatenate([[0], ids[:room], self.prompt]).astype(np.int32)
      m = len(row)
      out["inputs"][r, :m] = row
      out["targets"][r, : m - 1] = row[1:]
      out["segment_ids"][r, :m] = 1
      out["positions"][r, :m] = np.arange(m)
      out["lang_ids"][r, :m] = lang_id
      out["loss_weights"][r, m - 1] = 1.0
      if vb:
        for j, name in enumerate(self.names[lang]):
          full = np.concatenate([row, name[:-1]])
          out["choice_inputs"][r, j, : len(full)] = full
          out["choice_segment_ids"][r, j, : len(full)] = 1
          out["name_pos"][r, j, : len(name)] = m - 1 + np.arange(len(name))
          out["name_ids"][r, j, : len(name)] = name
          out["name_mask"][r, j, : len(name)] = 1.0
    return out


def concat(encoded: list[dict]) -> dict:
  return {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}


def rows(encoded: dict, index: np.ndarray, batch_size: int) -> dict:
  """A batch of ``batch_size`` rows: the examples at ``index``, then padding (weight 0)."""
  out = {}
  for k, v in encoded.items():
    b = np.zeros((batch_size,) + v.shape[1:], v.dtype)
    b[: len(index)] = v[index]
    out[k] = b
  return out


def local_rows(batch: dict) -> dict:
  """This process's rows of a global batch (every process builds the same global batches)."""
  import jax

  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  per = len(batch["inputs"]) // n
  return {k: v[i * per:(i + 1) * per] for k, v in batch.items()}


def eval_batches(encoded: dict, batch_size: int) -> list[dict]:
  """Every example of a set once, in order, in global batches of ``batch_size`` rows."""
  n = len(encoded["task_labels"])
  return [rows(encoded, np.arange(s, min(s + batch_size, n)), batch_size)
          for s in range(0, n, batch_size)]


class TaskIterator:
  """Training batches of a labelled task: the training languages' examples pooled and shuffled
  once per epoch (``seed``, epoch), ``batch_size`` (global) rows a batch, this process's rows
  of it. Its state (epoch, position, batches, the loop's counters) is saved with every
  checkpoint, so a resumed run sees the batches an uninterrupted one would."""

  replicated = True  # every process builds the same global batches (checkpoints.py)

  def __init__(self, encoded: dict, batch_size: int, seed: int, summary: str = ""):
    self.encoded, self.batch_size, self.seed = encoded, int(batch_size), int(seed)
    self.n = len(encoded["task_labels"])
    if self.n < self.batch_size:
      raise DataError(f"the training languages have {self.n} labelled examples, fewer than "
                      f"train.batch_size={self.batch_size}; lower train.batch_size")
    self.epoch, self.pos, self.batches = 0, 0, 0
    self.counters: dict = {}
    self.summary = summary

  def __iter__(self):
    return self

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

  def __next__(self) -> dict:
    if self.pos + self.batch_size > self.n:  # the epoch's rest is dropped: full batches only
      self.epoch, self.pos = self.epoch + 1, 0
    index = self._order()[self.pos:self.pos + self.batch_size]
    self.pos += self.batch_size
    self.batches += 1
    return local_rows(rows(self.encoded, index, self.batch_size))

  def save(self, directory: str) -> None:
    paths.makedirs(directory)
    paths.write_text(paths.join(directory, "state.json"), json.dumps(
        {"reader": "labelled_task", "epoch": self.epoch, "pos": self.pos,
         "batches": self.batches, "counters": self.counters}))

  def restore(self, directory: str) -> None:
    state = json.loads(paths.read_text(paths.join(directory, "state.json")))
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
    self.batches = int(state["batches"])
    self.counters = dict(state.get("counters", {}))


# --- a task's data for a run, checked ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The examples a fine-tuning run (or ``evaluate --task``) reads: lang -> examples."""

  task: str
  labels: labelled.LabelSet
  train_languages: tuple
  eval_languages: tuple
  train: dict
  validation: dict
  test: dict
  notes: tuple = ()  # one-line warnings (labels unseen in training, in zero-shot sets)


def task_eval_languages(task: str, order=()) -> tuple:
  """The languages with validation or test data, in ``order`` first (the model's), then the
  rest sorted."""
  have = set(labelled.task_languages(task, "validation")) | set(
      labelled.task_languages(task, "test"))
  return tuple([c for c in order if c in have] + sorted(have - set(order)))


def load_task(task: str, train_languages, eval_languages=(), *, order=(),
              splits=("train", "validation", "test")) -> TaskData:
  """The examples of ``task`` for training on ``train_languages`` and evaluating on
  ``eval_languages`` (empty: every language with validation or test data); each problem is a
  one-line DataError, before any training:

  - a training language without train or validation data (validation chooses the model);
  - a label in a training language's validation split that no training language's train split
    has: an error, since the training language's own accuracy would be capped by a class the
    head never saw, which means the splits are broken, and model selection would be skewed;
  - such a label in another language's sets, or in a test split: a warning with the count
    (``notes``), since those are measured, not chosen on; their examples count as wrong unless
    the head predicts the unseen class.
  """
  label_set = labelled.load_labels(task)
  if isinstance(train_languages, str) or not tuple(train_languages):
    raise ConfigError(f"finetune.train_languages={train_languages!r} must be a non-empty tuple "
                      "of language codes, e.g. ('en',)")
  train_languages = tuple(train_languages)
  eval_languages = tuple(eval_languages) or task_eval_languages(task, order)
  for lang in train_languages:
    for split in ("train", "validation"):
      if split in splits and lang not in labelled.task_languages(task, split):
        have = ", ".join(labelled.task_languages(task, split)) or "none"
        raise DataError(f"task {task!r} has no {split} data for training language {lang!r}; "
                        f"languages with {split} data: {have} (finetune.train_languages)")
  load = lambda lang, split: labelled.load_examples(task, lang, split, label_set)
  train = {lang: load(lang, "train") for lang in train_languages} if "train" in splits else {}
  val_langs = tuple(dict.fromkeys(train_languages + eval_languages))
  validation = {lang: load(lang, "validation") for lang in val_langs
                if "validation" in splits
                and lang in labelled.task_languages(task, "validation")}
  test = {lang: load(lang, "test") for lang in eval_languages
          if "test" in splits and lang in labelled.task_languages(task, "test")}
  notes = []
  if train:
    seen = {e.label for exs in train.values() for e in exs}
    for split, sets in (("validation", validation), ("test", test)):
      for lang, exs in sets.items():
        unseen = sorted({e.label for e in exs} - seen)
        if not unseen:
          continue
        names = ", ".join(label_set.labels[i] for i in unseen)
        count = sum(e.label in unseen for e in exs)
        if split == "validation" and lang in train_languages:
          raise DataError(f"task {task!r}: label(s) {names} of {lang}.validation.tsv never "
                          f"occur in the training split(s) of {', '.join(train_languages)}; "
                          "fix the splits (model selection must be on classes it trains on)")
        notes.append(f"task {task!r}: {count} {lang} {split} example(s) have label(s) {names} "
                     "unseen in training; they count as wrong unless predicted")
  return TaskData(task, label_set, train_languages, eval_languages, train, validation, test,
                  tuple(notes))
