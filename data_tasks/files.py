"""A user's own corpus: plain-text (one example per line) or JSONL files, by glob per language.

In the config:
  c.data.source = "files"
  c.data.file_patterns = {"de": "/data/de/train-*.txt", "sw": "/data/sw/train-*.jsonl"}
  c.data.file_val_patterns = {"de": "/data/de/valid.txt"}   # optional, per language
  c.data.file_test_patterns = {"de": "/data/de/test.txt"}   # optional: evaluate --split test
A file both trained and validated on is refused; a language without validation files is
named in the start-of-run table (it gets no val/bpb).
  c.data.jsonl_field = "text"
Parallel data: c.data.file_pair_patterns = {"en-sw": "/data/en-sw/train.tsv"} (source<TAB>target),
  c.data.file_pair_val_patterns = {"en-sw": "/data/en-sw/valid.tsv"}  # optional: its validation
  c.data.file_pair_test_patterns = {"en-sw": "/data/en-sw/test.tsv"}  # and test splits
"""

from data_tasks.registered import Registered
from xlingo import paths as xpaths
from xlingo.data import pairs, readers, tasks
from xlingo.errors import DataError


def _split_files(lang, train_pat, val_pats, what, test_pats=None):
  files = {"train": tasks.expand_pattern(train_pat, f"{what}.{lang}")}
  if lang in val_pats:
    files["validation"] = tasks.expand_pattern(
        val_pats[lang], f"{what.replace('patterns', 'val_patterns')}.{lang}")
  if lang in (test_pats or {}):
    files["test"] = tasks.expand_pattern(
        test_pats[lang], f"{what.replace('patterns', 'test_patterns')}.{lang}")
  for paths in files.values():
    tasks.check_utf8(paths, f"{what}.{lang}")
  return files


def _check_no_overlap(train: dict, held_out: dict) -> None:
  """A file that is both trained on and held out would make validation meaningless
  (e.g. the glob "/data/sw/*.jsonl" also matching "/data/sw/valid.jsonl"): refused, as is a
  file in two held-out splits. ``held_out``: split -> {config key: files}."""
  held = {}
  for split, groups in held_out.items():
    for key, files in groups.items():
      for p in files:
        other = held.setdefault(xpaths.resolve(p), (split, key))
        if other[0] != split:
          raise DataError(f"{key} matches {p}, which is also a {other[0]} file ({other[1]}); "
                          "give each split its own files")
  for key, files in train.items():
    for p in files:
      if xpaths.resolve(p) in held:
        split, other = held[xpaths.resolve(p)]
        raise DataError(f"{key} matches {p}, which is also a {split} file ({other}); narrow the "
                        "train glob so that it leaves out the held-out files (e.g. "
                        "train-*.jsonl)")


def _format(lang: str, files, field: str) -> str:
  kinds = {readers.format_of(p, field) for p in files}
  if len(kinds) > 1:
    raise DataError(f"data.file_patterns.{lang} matches both JSONL ("
                    f"{'/'.join(readers.JSONL_SUFFIXES)}) and plain-text files; give each "
                    "language files of one kind")
  return kinds.pop()


def register(data_cfg, vocab, prefix: str = "xlingo.files") -> Registered:
  pats = dict(data_cfg.get("file_patterns", {}))
  if not pats:
    raise DataError(
        "data.source='files' but data.file_patterns is empty; set e.g. "
        "--config.data.file_patterns='{\"de\": \"/path/de/*.txt\"}'")
  val_pats = dict(data_cfg.get("file_val_patterns", {}) or {})
  test_pats = dict(data_cfg.get("file_test_patterns", {}) or {})
  orphans = sorted(set(test_pats) - set(pats))
  if orphans:
    raise DataError(f"data.file_test_patterns.{orphans[0]}: no data.file_patterns.{orphans[0]} "
                    f"(given: {sorted(pats)}); add the language's train files or remove its "
                    "test glob")
  field = data_cfg.get("jsonl_field", "text")
  split_files = {lang: _split_files(lang, pat, val_pats, "data.file_patterns", test_pats)
                 for lang, pat in sorted(pats.items())}
  pair_files = pairs.configured_files(data_cfg)
  key = lambda pair, split: f"data.{pairs.FILE_PAIR_KEYS[split]}.{pair}"
  _check_no_overlap(
      {**{f"data.file_patterns.{lang}": f["train"] for lang, f in split_files.items()},
       **{key(pair, "train"): f["train"] for pair, f in pair_files.items()}},
      {"validation": {**{f"data.file_val_patterns.{lang}": f["validation"]
                         for lang, f in split_files.items() if "validation" in f},
                      **{key(pair, "validation"): f["validation"]
                         for pair, f in pair_files.items() if "validation" in f}},
       "test": {**{f"data.file_test_patterns.{lang}": f["test"]
                   for lang, f in split_files.items() if "test" in f},
                **{key(pair, "test"): f["test"] for pair, f in pair_files.items()
                   if "test" in f}}})
  lm = {}
  for lang, files in split_files.items():
    fmt = _format(lang, [p for ps in files.values() for p in ps], field)
    name = tasks.lm_task_name(prefix, lang)
    tasks.register_lm_task(name, lang, files, vocab,
                           jsonl_field=field if fmt != readers.FORMAT_TEXT else None)
    lm[lang] = name
  mt = {}
  for pair, files in pair_files.items():
    src, tgt = pair.split("-")
    name = tasks.mt_task_name(prefix, src, tgt)
    tasks.register_translation_task(name, src, tgt, files, vocab)
    mt[pair] = name
  return Registered(lm=lm, mt=mt)
