"""The embedded corpus: manifest, languages, splits, scripts, skew and encodings."""

import json
import os

import pytest

from xlingo.config import EMBEDDED_LANGUAGES

CORPUS = os.path.join(os.path.dirname(__file__), "..", "xlingo", "data", "corpus")
SPLITS = ("train", "validation", "test")


def _manifest():
  with open(os.path.join(CORPUS, "manifest.json"), encoding="utf-8") as f:
    return json.load(f)


def _lines(rel):
  with open(os.path.join(CORPUS, rel), "rb") as f:
    return f.read().decode("utf-8").splitlines()  # strict: fails on invalid UTF-8


def _mono(lang, split):
  return f"mono/{lang}.{split}.txt"


def test_manifest_matches_files():
  files = _manifest()["files"]
  for rel, entry in files.items():
    path = os.path.join(CORPUS, rel)
    with open(path, "rb") as f:
      data = f.read()
    text = data.decode("utf-8")
    assert entry["bytes"] == len(data), rel
    assert entry["chars"] == len(text), rel
    assert entry["examples"] == len(text.splitlines()), rel
    assert entry["split"] in SPLITS
    assert entry["source_package"] and entry["source_version"] and entry["licence"]
  on_disk = {
      f"{d}/{name}"
      for d in ("mono", "parallel", "tasks/chapter")
      for name in os.listdir(os.path.join(CORPUS, d)) if name.endswith((".txt", ".tsv"))
  }
  assert on_disk == set(files)


def test_every_language_has_both_splits():
  files = _manifest()["files"]
  for lang in EMBEDDED_LANGUAGES:
    for split in SPLITS:
      entry = files[_mono(lang, split)]
      assert entry["language"] == lang
      assert entry["examples"] >= 50
  mono_langs = {e["language"] for e in files.values() if e["kind"] == "mono"}
  assert mono_langs == set(EMBEDDED_LANGUAGES)


def test_size_skew_at_least_10x():
  files = _manifest()["files"]
  for key in ("examples", "bytes"):
    sizes = [
        sum(files[_mono(lang, s)][key] for s in SPLITS) for lang in EMBEDDED_LANGUAGES
    ]
    assert max(sizes) >= 10 * min(sizes), (key, sizes)


def _script(ch):
  o = ord(ch)
  if 0x0400 <= o <= 0x04FF:
    return "cyrillic"
  if 0x3040 <= o <= 0x30FF or 0x4E00 <= o <= 0x9FFF:
    return "cjk"
  if ch.isalpha() and o < 0x0250:
    return "latin"
  return None


def test_at_least_three_scripts():
  dominant = {}
  for lang in EMBEDDED_LANGUAGES:
    counts = {}
    for line in _lines(_mono(lang, "validation")):
      for ch in line:
        s = _script(ch)
        if s:
          counts[s] = counts.get(s, 0) + 1
    dominant[lang] = max(counts, key=counts.get)
  assert dominant["en"] == "latin" and dominant["ru"] == "cyrillic"
  assert dominant["ja"] == "cjk" and dominant["zh"] == "cjk"
  assert {"latin", "cyrillic", "cjk"} <= set(dominant.values())


@pytest.mark.parametrize("lang", EMBEDDED_LANGUAGES)
def test_mono_lines_clean_and_splits_disjoint(lang):
  train = _lines(_mono(lang, "train"))
  val = _lines(_mono(lang, "validation"))
  test = _lines(_mono(lang, "test"))
  assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
  for line in train[:500] + val + test:
    assert line == line.strip() and "\t" not in line and len(line) >= 20


def test_parallel_files():
  files = _manifest()["files"]
  pairs = {e["pair"] for e in files.values() if e["kind"] == "parallel"}
  assert len(pairs) >= 3 and {"en-de", "en-fr", "en-ja"} <= pairs
  for pair in pairs:
    splits = {}
    for split in SPLITS:
      rows = [line.split("\t") for line in _lines(f"parallel/{pair}.{split}.tsv")]
      assert len(rows) >= 50
      assert all(len(r) == 2 and r[0] and r[1] and r[0] != r[1] for r in rows), pair
      splits[split] = {r[0] for r in rows}
    assert not splits["train"] & splits["validation"], pair
    assert not splits["train"] & splits["test"] and not splits["validation"] & splits["test"]
