"""A user's own corpus: plain-text (one example per line) or JSONL files, by glob per language.

In the config:
  c.data.source = "files"
  c.data.file_patterns = {"de": "/data/de/train-*.txt", "sw": "/data/sw/train-*.jsonl"}
  c.data.file_val_patterns = {"de": "/data/de/valid.txt"}   # optional, per language
A file both trained and validated on is refused; a language without validation files is
named in the start-of-run table (it gets no val/bpb).
  c.data.jsonl_field = "text"
Parallel data: c.data.file_pair_patterns = {"en-sw": "/data/en-sw/train.tsv"} (source<TAB>target).
"""

from data_tasks.registered import Registered
from xlingo import paths as xpaths
from xlingo.data import readers, tasks
from xlingo.errors import DataError


def _split_files(lang, train_pat, val_pats, what):
  files = {"train": tasks.expand_pattern(train_pat, f"{what}.{lang}")}
  if lang in val_pats:
    files["validation"] = tasks.expand_pattern(
        val_pats[lang], f"{what.replace('patterns', 'val_patterns')}.{lang}")
  for paths in files.values():
    tasks.check_utf8(paths, f"{what}.{lang}")
  return files


def _check_no_overlap(train: dict, validation: dict) -> None:
  """A file that is both trained on and validated on would make validation meaningless
  (e.g. the glob "/data/sw/*.jsonl" also matching "/data/sw/valid.jsonl"): refused."""
  held = {xpaths.resolve(p): key for key, files in validation.items() for p in files}
  for key, files in train.items():
    for p in files:
      if xpaths.resolve(p) in held:
        raise DataError(f"{key} matches {p}, which is also a validation file "
                        f"({held[xpaths.resolve(p)]}); narrow the train glob so that it leaves "
                        "out the validation files (e.g. train-*.jsonl)")


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
  field = data_cfg.get("jsonl_field", "text")
  split_files = {lang: _split_files(lang, pat, val_pats, "data.file_patterns")
                 for lang, pat in sorted(pats.items())}
  pair_files = {}
  for pair, pat in sorted(dict(data_cfg.get("file_pair_patterns", {}) or {}).items()):
    pair_files[pair] = tasks.expand_pattern(pat, f"data.file_pair_patterns.{pair}")
    tasks.check_utf8(pair_files[pair], f"data.file_pair_patterns.{pair}")
  _check_no_overlap(
      {**{f"data.file_patterns.{lang}": f["train"] for lang, f in split_files.items()},
       **{f"data.file_pair_patterns.{pair}": f for pair, f in pair_files.items()}},
      {f"data.file_val_patterns.{lang}": f["validation"] for lang, f in split_files.items()
       if "validation" in f})
  lm = {}
  for lang, files in split_files.items():
    fmt = _format(lang, files["train"] + files.get("validation", []), field)
    name = tasks.lm_task_name(prefix, lang)
    tasks.register_lm_task(name, lang, files, vocab,
                           jsonl_field=field if fmt != readers.FORMAT_TEXT else None)
    lm[lang] = name
  mt = {}
  for pair, files in pair_files.items():
    src, tgt = pair.split("-")
    name = tasks.mt_task_name(prefix, src, tgt)
    tasks.register_translation_task(name, src, tgt, {"train": files}, vocab)
    mt[pair] = name
  return Registered(lm=lm, mt=mt)
