"""Multiple-choice items of the embedded data, scored by continuation log-likelihood: what
``python -m xlingo.evaluate --multiple_choice chapter|translation`` prints, and exactly the
items and prompts of the lm-evaluation-harness tasks in ``xlingo/lm_eval_tasks/`` (their docs
come from :func:`docs`), so lm-eval's numbers and ``evaluate``'s are the same.

**The prompt format** (shared with the YAMLs, which read the ``query`` and ``choices`` fields
this module writes, with ``target_delimiter: " "``)::

  context       "<text> =>"            (:func:`context`)
  continuation  " <choice>"            (lm-eval's target_delimiter " ", then the choice)

- ``chapter`` (one task per language, ``xlingo_chapter_<lang>``): the text is a paragraph of
  the labelled task ``chapter`` (``xlingo/data/labelled.py``) in ``lang``; the choices are the
  chapter names ``names[lang]`` of its labels.json, in label order; the gold is its label.
  Context and choices carry the language id of ``lang``. The items are ordered by
  ``sha1(uid)`` (the text's where there is no uid), not in the file's chapter order, so that
  the first N (``--limit N``) hold every chapter in proportion, and the same paragraphs in
  every language.
- ``translation`` (``xlingo_translation_en-<x>``): the text is the English side of a pair of
  the embedded parallel corpus (``parallel/en-<x>.<split>.tsv``); the four choices are its
  translation and three translations of other pairs of the same file. Which three, and the
  order of the four, are fixed by hashes: each candidate translation ``t`` of the file gets the
  key ``sha1(english + "\\0" + t)``; the three other distinct translations with the smallest
  keys are the distractors, and the four are listed by increasing ``sha1(t + "\\0" + english)``
  (a second hash, so that the gold's position varies). The context carries the language id of
  ``en``, the choices that of ``x``.

**Scoring** (lm-eval's ``multiple_choice``): each choice's continuation log-likelihood
(``xlingo.likelihood``); ``acc``: the argmax (the first on ties) is the gold; ``acc_norm``: the
argmax of the log-likelihood divided by the choice's length in characters.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from xlingo import likelihood
from xlingo.errors import ConfigError, DataError

NAMES = ("chapter", "translation")
SEPARATOR = " =>"
TARGET_DELIMITER = " "
CHAPTER_TASK = "chapter"  # the embedded labelled task (xlingo/data/corpus/tasks/chapter)
NUM_CHOICES = 4  # translation choice: the right translation and three others


def context(text: str) -> str:
  """The context of an item's text (module docstring)."""
  return f"{text}{SEPARATOR}"


@dataclasses.dataclass(frozen=True)
class Item:
  text: str
  choices: tuple[str, ...]
  gold: int
  context_lang: str
  choice_lang: str
  uid: str = ""


def check_name(name: str) -> str:
  if name not in NAMES:
    raise ConfigError(f"--multiple_choice={name!r} is not a multiple-choice task; use one of "
                      f"{', '.join(NAMES)}")
  return name


def languages(name: str, split: str = "test", task: str = CHAPTER_TASK) -> tuple[str, ...]:
  """The languages with ``split`` items for ``name``."""
  check_name(name)
  if name == "chapter":
    from xlingo.data import labelled

    return labelled.task_languages(task, split)
  from xlingo.data import vocab as xvocab

  return tuple(sorted(xvocab.embedded_parallel(split)))


def items(name: str, lang: str, split: str = "test", *, task: str = CHAPTER_TASK) -> list[Item]:
  """The items of ``name`` in ``lang`` (for translation: the pair en-``lang``); ``task`` is
  the labelled task of ``chapter`` (a directory of the labelled.py layout works too)."""
  check_name(name)
  if name == "chapter":
    return _chapter_items(task, lang, split)
  return _translation_items(lang, split)


def _chapter_items(task: str, lang: str, split: str) -> list[Item]:
  from xlingo.data import labelled

  label_set = labelled.load_labels(task)
  names = label_set.names_for(lang)
  examples = sorted(labelled.load_examples(task, lang, split, label_set),
                    key=lambda ex: hashlib.sha1((ex.uid or ex.text).encode()).hexdigest())
  return [Item(ex.text, names, ex.label, lang, lang, ex.uid) for ex in examples]


def _key(english: str, translation: str) -> str:
  return hashlib.sha1(f"{english}\0{translation}".encode()).hexdigest()


def _translation_items(lang: str, split: str) -> list[Item]:
  from xlingo.data import vocab as xvocab

  pairs = xvocab.embedded_parallel(split)
  if lang not in pairs:
    have = ", ".join(f"en-{x}" for x in sorted(pairs)) or "none"
    raise DataError(f"no {split} pairs en-{lang} in the embedded parallel corpus; pairs with "
                    f"{split} data: {have}")
  translations = sorted({t for _, t in pairs[lang]})
  if len(translations) < NUM_CHOICES:
    raise DataError(f"en-{lang} {split}: {len(translations)} distinct translations, fewer "
                    f"than the {NUM_CHOICES} choices an item needs")
  out = []
  for i, (english, right) in enumerate(pairs[lang]):
    others = sorted((t for t in translations if t != right), key=lambda t: _key(english, t))
    choices = sorted([right, *others[:NUM_CHOICES - 1]], key=lambda t: _key(t, english))
    out.append(Item(english, tuple(choices), choices.index(right), "en", lang, str(i)))
  return out


def docs(name: str, lang: str, split: str = "test", *, task: str = CHAPTER_TASK) -> list[dict]:
  """The items as lm-eval docs: ``query`` (the context), ``choices``, ``gold`` and the
  languages (``context_lang``, ``choice_lang``, read by the adaptor's ``lang=auto``)."""
  return [{"query": context(it.text), "choices": list(it.choices), "gold": it.gold,
           "context_lang": it.context_lang, "choice_lang": it.choice_lang, "uid": it.uid}
          for it in items(name, lang, split, task=task)]


def requests(vocab, table, item: Item) -> list[likelihood.Request]:
  """One request per choice of ``item``."""
  ctx_lang, choice_lang = table.id(item.context_lang), table.id(item.choice_lang)
  return [likelihood.encode_pair(vocab, context(item.text), TARGET_DELIMITER + c, ctx_lang,
                                 choice_lang) for c in item.choices]


def predictions(logprobs, choices) -> tuple[int, int]:
  """(argmax, length-normalised argmax) as lm-eval's multiple_choice takes them."""
  lls = np.asarray(logprobs, np.float64)
  return int(np.argmax(lls)), int(np.argmax(lls / np.asarray([float(len(c)) for c in choices])))


def evaluate(lm, name: str, langs=None, split: str = "test", *, limit: int = 0,
             indices: dict | None = None, batch_size: int = 16,
             task: str = CHAPTER_TASK) -> dict:
  """Per language: ``acc``, ``acc_norm``, ``n`` and each item's log-likelihoods
  (``items``: [{"doc_id", "logprobs", "gold", "pred", "pred_norm"}]), for a
  ``load.LoadedModel``. ``limit``: the first items of each language (lm-eval's ``--limit``);
  ``indices``: ``{lang: [item index, ...]}``, those items (lm-eval's ``samples``)."""
  langs = list(langs or languages(name, split, task))
  for lang in langs:
    if lang not in lm.table.codes:
      raise ConfigError(f"--lang {lang} is not a language of {lm.step_dir} (it has "
                        f"{', '.join(lm.table.codes)})")
    if name == "translation" and "en" not in lm.table.codes:
      raise ConfigError(f"translation choice needs the language en; {lm.step_dir} has "
                        f"{', '.join(lm.table.codes)}")
  out = {}
  for lang in langs:
    its = list(enumerate(items(name, lang, split, task=task)))
    if indices and lang in indices:
      its = [its[i] for i in indices[lang]]
    elif limit:
      its = its[:limit]
    reqs = [r for _, it in its for r in requests(lm.vocab, lm.table, it)]
    scored = likelihood.score(lm, reqs, batch_size=batch_size)
    rows, k = [], 0
    for doc_id, it in its:
      lls = scored.logprobs[k:k + len(it.choices)]
      k += len(it.choices)
      pred, pred_norm = predictions(lls, it.choices)
      rows.append({"doc_id": doc_id, "logprobs": lls, "gold": it.gold, "pred": pred,
                   "pred_norm": pred_norm})
    n = len(rows)
    out[lang] = {"acc": sum(r["pred"] == r["gold"] for r in rows) / n,
                 "acc_norm": sum(r["pred_norm"] == r["gold"] for r in rows) / n,
                 "n": n, "truncated": scored.truncated, "items": rows}
  return out


def format_table(name: str, results: dict, split: str) -> str:
  langs = list(results)
  col = "pair" if name == "translation" else "lang"
  label = (lambda x: f"en-{x}") if name == "translation" else (lambda x: x)
  lines = [f"multiple choice {name} ({split} split): accuracy per language",
           f"{col:<8} {'n':>5} {'acc':>7} {'acc_norm':>9}"]
  for lang in langs:
    r = results[lang]
    lines.append(f"{label(lang):<8} {r['n']:>5} {r['acc']:>7.3f} {r['acc_norm']:>9.3f}")
  cut = sum(r["truncated"] for r in results.values())
  if cut:
    lines.append(f"({cut} request(s) longer than the model's context: their contexts were "
                 "left-truncated)")
  return "\n".join(lines)
