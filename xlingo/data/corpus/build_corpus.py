"""Rebuilds the embedded multilingual corpus from Debian packages.

Run as ``python -m xlingo.data.corpus.build_corpus`` on a Debian bookworm machine with
``apt-get`` and ``dpkg`` (no root needed for ``apt-get download``). It writes, next to this
file:

- ``mono/<lang>.{train,validation}.txt``: one paragraph per line, for every language of
  ``xlingo.config.EMBEDDED_LANGUAGES``.
- ``parallel/en-<x>.{train,validation}.tsv``: aligned English / X paragraph pairs.
- ``manifest.json``: counts, sizes, source package versions and licences of every file.

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

Skew: the manuals have similar sizes, and fortunes-ru is only about 7x larger than the
biggest of them, so the corpus caps the translated manuals to a fixed fraction of their cleaned
paragraphs (``CAPS`` below) to get a real multilingual skew of more than 10x between the
largest and the smallest language, as in web crawls. The kept paragraphs are chosen by a
hash of the text, so the selection is deterministic.

Splits: a paragraph goes to validation when ``sha1(text) mod 1000 < 50`` (about 5%); the
threshold grows for a language until it has at least ``MIN_VALIDATION`` lines. Parallel pairs
are split by the hash of the English side.
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


def build(out_dir: str, workdir: str) -> dict:
  packages = list(MANUAL_PACKAGES.values()) + list(FORTUNE_PACKAGES.values())
  info = fetch(packages, workdir)

  def manual_dir(lang):
    return os.path.join(info[MANUAL_PACKAGES[lang]]["root"], "usr/share/debian-reference")

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

  os.makedirs(os.path.join(out_dir, "mono"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "parallel"), exist_ok=True)
  for lang in EMBEDDED_LANGUAGES:
    natural = len(mono[lang])
    lines = cap(mono[lang], CAPS.get(lang, 1.0))
    pkg = MANUAL_PACKAGES.get(lang) or FORTUNE_PACKAGES[lang]
    for name, part in zip(("train", "validation"), split(lines, key=lambda s: s)):
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

  en_dir = manual_dir("en")
  for lang in PARALLEL_LANGUAGES:
    pairs = []
    for en_html in sorted(glob.glob(os.path.join(en_dir, "*.en.html"))):
      base = os.path.basename(en_html)[: -len(".en.html")]
      x_html = os.path.join(manual_dir(lang), f"{base}.{MANUAL_SUFFIX[lang]}.html")
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
    for name, part in zip(("train", "validation"), split(pairs, key=lambda p: p[0])):
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
