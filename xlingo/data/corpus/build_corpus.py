"""Rebuilds the embedded multilingual corpus from Debian packages.

Run as ``python -m xlingo.data.corpus.build_corpus`` on a Debian bookworm machine with
``apt-get`` and ``dpkg`` (no root needed for ``apt-get download``). It writes, next to this
file:

- ``mono/<lang>.{train,validation,test}.txt``: one paragraph per line, for every language of
  ``xlingo.config.EMBEDDED_LANGUAGES``.
- ``parallel/en-<x>.{train,validation,test}.tsv``: aligned English / X paragraph pairs.
- ``tasks/chapter/``: the chapter topic-classification task (paragraph -> chapter) in en, de,
  fr, es, it, pt, ja, zh, in the layout of ``xlingo.data.labelled``.
- ``manifest.json``: counts, sizes, source package versions and licences of every file, the
  task's per-class counts and split bands.

Sources:

- The Debian Reference manual (``debian-reference-<lang>``) for en, de, fr, es, it, pt, ja
  and zh (zh-cn). The plain-text manual ``usr/share/debian-reference/debian-reference.<lang>
  .txt.gz`` gives the monolingual text. Translated manuals still hold paragraphs that were
  never translated; any paragraph that also appears verbatim in the English manual is dropped.
- ``fortunes-ru`` (the Russian fortune-cookie collection) for ru.
- The parallel pairs come from the per-chapter HTML of the same manuals. The translations are
  made with po4a, which translates paragraph by paragraph and keeps the document structure, so
  the k-th ``<p>`` of a chapter in English and in a translation come from the same gettext
  message. A chapter is used only when both sides hold the same number of paragraphs;
  untranslated paragraphs (identical to the English) are skipped.
- The chapter task takes the same aligned ``<p>`` of the twelve chapters ``ch01``..``ch12``
  (not the preface, appendix or index): the uid ``<chapter>-<k>`` of the k-th paragraph is
  shared by the English paragraph and its translations, so labels agree across languages. The
  class names are each page's ``<h1 class="title">`` without its "Chapter N." prefix. No size
  cap applies to the task.

Skew: the manuals have similar sizes, and fortunes-ru is only about 7x larger than the
biggest of them, so the corpus caps the translated manuals to a fixed fraction of their cleaned
paragraphs (``CAPS`` below) to get a real multilingual skew of more than 10x between the
largest and the smallest language, as in web crawls. The kept paragraphs are chosen by a
hash of the text, so the selection is deterministic.

Splits (``split3`` and ``task_bands``): the chapter task splits by the English paragraph's
``sha1 mod 1000``: validation below ``v``, test in ``[v, v + t)``, with v = t = 50 raised per
chapter until every language has TASK_MIN_PER_CLASS validation and test items of it. The LM
corpus and the pairs keep their validation band (``sha1(text) mod 1000 < 50``, raised for a
language until it has ``MIN_VALIDATION`` lines; pairs by the English side) and take test from
the next TEST_PER_MILLE; a paragraph the task holds out (matched by ``match_key``) goes to test
unless its own band puts a task-validation paragraph in validation, so that no train file holds
a task validation or test paragraph and no validation file a task test paragraph.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))

# Language code -> Debian package of its source text.
MANUAL_PACKAGES = {
    "en": "debian-reference-en",
    "de": "debian-reference-de",
    "fr": "debian-reference-fr",
    "es": "debian-reference-es",
    "it": "debian-reference-it",
    "pt": "debian-reference-pt",
    "ja": "debian-reference-ja",
    "zh": "debian-reference-zh-cn",
}
FORTUNE_PACKAGES = {"ru": "fortunes-ru"}
# Suffix of the manual's file names per language (zh is published as zh-cn).
MANUAL_SUFFIX = {lang: pkg[len("debian-reference-") :] for lang, pkg in MANUAL_PACKAGES.items()}

# Fraction of the cleaned paragraphs kept per language (1.0 when absent). Uncapped, the eight
# manuals hold 2,100-2,800 paragraphs each and fortunes-ru about 19,700, a ratio near 7x. en and
# ru stay full; the translations are cut to a decreasing fraction, a long tail like that of a
# web crawl, so that the largest (ru) and the smallest (zh) language differ by more than 10x in
# both examples and bytes.
CAPS = {
    "de": 0.8,
    "fr": 0.7,
    "es": 0.6,
    "it": 0.5,
    "pt": 0.45,
    "ja": 0.4,
    "zh": 0.35,
}

PARALLEL_LANGUAGES = ("de", "fr", "es", "it", "pt", "ja", "zh")
VALIDATION_PER_MILLE = 50
MIN_VALIDATION = 50
MIN_CHARS = 20
TEST_PER_MILLE = 50
TASK_NAME = "chapter"
TASK_LANGUAGES = ("en", *PARALLEL_LANGUAGES)
TASK_VAL_PER_MILLE = 50
TASK_TEST_PER_MILLE = 50
TASK_MIN_PER_CLASS = 3

_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_URL = re.compile(r"(https?|ftp)://\S+|www\.\S+")
_SECTION = re.compile(r"^(\d+\.)+\d*\s")  # "1.2.3. Title" headings and table-of-contents lines
_CODE_CHARS = set("{}[]<>=|\\/$;_~^`#*@&%")


def _sha(text: str) -> int:
  return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def normalize(text: str) -> str:
  """NFC, control characters removed, whitespace (tabs, newlines too) collapsed."""
  text = unicodedata.normalize("NFC", text)
  text = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)
  return re.sub(r"\s+", " ", text).strip()


def is_natural_text(text: str) -> bool:
  """True for prose; False for short lines, code, ASCII art, tables and bare URLs."""
  if len(text) < MIN_CHARS:
    return False
  if _SECTION.match(text):
    return False
  if text.startswith(("$ ", "# ", "% ", "+-", "|")) or "-----" in text or "=====" in text:
    return False
  without_urls = _URL.sub("", text)
  if len(without_urls.strip()) < MIN_CHARS:
    return False
  letters = sum(ch.isalpha() for ch in without_urls)
  if letters < 0.6 * len(without_urls.replace(" ", "")):
    return False
  code = sum(ch in _CODE_CHARS for ch in without_urls)
  return code <= 0.08 * len(without_urls)


def _join_wrapped(lines: list[str]) -> str:
  """Joins hard-wrapped lines; no space between CJK characters or after a wrapped path '/'."""
  out = ""
  for line in lines:
    line = line.strip()
    if not out:
      out = line
    elif not line:
      continue
    elif (_CJK.match(out[-1]) and _CJK.match(line[0])) or out.endswith("/"):
      out += line
    else:
      out += " " + line
  return out


def manual_paragraphs(txt_gz: str) -> list[str]:
  """Paragraphs of a Debian Reference plain-text manual, cleaned, in document order."""
  with gzip.open(txt_gz, "rb") as f:
    text = f.read().decode("utf-8")  # strict: the manuals are UTF-8
  paragraphs = []
  block: list[str] = []

  def flush():
    if not block:
      return
    first = block[0].strip()
    is_table = any(line.strip().startswith(("|", "+-")) for line in block)
    is_code = first.startswith(("$ ", "# "))
    if not is_table and not is_code:
      para = normalize(re.sub(r"^\s*(\*|\d+\.)\s+", "", _join_wrapped(block)))
      if is_natural_text(para):
        paragraphs.append(para)
    block.clear()

  for line in text.splitlines():
    stripped = line.strip()
    if not stripped:
      flush()
    elif stripped.startswith("* ") and block:  # a bullet starts a new paragraph
      flush()
      block.append(line)
    else:
      block.append(line)
  flush()
  return paragraphs


def fortune_paragraphs(fortune_dir: str) -> list[str]:
  """Fortunes of a fortune-mod directory, one per paragraph, attribution lines dropped."""
  out = []
  for path in sorted(glob.glob(os.path.join(fortune_dir, "*"))):
    if path.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      print(f"skipping {path}: not UTF-8", file=sys.stderr)
      continue
    for fortune in re.split(r"^%\s*$", text, flags=re.M):
      lines = [ln for ln in fortune.splitlines() if not ln.strip().startswith("--")]
      para = normalize(" ".join(lines))
      if is_natural_text(para):
        out.append(para)
  return out


class _ParagraphCollector(html.parser.HTMLParser):
  """Collects the text of every <p> element of an HTML page, in order."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: list[str] = []
    self._depth = 0
    self._buf: list[str] = []

  def handle_starttag(self, tag, attrs):
    if tag == "p":
      if self._depth == 0:
        self._buf = []
      self._depth += 1

  def handle_endtag(self, tag):
    if tag == "p" and self._depth:
      self._depth -= 1
      if self._depth == 0:
        self.paragraphs.append(normalize("".join(self._buf)))

  def handle_data(self, data):
    if self._depth:
      self._buf.append(data)


def html_paragraphs(path: str) -> list[str]:
  parser = _ParagraphCollector()
  with open(path, encoding="utf-8") as f:
    parser.feed(f.read())
  parser.close()
  return parser.paragraphs


class _TitleCollector(html.parser.HTMLParser):
  """Collects the text of the first ``<h1 class="title">`` (a chapter's title) of a page."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.title: str | None = None
    self._buf: list[str] | None = None

  def handle_starttag(self, tag, attrs):
    if tag == "h1" and self.title is None and ("class", "title") in attrs:
      self._buf = []

  def handle_endtag(self, tag):
    if tag == "h1" and self._buf is not None:
      self.title = normalize("".join(self._buf))
      self._buf = None

  def handle_data(self, data):
    if self._buf is not None:
      self._buf.append(data)


# "Chapter 1. ", "Kapitel 1. ", "Capítulo 1. ", "第1章 ", "第 1 章 ".
_CHAPTER_PREFIX = re.compile(r"^(?:\w+\s+\d+\.|第\s*\d+\s*章)\s*")


def chapter_title(path: str) -> str:
  """A chapter's title in the page's language, without its "Chapter N." prefix."""
  parser = _TitleCollector()
  with open(path, encoding="utf-8") as f:
    parser.feed(f.read())
  parser.close()
  if not parser.title:
    raise SystemExit(f"{path}: no <h1 class=\"title\">")
  return _CHAPTER_PREFIX.sub("", parser.title)


def match_key(text: str) -> str:
  """What a plain-text paragraph and an HTML paragraph share after cleaning: the normalized
  text, case-folded, without whitespace, punctuation or symbols (the text manual renders links,
  quotes and list markers differently from the HTML)."""
  return "".join(ch for ch in normalize(text).casefold()
                 if unicodedata.category(ch)[0] in "LN")


def _run(cmd: list[str], cwd: str) -> str:
  proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
  return proc.stdout


def fetch(packages: list[str], workdir: str) -> dict[str, dict]:
  """apt-get downloads and dpkg -x unpacks each package; returns name -> {root, version}."""
  _run(["apt-get", "download", *packages], cwd=workdir)
  info = {}
  for pkg in packages:
    (deb,) = glob.glob(os.path.join(workdir, f"{pkg}_*.deb"))
    root = os.path.join(workdir, pkg)
    _run(["dpkg", "-x", deb, root], cwd=workdir)
    version = _run(["dpkg-deb", "-f", deb, "Version"], cwd=workdir).strip()
    info[pkg] = {"root": root, "version": version, **read_copyright(root, pkg)}
  return info


def read_copyright(root: str, pkg: str) -> dict:
  """Licence and copyright holders of the 'Files: *' stanza of a DEP-5 copyright file."""
  path = os.path.join(root, "usr/share/doc", pkg, "copyright")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  stanza = text.split("Files: *", 1)[1] if "Files: *" in text else text
  stanza = re.split(r"\n\s*\n", stanza, maxsplit=1)[0]
  lic = re.search(r"^License:\s*(.+)$", stanza, flags=re.M)
  holders = []
  m = re.search(r"^Copyright:(.*?)(?=^\S)", stanza + "\nEnd:", flags=re.M | re.S)
  if m:
    holders = [h.strip() for h in m.group(1).splitlines() if h.strip()]
  return {"licence": lic.group(1).strip() if lic else "unknown", "copyright": holders}


def dedup(items):
  seen = set()
  out = []
  for it in items:
    if it not in seen:
      seen.add(it)
      out.append(it)
  return out


def cap(lines: list[str], fraction: float) -> list[str]:
  if fraction >= 1.0:
    return lines
  return [ln for ln in lines if _sha("cap:" + ln) % 10000 < fraction * 10000]


def split(items: list, key) -> tuple[list, list]:
  """Deterministic ~5% validation split by hash, at least MIN_VALIDATION items."""
  threshold = VALIDATION_PER_MILLE
  while True:
    val = [it for it in items if _sha(key(it)) % 1000 < threshold]
    if len(val) >= MIN_VALIDATION or threshold >= 500:
      break
    threshold += 10
  train = [it for it in items if _sha(key(it)) % 1000 >= threshold]
  return train, val


def _write_lines(path: str, lines: list[str]) -> dict:
  data = "".join(line + "\n" for line in lines)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write(data)
  return {"examples": len(lines), "bytes": len(data.encode("utf-8")), "chars": len(data)}


def val_threshold(items: list, key) -> int:
  """The validation band of ``split``: ``sha1(key) mod 1000 <`` this (raised from
  VALIDATION_PER_MILLE until MIN_VALIDATION items)."""
  threshold = VALIDATION_PER_MILLE
  while threshold < 500 and sum(_sha(key(it)) % 1000 < threshold for it in items) < MIN_VALIDATION:
    threshold += 10
  return threshold


_RANK = {"train": 0, "validation": 1, "test": 2}


def split3(items: list, key, task_split) -> dict[str, list]:
  """train / validation / test of the LM corpus and the pairs.

  An item's own band: validation when ``sha1(key) mod 1000 < v`` (``val_threshold``, the
  validation files of the two-way ``split``), test when ``v <= h < v + TEST_PER_MILLE``.
  ``task_split(item)`` is the split of the chapter-task paragraph the item matches (None when
  none): a paragraph of the task's test split goes to test, one of its validation split stays
  in validation when its own band says so and goes to test otherwise, and one of its train
  split stays in train (or validation by its own band), so that nothing the task holds out is
  in a train file and nothing of the task's test is in a validation file.
  """
  v = val_threshold(items, key)
  out = {"train": [], "validation": [], "test": []}
  for it in items:
    h = _sha(key(it)) % 1000
    own = "validation" if h < v else "test" if h < v + TEST_PER_MILLE else "train"
    task = task_split(it)
    if task == "test" or (task == "validation" and own != "validation"):
      name = "test"
    elif task is not None and own == "test":
      name = "train"
    else:
      name = own
    out[name].append(it)
  return out


def task_bands(uids_by_lang: dict[str, list[str]], en_text: dict[str, str]) -> tuple[int, int]:
  """(v, t) of one chapter: its paragraphs go to validation when ``sha1(English text) mod
  1000 < v`` and to test when ``v <= h < v + t``. Both start at TASK_VAL_PER_MILLE and
  TASK_TEST_PER_MILLE and rise by 10 until every language has TASK_MIN_PER_CLASS items of the
  chapter in each (or the bands reach 300 each)."""
  v, t = TASK_VAL_PER_MILLE, TASK_TEST_PER_MILLE
  while True:
    low_val = low_test = False
    for uids in uids_by_lang.values():
      hs = [_sha(en_text[u]) % 1000 for u in uids]
      low_val |= sum(h < v for h in hs) < TASK_MIN_PER_CLASS
      low_test |= sum(v <= h < v + t for h in hs) < TASK_MIN_PER_CLASS
    if low_val and v < 300:
      v += 10
    elif low_test and t < 300:
      t += 10
    else:
      return v, t


def chapter_task(html_path) -> dict:
  """The chapter topic-classification task from the per-chapter HTML manuals.

  ``html_path(lang, base)`` is the path of a page. Returns labels, names, per-language
  examples ``{lang: [(uid, label, text)]}``, ``split_of`` (uid -> split) and the bands.
  """
  chapters = sorted(b for b in (os.path.basename(p)[: -len(".en.html")]
                                for p in glob.glob(html_path("en", "*")))
                    if re.fullmatch(r"ch\d+", b))
  names = {lang: [chapter_title(html_path(lang, ch)) for ch in chapters]
           for lang in TASK_LANGUAGES}
  en_text: dict[str, str] = {}
  texts: dict[str, dict[str, str]] = {lang: {} for lang in TASK_LANGUAGES}  # lang -> uid -> text
  chapter_of: dict[str, str] = {}
  for ch in chapters:
    en_p = html_paragraphs(html_path("en", ch))
    x_p = {}
    for lang in PARALLEL_LANGUAGES:
      p = html_paragraphs(html_path(lang, ch))
      if len(p) == len(en_p):
        x_p[lang] = p
      else:
        print(f"chapter task: skipping {ch} for {lang}: {len(en_p)} vs {len(p)} paragraphs")
    for k, e in enumerate(en_p):
      if not is_natural_text(e):
        continue
      uid = f"{ch}-{k:03d}"
      en_text[uid], chapter_of[uid] = e, ch
      texts["en"][uid] = e
      for lang, p in x_p.items():
        if p[k] != e and is_natural_text(p[k]):
          texts[lang][uid] = p[k]
  # One example per text and language: a text under several uids keeps the first when all
  # its uids have one chapter and one English text, and is dropped otherwise.
  for lang in TASK_LANGUAGES:
    by_text: dict[str, list[str]] = {}
    for uid, text in texts[lang].items():
      by_text.setdefault(text, []).append(uid)
    for uids in by_text.values():
      keep = uids[0] if len({(chapter_of[u], en_text[u]) for u in uids}) == 1 else None
      for u in uids:
        if u != keep:
          del texts[lang][u]
  # An English text in several chapters has no single label: dropped in every language.
  en_chapters: dict[str, set] = {}
  for uid, e in en_text.items():
    en_chapters.setdefault(e, set()).add(chapter_of[uid])
  for lang in TASK_LANGUAGES:
    texts[lang] = {u: t for u, t in texts[lang].items() if len(en_chapters[en_text[u]]) == 1}
  bands, split_of = {}, {}
  for ch in chapters:
    uids_by_lang = {lang: [u for u in texts[lang] if chapter_of[u] == ch]
                    for lang in TASK_LANGUAGES}
    v, t = bands[ch] = task_bands(uids_by_lang, en_text)
    for u in uids_by_lang["en"] + [u for us in uids_by_lang.values() for u in us]:
      h = _sha(en_text[u]) % 1000
      split_of[u] = "validation" if h < v else "test" if h < v + t else "train"
  examples = {lang: [(u, chapter_of[u], t) for u, t in texts[lang].items()]
              for lang in TASK_LANGUAGES}
  return {"labels": chapters, "names": names, "examples": examples, "split_of": split_of,
          "bands": bands, "en_text": en_text}


def write_task(out_dir: str, task: dict, source: str, licence: str, manifest: dict) -> None:
  tdir = os.path.join(out_dir, "tasks", TASK_NAME)
  os.makedirs(tdir, exist_ok=True)
  labels = {"labels": task["labels"], "names": task["names"], "source": source,
            "licence": licence}
  with open(os.path.join(tdir, "labels.json"), "w", encoding="utf-8", newline="\n") as f:
    json.dump(labels, f, indent=1, ensure_ascii=False)
    f.write("\n")
  for lang in TASK_LANGUAGES:
    for name in ("train", "validation", "test"):
      part = [(u, ch, t) for u, ch, t in task["examples"][lang] if task["split_of"][u] == name]
      rel = f"tasks/{TASK_NAME}/{lang}.{name}.tsv"
      stats = _write_lines(os.path.join(out_dir, rel), [f"{ch}\t{t}\t{u}" for u, ch, t in part])
      manifest["files"][rel] = {
          "kind": "task", "task": TASK_NAME, "language": lang, "split": name, **stats,
          "classes": {ch: sum(c == ch for _, c, _ in part) for ch in task["labels"]},
          "source_package": MANUAL_PACKAGES[lang] if lang == "en"
          else f"debian-reference-en, {MANUAL_PACKAGES[lang]}",
          "source_version": manifest["packages"][MANUAL_PACKAGES[lang]]["version"],
          "licence": licence,
      }


def build(out_dir: str, workdir: str) -> dict:
  packages = list(MANUAL_PACKAGES.values()) + list(FORTUNE_PACKAGES.values())
  info = fetch(packages, workdir)

  def manual_dir(lang):
    return os.path.join(info[MANUAL_PACKAGES[lang]]["root"], "usr/share/debian-reference")

  def html_path(lang, base):
    return os.path.join(manual_dir(lang), f"{base}.{MANUAL_SUFFIX[lang]}.html")

  mono: dict[str, list[str]] = {}
  for lang in MANUAL_PACKAGES:
    (txt,) = glob.glob(os.path.join(manual_dir(lang), f"*.{MANUAL_SUFFIX[lang]}.txt.gz"))
    mono[lang] = dedup(manual_paragraphs(txt))
  english = set(mono["en"])
  for lang in MANUAL_PACKAGES:
    if lang != "en":
      mono[lang] = [p for p in mono[lang] if p not in english]
  for lang, pkg in FORTUNE_PACKAGES.items():
    mono[lang] = dedup(fortune_paragraphs(os.path.join(info[pkg]["root"], "usr/share/games/fortunes", lang)))

  from xlingo.config import EMBEDDED_LANGUAGES

  assert set(mono) == set(EMBEDDED_LANGUAGES), sorted(mono)
  manifest = {"files": {}, "packages": {}, "caps": CAPS}
  for pkg in packages:
    manifest["packages"][pkg] = {k: v for k, v in info[pkg].items() if k != "root"}

  en_info = info[MANUAL_PACKAGES["en"]]
  task = chapter_task(html_path)
  write_task(out_dir, task, source=f"Debian Reference {en_info['version']} (debian-reference-"
             "<lang> packages, Debian 12), per-chapter HTML; paragraph -> chapter",
             licence=en_info["licence"], manifest=manifest)
  split_of = task["split_of"]
  # The task's split of a plain-text paragraph: by its match key among the task's paragraphs
  # of that language (the most held-out split when a key has several).
  task_split_by_key: dict[str, dict[str, str]] = {}
  for lang, exs in task["examples"].items():
    keys = task_split_by_key[lang] = {}
    for u, _, t in exs:
      k, s = match_key(t), split_of[u]
      if _RANK[s] >= _RANK.get(keys.get(k), -1):
        keys[k] = s
  overlap = {}

  os.makedirs(os.path.join(out_dir, "mono"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "parallel"), exist_ok=True)
  for lang in EMBEDDED_LANGUAGES:
    natural = len(mono[lang])
    lines = cap(mono[lang], CAPS.get(lang, 1.0))
    keys = task_split_by_key.get(lang, {})
    parts = split3(lines, key=lambda s: s, task_split=lambda s, keys=keys: keys.get(match_key(s)))
    if keys:
      held = [k for k, s in keys.items() if s != "train"]
      matched = {match_key(s) for s in mono[lang]}
      overlap[lang] = {"task_heldout": len(held),
                       "matched_in_text_manual": sum(k in matched for k in held)}
    pkg = MANUAL_PACKAGES.get(lang) or FORTUNE_PACKAGES[lang]
    for name, part in parts.items():
      rel = f"mono/{lang}.{name}.txt"
      stats = _write_lines(os.path.join(out_dir, rel), part)
      manifest["files"][rel] = {
          "kind": "mono",
          "language": lang,
          "split": name,
          **stats,
          "cap_fraction": CAPS.get(lang, 1.0),
          "paragraphs_before_cap": natural,
          "source_package": pkg,
          "source_version": info[pkg]["version"],
          "licence": info[pkg]["licence"],
      }

  task_split_by_en = {t: split_of[u] for u, _, t in task["examples"]["en"]}
  for lang in PARALLEL_LANGUAGES:
    pairs = []
    for en_html in sorted(glob.glob(html_path("en", "*"))):
      base = os.path.basename(en_html)[: -len(".en.html")]
      x_html = html_path(lang, base)
      if not os.path.exists(x_html):
        continue
      en_p, x_p = html_paragraphs(en_html), html_paragraphs(x_html)
      if len(en_p) != len(x_p):
        print(f"skipping {base} for en-{lang}: {len(en_p)} vs {len(x_p)} paragraphs")
        continue
      for e, x in zip(en_p, x_p):
        if e != x and is_natural_text(e) and is_natural_text(x):
          pairs.append((e, x))
    pairs = dedup(pairs)
    src = MANUAL_PACKAGES[lang]
    parts = split3(pairs, key=lambda p: p[0], task_split=lambda p: task_split_by_en.get(p[0]))
    for name, part in parts.items():
      rel = f"parallel/en-{lang}.{name}.tsv"
      stats = _write_lines(os.path.join(out_dir, rel), [f"{e}\t{x}" for e, x in part])
      manifest["files"][rel] = {
          "kind": "parallel",
          "language": lang,
          "pair": f"en-{lang}",
          "split": name,
          **stats,
          "source_package": f"debian-reference-en, {src}",
          "source_version": info[src]["version"],
          "licence": info[src]["licence"],
      }

  manifest["tasks"] = {TASK_NAME: {
      "labels": task["labels"],
      "bands_per_mille": {ch: {"validation": [0, v], "test": [v, v + t]}
                          for ch, (v, t) in task["bands"].items()},
      "heldout_in_mono": overlap,
  }}
  with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
    f.write("\n")
  return manifest


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=HERE, help="where mono/, parallel/ and manifest go")
  parser.add_argument("--keep_workdir", default="", help="download here and keep the files")
  args = parser.parse_args(argv)
  if args.keep_workdir:
    os.makedirs(args.keep_workdir, exist_ok=True)
    manifest = build(args.out_dir, args.keep_workdir)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      manifest = build(args.out_dir, tmp)
  for rel, m in sorted(manifest["files"].items()):
    print(f"{rel:36s} {m['examples']:7d} examples {m['bytes']:9d} bytes")


if __name__ == "__main__":
  main()
