"""A user's own corpus: plain-text (one example per line) or JSONL files, by glob per language.

In the config:
  c.data.source = "files"
  c.data.file_patterns = {"de": "/data/de/train-*.txt", "sw": "/data/sw/*.jsonl"}
  c.data.file_val_patterns = {"de": "/data/de/valid.txt"}   # optional, per language
  c.data.jsonl_field = "text"
Parallel data: c.data.file_pair_patterns = {"en-sw": "/data/en-sw/train.tsv"} (source<TAB>target).
"""

from data_tasks.registered import Registered
from xlingo.data import tasks
from xlingo.errors import DataError


def _split_files(lang, train_pat, val_pats, what):
  files = {"train": tasks.expand_pattern(train_pat, f"{what}.{lang}")}
  if lang in val_pats:
    files["validation"] = tasks.expand_pattern(val_pats[lang], f"{what.replace('patterns', 'val_patterns')}.{lang}")
  for paths in files.values():
    tasks.check_utf8(paths, f"{what}.{lang}")
  return files


def register(data_cfg, vocab, prefix: str = "xlingo.files") -> Registered:
  pats = dict(data_cfg.get("file_patterns", {}))
  if not pats:
    raise DataError(
        "data.source='files' but data.file_patterns is empty; set e.g. "
        "--config.data.file_patterns='{\"de\": \"/path/de/*.txt\"}'")
  val_pats = dict(data_cfg.get("file_val_patterns", {}) or {})
  field = data_cfg.get("jsonl_field", "text")
  lm = {}
  for lang, pat in sorted(pats.items()):
    files = _split_files(lang, pat, val_pats, "data.file_patterns")
    jsonl = all(p.endswith((".jsonl", ".json")) for p in files["train"])
    name = tasks.lm_task_name(prefix, lang)
    tasks.register_lm_task(name, lang, files, vocab, jsonl_field=field if jsonl else None)
    lm[lang] = name
  mt = {}
  for pair, pat in sorted(dict(data_cfg.get("file_pair_patterns", {}) or {}).items()):
    src, tgt = pair.split("-")
    paths = tasks.expand_pattern(pat, f"data.file_pair_patterns.{pair}")
    tasks.check_utf8(paths, f"data.file_pair_patterns.{pair}")
    name = tasks.mt_task_name(prefix, src, tgt)
    tasks.register_translation_task(name, src, tgt, {"train": paths}, vocab)
    mt[pair] = name
  return Registered(lm=lm, mt=mt)
