"""Builds text for languages in scripts the embedded corpus lacks (Greek, Korean), from Debian.

Run as ``python -m xlingo.data.corpus.build_new_language`` on a Debian bookworm machine with
``apt-get``, ``dpkg``, ``man`` and ``col`` (``apt-get download`` needs no root). It writes,
under ``new/`` next to this file, for each language ``x`` of ``LANGUAGES``:

- ``new/<x>.{train,validation}.txt``: one example per line (monolingual).
- ``new/en-<x>.{train,validation}.tsv``: English and ``x`` text, tab-separated (parallel).
- ``new/manifest.json``: counts, sizes, packages, versions and licences.

The embedded corpus (en, de, fr, es, it, pt, ru, ja, zh) has Latin, Cyrillic and CJK text only;
these files exist to show vocabulary extension (``xlingo.data.vocab_extend``) on a new script.

Sources (Debian 12 "bookworm"; versions are recorded in the manifest):

- The translated message catalogs (``usr/share/locale/<x>/LC_MESSAGES/*.mo``) shipped in the
  binary packages of ``CATALOG_PACKAGES``. Every message gives an English ``msgid`` and its
  translated ``msgstr``: the translation goes to the monolingual file, the pair to the parallel
  file. Each package's licence was read by hand from its ``usr/share/doc/<pkg>/copyright`` and
  is written in ``CATALOG_PACKAGES``; the build stops when that licence name no longer occurs in
  the downloaded copyright file (a new version may have changed it).
- For Greek also ``manpages-el`` (five translated manual pages: bison, cmp, diff, diff3,
  sdiff), rendered to plain text with ``man -l`` and ``col -b``; its paragraphs go to the
  monolingual file only (there is no aligned English).

Left out on purpose: ``git`` (GPL-2 only, so its text could not share a file with the GPL-3+
catalogs), ``findutils`` (Debian's copyright file puts everything outside the program sources
under GFDL-1.3+), ``iso-codes`` and ``xkb-data`` (names, not sentences), and the GUI libraries.
Every licence kept (GPL-2+, GPL-3+, LGPL-2.1+, BSD-3-clause, PostgreSQL) allows distributing the
files as a whole under GPL-3+.

Cleaning, per message:

1. Plural messages keep the singular ``msgid`` and ``msgstr[0]``; a ``msgctxt`` is dropped;
   empty translations and the catalog header are skipped (fuzzy entries are never compiled
   into a ``.mo``).
2. A multi-line message (``--help`` texts) is cut into lines; an indented line that does not
   start with an option continues the line before it. When both sides then hold the same
   number of lines they are paired line by line, else the message is kept whole.
3. Removed: printf/Python/brace format specifiers (``%s``, ``%-10lu``, ``%1$s``, ``%<PRIuMAX>``,
   ``%(name)s``, ``{0}``), the quotes left empty around them, keyboard accelerators (``_Open``,
   ``&Open``), leading option lists (``-a, --all``) and leading ``name:`` prefixes that were
   placeholders; whitespace collapsed, NFC (``build_corpus.normalize``).
4. Kept only when both sides pass ``build_corpus.is_natural_text`` (at least 20 characters, mostly
   letters, little code), the translation has at least 3 words and mostly letters of the
   language's script (untranslated or half-translated messages fail this) and the English side
   has no letters of that script.
5. Duplicates removed (monolingual lines by text, pairs by both sides).

Splits: a deterministic ~5% validation share by a SHA-1 hash, as in ``build_corpus.split``, but
taken over groups: every monolingual line and pair that shares a translation or an English text
(connected through the pairs) gets the key of its group, so no translated line and no English
line is in both train and validation, across the monolingual and the parallel files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import struct
import subprocess
import tempfile

from xlingo.data.corpus import build_corpus as bc

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_SUBDIR = "new"

# Language -> (letters of its script, man-page package or None).
LANGUAGES = {
    "el": (r"\u0370-\u03ff\u1f00-\u1fff", "manpages-el"),
    "ko": (r"\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f", None),
}

# Binary package -> (licence of its translations, a phrase of usr/share/doc/<pkg>/copyright that
# states it), read by hand: the "Files: *" stanza of a DEP-5 file, or the prose of an older one.
CATALOG_PACKAGES = {
    "bash": ("GPL-3+", "License: GPL-3+"),
    "coreutils": ("GPL-3+", "License: GPL-3+"),
    "grep": ("GPL-3+", "License: GPL-3+"),
    "diffutils": ("GPL-3+", "License: GPL-3+"),
    "sed": ("GPL-3+", "License: GPL-3+"),
    "tar": ("GPL-3+", "License: GPL-3+"),
    "gnupg-l10n": ("GPL-3+", "License: GPL-3+"),
    "wget": ("GPL-3+", "common-licenses/GPL-3"),
    "gettext": ("GPL-3+", "either version 3 of the License, or"),
    "gettext-base": ("GPL-3+", "either version 3 of the License, or"),
    "apt": ("GPL-2+", "License: GPL-2+"),
    "libapt-pkg6.0": ("GPL-2+", "License: GPL-2+"),
    "dpkg": ("GPL-2+", "License: GPL-2+"),
    "psmisc": ("GPL-2+", "License: GPL-2+"),
    "man-db": ("GPL-2+", "License: GPL-2+"),
    "libc-l10n": ("LGPL-2.1+", "version 2.1 of the License, or (at your option) any later"),
    "systemd": ("LGPL-2.1+", "License: LGPL-2.1+"),
    "login": ("BSD-3-clause", "License: BSD-3-clause"),  # the shadow suite
    "postgresql-15": ("PostgreSQL", "License: PostgreSQL"),
    "postgresql-client-15": ("PostgreSQL", "License: PostgreSQL"),
    "libpq5": ("PostgreSQL", "License: PostgreSQL"),
}
MANPAGE_LICENCE = ("GPL-3+", "License: GPL-3+")
# Every licence above lets the text be redistributed under GPL-3+, so each file as a whole is.
FILES_LICENCE = "GPL-3+"

# Fraction of the groups (see Splits) kept per language, chosen by hash, to keep the files small
# (1.0 when absent): Korean has about 1.5x Greek's text and is the optional second script.
CAPS = {"ko": 0.3}

MIN_WORDS = 3
SCRIPT_SHARE = 0.5

_PRINTF = re.compile(
    r"%(\d+\$)?[-+ #0']*(\*|\d+)?(\.(\*|\d+))?(hh|h|ll|l|L|q|j|z|t|I)?[diouxXeEfFgGaAcCsSpm]"
    r"|%<PRI\w+>|%\(\w+\)[sdifr]|\{\w*(:[^{}]*)?\}"
)
_QUOTES = "'\"«»`‘’“”„「」"
_LEADING_SPEC = re.compile(rf"[\s{_QUOTES}]*({_PRINTF.pattern})[\s:,;()\[\]{_QUOTES}-]*")
_TRAILING_SPEC = re.compile(rf"[\s:,;=(\[{_QUOTES}]*({_PRINTF.pattern})[\s.:)\]{_QUOTES}]*$")
_EMPTY_QUOTES = re.compile(r"(''|\"\"|`'|«\s*»|“\s*”|‘\s*’|„\s*“|「」|\(\s*\)|\[\s*\])")
_ACCEL = re.compile(r"(?<!\w)[_&](?=\w)")
_OPTIONS = re.compile(r"^(\s*[-+]{1,2}[\w?@][\w\-]*(\[?=[^\s,]*\]?)?(\s+[A-Z][A-Z_]*\b)?,?)+\s+")
_TRANSLATOR = re.compile(r"^(?:Last-Translator|Language-Team): *(.+)$", re.M)
_LEAD_PUNCT = re.compile(r"^[\s:;,.)\]»”’-]+")


def read_mo(data: bytes) -> list[tuple[str, str]]:
  """(msgid, msgstr) of every message of a compiled gettext catalog, header included."""
  magic = struct.unpack("<I", data[:4])[0]
  endian = "<" if magic == 0x950412DE else ">"
  if struct.unpack(endian + "I", data[:4])[0] != 0x950412DE:
    raise ValueError("not a .mo file")
  _, n, orig_at, trans_at = struct.unpack(endian + "4I", data[4:20])
  raw = []
  for i in range(n):
    olen, ooff = struct.unpack(endian + "2I", data[orig_at + 8 * i : orig_at + 8 * i + 8])
    tlen, toff = struct.unpack(endian + "2I", data[trans_at + 8 * i : trans_at + 8 * i + 8])
    raw.append((data[ooff : ooff + olen], data[toff : toff + tlen]))
  header = dict(raw).get(b"", b"").decode("ascii", "replace")
  m = re.search(r"charset=([\w-]+)", header)
  charset = m.group(1) if m else "utf-8"
  return [(k.decode(charset), v.decode(charset)) for k, v in raw]


def _units(message: str) -> list[str]:
  """Lines of a message; an indented line that is not an option continues the previous one."""
  out: list[str] = []
  for line in message.split("\n"):
    if not line.strip():
      continue
    continues = line[:1].isspace() and not line.lstrip().startswith(("-", "+"))
    if out and continues:
      out[-1] += " " + line.strip()
    else:
      out.append(line)
  return out


def _strip_edge_specifiers(text: str) -> str | None:
  """Text without the format specifiers at its start and end; None if one is left inside."""
  text = text.replace("%%", "\x01")
  while True:
    m = _LEADING_SPEC.match(text)
    if not m or not m.group(0):
      break
    text = text[m.end() :]
  while True:
    m = _TRAILING_SPEC.search(text)
    if not m:
      break
    text = text[: m.start()]
  if _PRINTF.search(text):
    return None
  return text.replace("\x01", "%")


def clean(text: str) -> str:
  """A cleaned message, or "" when a format specifier sits inside it (a hole in a sentence)."""
  text = _strip_edge_specifiers(text)
  if text is None:
    return ""
  text = _EMPTY_QUOTES.sub("", text)
  text = _ACCEL.sub("", text)
  text = _OPTIONS.sub("", text)
  text = bc.normalize(text)
  text = re.sub(r"\s+([,.;:!?)»”])", r"\1", text)
  if text.count("(") > text.count(")"):  # "(default: %s)" lost its end with the specifier
    text = text[: text.rindex("(")]
  return _LEAD_PUNCT.sub("", text).strip()


def _script_share(text: str, letters: str) -> float:
  alpha = [ch for ch in text if ch.isalpha()]
  if not alpha:
    return 0.0
  return len(re.findall(f"[{letters}]", "".join(alpha))) / len(alpha)


def keep_translation(text: str, letters: str) -> bool:
  return (
      bc.is_natural_text(text)
      and len(text.split()) >= MIN_WORDS
      and _script_share(text, letters) >= SCRIPT_SHARE
  )


def catalog_pairs(msgid: str, msgstr: str, letters: str) -> list[tuple[str, str]]:
  """Clean (English, translation) pairs of one message; [] when nothing is kept."""
  if not msgid or not msgstr:
    return []
  msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]
  msgstr = msgstr.split("\x00", 1)[0]
  en_units, x_units = _units(msgid), _units(msgstr)
  if len(en_units) != len(x_units):
    en_units, x_units = [" ".join(en_units)], [" ".join(x_units)]
  pairs = []
  for e, x in zip(en_units, x_units):
    e, x = clean(e), clean(x)
    if e != x and keep_translation(x, letters) and bc.is_natural_text(e):
      if _script_share(e, letters) == 0.0:
        pairs.append((e, x))
  return pairs


def manpage_paragraphs(path: str, letters: str) -> list[str]:
  """Paragraphs of a man page rendered to plain text (headings and option lines dropped)."""
  env = dict(os.environ, MANWIDTH="100000", LANG="C.UTF-8", MAN_KEEP_FORMATTING="")
  rendered = subprocess.run(
      ["man", "-l", "-E", "UTF-8", path], capture_output=True, env=env, check=True
  ).stdout
  plain = subprocess.run(["col", "-b"], input=rendered, capture_output=True, check=True).stdout
  out = []
  for line in plain.decode("utf-8").splitlines():
    if not line[:1].isspace():  # headings (ΟΝΟΜΑ, ΠΕΡΙΓΡΑΦΗ) and the page's title lines
      continue
    text = clean(line)
    if keep_translation(text, letters):
      out.append(text)
  return out


def group_keys(mono: list[str], pairs: list[tuple[str, str]]) -> dict[str, str]:
  """Key of each text's group: texts linked through a pair (either side) share one key."""
  parent: dict[str, str] = {}

  def find(a):
    while parent.setdefault(a, a) != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  for e, x in pairs:
    ra, rb = find("en:" + e), find("x:" + x)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)  # smallest member as root: order-independent
  for line in mono:
    find("x:" + line)
  return {node: find(node) for node in parent}


def _check_licence(info: dict, pkg: str, licence: tuple[str, str]) -> None:
  path = os.path.join(info["root"], "usr/share/doc", pkg, "copyright")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if licence[1] not in text:
    raise SystemExit(f"{pkg}: {licence[1]!r} ({licence[0]}) not in {path}; re-check it by hand")


def build(out_dir: str, workdir: str, languages: list[str]) -> dict:
  man_pkgs = [LANGUAGES[lang][1] for lang in languages if LANGUAGES[lang][1]]
  info = bc.fetch(list(CATALOG_PACKAGES) + man_pkgs, workdir)
  for pkg, licence in CATALOG_PACKAGES.items():
    _check_licence(info[pkg], pkg, licence)
  for pkg in man_pkgs:
    _check_licence(info[pkg], pkg, MANPAGE_LICENCE)

  manifest = {"files": {}, "packages": {}}
  os.makedirs(os.path.join(out_dir, OUT_SUBDIR), exist_ok=True)
  for lang in languages:
    letters, man_pkg = LANGUAGES[lang]
    mono, pairs, used = [], [], {}
    for pkg in CATALOG_PACKAGES:
      locale_dir = os.path.join(info[pkg]["root"], "usr/share/locale", lang, "LC_MESSAGES")
      mos = sorted(glob.glob(os.path.join(locale_dir, "*.mo")))
      before, translators = len(pairs), set()
      for mo in mos:
        with open(mo, "rb") as f:
          for msgid, msgstr in read_mo(f.read()):
            pairs.extend(catalog_pairs(msgid, msgstr, letters))
            if not msgid:
              translators.update(_TRANSLATOR.findall(msgstr))
      if len(pairs) > before:
        used[pkg] = {
            "catalogs": [os.path.basename(m) for m in mos],
            "pairs": len(pairs) - before,
            "translators": sorted(t.strip() for t in translators if t.strip()),
        }
    pairs = bc.dedup(pairs)
    mono = bc.dedup([x for _, x in pairs])
    if man_pkg:
      pages = sorted(glob.glob(os.path.join(info[man_pkg]["root"], f"usr/share/man/{lang}/man*/*")))
      man_lines = [p for page in pages for p in manpage_paragraphs(page, letters)]
      used[man_pkg] = {"pages": [os.path.basename(p) for p in pages], "lines": len(man_lines)}
      mono = bc.dedup(mono + man_lines)
    keys = group_keys(mono, pairs)
    frac = CAPS.get(lang, 1.0)
    if frac < 1.0:
      kept = {k for k in set(keys.values()) if bc._sha("cap:" + k) % 10000 < frac * 10000}
      mono = [x for x in mono if keys["x:" + x] in kept]
      pairs = [p for p in pairs if keys["x:" + p[1]] in kept]
    sources = ", ".join(sorted(used))
    versions = ", ".join(f"{p} {info[p]['version']}" for p in sorted(used))
    outputs = [
        ("txt", "mono", mono, lambda s, k=keys: k["x:" + s], lambda s: s),
        ("tsv", "parallel", pairs, lambda p, k=keys: k["x:" + p[1]], lambda p: f"{p[0]}\t{p[1]}"),
    ]
    for ext, kind, items, key, fmt in outputs:
      stem = lang if kind == "mono" else f"en-{lang}"
      for split_name, part in zip(("train", "validation"), bc.split(items, key=key)):
        rel = f"{OUT_SUBDIR}/{stem}.{split_name}.{ext}"
        stats = bc._write_lines(os.path.join(out_dir, rel), [fmt(it) for it in part])
        manifest["files"][rel] = {
            "kind": kind, "language": lang, "split": split_name, **stats,
            "source_package": sources, "source_version": versions, "licence": FILES_LICENCE,
        }
        if kind == "parallel":
          manifest["files"][rel]["pair"] = f"en-{lang}"
    for pkg, detail in used.items():
      entry = manifest["packages"].setdefault(pkg, {
          "version": info[pkg]["version"],
          "licence": CATALOG_PACKAGES.get(pkg, MANPAGE_LICENCE)[0],
          "copyright": info[pkg]["copyright"],
      })
      entry[lang] = detail

  with open(os.path.join(out_dir, OUT_SUBDIR, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
    f.write("\n")
  return manifest


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=HERE, help="new/ is written under this directory")
  parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated")
  parser.add_argument("--keep_workdir", default="", help="download here and keep the files")
  args = parser.parse_args(argv)
  languages = [lang for lang in args.languages.split(",") if lang]
  unknown = sorted(set(languages) - set(LANGUAGES))
  if unknown:
    raise SystemExit(f"unknown languages {unknown}; known: {sorted(LANGUAGES)}")
  if args.keep_workdir:
    os.makedirs(args.keep_workdir, exist_ok=True)
    manifest = build(args.out_dir, args.keep_workdir, languages)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      manifest = build(args.out_dir, tmp, languages)
  for rel, m in sorted(manifest["files"].items()):
    print(f"{rel:32s} {m['examples']:7d} examples {m['bytes']:9d} bytes")


if __name__ == "__main__":
  main()
