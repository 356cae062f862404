"""The embedded chapter task and the test splits: the task loads in 8 languages and 3 splits,
translations share label and split, and nothing held out by the task or the LM test split is
in a train file."""

import os

import pytest

from xlingo.data import labelled
from xlingo.data.corpus import build_corpus
from xlingo.errors import DataError

CORPUS = os.path.join(os.path.dirname(__file__), "..", "xlingo", "data", "corpus")
LANGS = ("en", "de", "fr", "es", "it", "pt", "ja", "zh")


def _lines(rel):
  with open(os.path.join(CORPUS, rel), encoding="utf-8") as f:
    return f.read().splitlines()


@pytest.fixture(scope="module")
def task():
  labels = labelled.load_labels("chapter")
  return labels, {(lang, split): labelled.load_examples("chapter", lang, split, labels)
                  for lang in LANGS for split in labelled.SPLITS}


def test_chapter_task_loads_in_every_language_and_split(task):
  labels, ex = task
  assert "chapter" in labelled.embedded_task_names()
  assert labels.labels == tuple(f"ch{i:02d}" for i in range(1, 13))
  assert set(labels.names) == set(LANGS)
  assert labels.names_for("de")[4] == "Netzwerkkonfiguration"
  for lang in LANGS:
    assert len(ex[lang, "test"]) >= 100 and len(ex[lang, "validation"]) >= 100
    for split in ("validation", "test"):  # every class held out in every language
      assert {e.label for e in ex[lang, split]} == set(range(len(labels.labels)))


def test_translations_share_label_and_split(task):
  labels, ex = task
  where = {}
  for (lang, split), examples in ex.items():
    for e in examples:
      assert e.uid.startswith(labels.labels[e.label] + "-")  # uid: <chapter>-<k>
      label, first = where.setdefault(e.uid, (e.label, split))
      assert (label, first) == (e.label, split), (lang, e.uid)
  en = {e.uid for s in labelled.SPLITS for e in ex["en", s]}
  assert set(where) == en  # every translation has its English paragraph


def test_held_out_text_is_in_no_train_file(task):
  _, ex = task
  for lang in LANGS:
    held = {build_corpus.match_key(e.text) for s in ("validation", "test") for e in ex[lang, s]}
    tested = {build_corpus.match_key(e.text) for e in ex[lang, "test"]}
    train = {build_corpus.match_key(x) for x in _lines(f"mono/{lang}.train.txt")}
    val = {build_corpus.match_key(x) for x in _lines(f"mono/{lang}.validation.txt")}
    assert not held & train, lang
    assert not tested & val, lang
    test = set(_lines(f"mono/{lang}.test.txt"))
    assert test and not test & set(_lines(f"mono/{lang}.train.txt"))
  en_held = {e.text for s in ("validation", "test") for e in ex["en", s]}
  for lang in LANGS[1:]:
    x_held = {e.text for s in ("validation", "test") for e in ex[lang, s]}
    for row in _lines(f"parallel/en-{lang}.train.tsv"):
      e, x = row.split("\t")
      assert e not in en_held and x not in x_held, (lang, e)


def test_unknown_task_and_language_without_data_are_one_line_errors():
  with pytest.raises(DataError, match="unknown task 'chapters'") as e:
    labelled.load_labels("chapters")
  assert "\n" not in str(e.value) and "chapter" in str(e.value)
  with pytest.raises(DataError, match="no train data for language 'ru'") as e:
    labelled.load_examples("chapter", "ru", "train")
  assert "\n" not in str(e.value) and "en" in str(e.value)
  with pytest.raises(DataError, match="unknown split"):
    labelled.load_examples("chapter", "en", "dev")


def test_embedded_tasks_register_the_test_split():
  from data_tasks import embedded
  from xlingo.data import tasks

  for lang in LANGS + ("ru",):
    files = tasks.task_spec(embedded.DEFAULT.lm[lang]).files
    assert [os.path.basename(p) for p in files["test"]] == [f"{lang}.test.txt"]
  files = tasks.task_spec(embedded.DEFAULT.mt["en-ja"]).files
  assert [os.path.basename(p) for p in files["test"]] == ["en-ja.test.tsv"]
