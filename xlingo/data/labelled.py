"""Labelled text-classification tasks: the data of ``python -m xlingo.finetune`` and of the
lm-evaluation-harness tasks.

A task is a directory (the embedded ones live in ``xlingo/data/corpus/tasks/<name>/``; a user's
own is any local or gs:// directory of the same layout)::

  labels.json                 {"labels": ["ch01", ...],            the class ids, in order
                               "names": {"en": ["GNU/Linux tutorials", ...], "de": [...], ...},
                               "source": "...", "licence": "..."}
  <lang>.<split>.tsv          one example a line: ``<label id>\\t<text>``; split in
                              train | validation | test

``names[lang][i]`` is the human name of ``labels[i]`` in ``lang`` (what a verbalizer head
scores); a language without its own names falls back to ``names["en"]``. Examples of different
languages that share an ``uid`` are translations of each other (the embedded task keeps aligned
translations in the same split, so no paragraph or its translation is in two splits); the uid (in
the embedded task ``<chapter>-<k>``, the chapter's k-th paragraph) is an optional third column
``<label>\\t<text>\\t<uid>``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from xlingo import paths
from xlingo.errors import DataError

SPLITS = ("train", "validation", "test")


def embedded_tasks_dir() -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "tasks")


def embedded_task_names() -> tuple[str, ...]:
  root = embedded_tasks_dir()
  if not os.path.isdir(root):
    return ()
  return tuple(sorted(d for d in os.listdir(root)
                      if os.path.isfile(os.path.join(root, d, "labels.json"))))


def task_dir(task: str) -> str:
  """The directory of ``task``: an embedded task's name, or a directory of the layout above."""
  if task in embedded_task_names():
    return os.path.join(embedded_tasks_dir(), task)
  if ("/" in task or task.startswith(".")) and paths.isfile(paths.join(task, "labels.json")):
    return task
  names = ", ".join(embedded_task_names()) or "none"
  raise DataError(f"unknown task {task!r}: finetune.task is an embedded task ({names}) or a "
                  "directory holding labels.json and <lang>.<split>.tsv files "
                  "(see xlingo/data/labelled.py)")


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  label: int          # index into LabelSet.labels
  uid: str            # equal across the translations of one example ("" when unknown)


@dataclasses.dataclass(frozen=True)
class LabelSet:
  labels: tuple[str, ...]
  names: dict  # lang -> tuple[str, ...], parallel to labels

  def names_for(self, lang: str) -> tuple[str, ...]:
    return tuple(self.names.get(lang) or self.names.get("en") or self.labels)

  def index(self, label: str, where: str) -> int:
    try:
      return self.labels.index(label)
    except ValueError:
      raise DataError(f"{where}: label {label!r} is not in labels.json ({', '.join(self.labels)})"
                      "; add it there or fix the line") from None


def load_labels(task: str) -> LabelSet:
  path = paths.join(task_dir(task), "labels.json")
  try:
    raw = json.loads(paths.read_text(path))
    labels = tuple(str(x) for x in raw["labels"])
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a labels file ({e}); it needs {{\"labels\": [...], "
                    "\"names\": {lang: [...]}}") from None
  names = {}
  for lang, ns in (raw.get("names") or {}).items():
    if len(ns) != len(labels):
      raise DataError(f"{path}: names.{lang} has {len(ns)} entries for {len(labels)} labels; "
                      "give one name per label")
    names[lang] = tuple(str(n) for n in ns)
  if len(set(labels)) != len(labels) or not labels:
    raise DataError(f"{path}: labels must be a non-empty list without repeats")
  return LabelSet(labels=labels, names=names)


def split_path(task: str, lang: str, split: str) -> str:
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
  return paths.join(task_dir(task), f"{lang}.{split}.tsv")


def task_languages(task: str, split: str = "train") -> tuple[str, ...]:
  """The languages with a ``<lang>.<split>.tsv`` file, sorted."""
  suffix = f".{split}.tsv"
  return tuple(sorted(n[: -len(suffix)] for n in paths.listdir(task_dir(task))
                      if n.endswith(suffix)))


def load_examples(task: str, lang: str, split: str,
                  label_set: LabelSet | None = None) -> list[Example]:
  """The examples of one language and split; a missing file is a one-line DataError."""
  path = split_path(task, lang, split)
  if not paths.exists(path):
    have = ", ".join(task_languages(task, split)) or "none"
    raise DataError(f"task {task!r} has no {split} data for language {lang!r} (no {path}); "
                    f"languages with {split} data: {have}")
  label_set = label_set or load_labels(task)
  out = []
  for i, line in enumerate(paths.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    cols = line.split("\t")
    if len(cols) not in (2, 3) or not cols[1].strip():
      raise DataError(f"{path}:{i}: expected '<label>\\t<text>[\\t<uid>]', got {len(cols)} "
                      "column(s); fix the line")
    out.append(Example(text=cols[1], label=label_set.index(cols[0], f"{path}:{i}"),
                       uid=cols[2] if len(cols) == 3 else ""))
  if not out:
    raise DataError(f"{path}: no examples; the file is empty")
  return out
