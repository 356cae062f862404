"""The embedded corpus (xlingo/data/corpus): one LM task per language, one task per en-X pair."""

import json

from data_tasks.registered import Registered
from xlingo import paths
from xlingo.data import tasks
from xlingo.data import vocab as xvocab

SPLITS = ("train", "validation", "test")


def _manifest() -> dict:
  return json.loads(paths.read_text(paths.join(xvocab.corpus_dir(), "manifest.json")))["files"]


def _files(sub: str, stem: str, split: str, ext: str) -> list[str]:
  return paths.glob(paths.join(xvocab.corpus_dir(), sub, f"{stem}.{split}*.{ext}"))


def _stems(sub: str, ext: str) -> list[str]:
  return sorted({paths.basename(p).split(".")[0]
                 for p in paths.glob(paths.join(xvocab.corpus_dir(), sub, f"*.train*.{ext}"))})


def available_languages() -> list[str]:
  return _stems("mono", "txt")


def available_pairs() -> list[str]:
  return _stems("parallel", "tsv")


def _counts(manifest: dict, sub: str, stem: str) -> dict:
  out = {}
  for split in SPLITS:
    out[split] = sum(v["examples"] for k, v in manifest.items()
                     if k.startswith(f"{sub}/{stem}.{split}"))
  return out


def register(data_cfg, vocab, prefix: str = "xlingo") -> Registered:
  manifest = _manifest()
  langs = available_languages()
  lm = {}
  for lang in langs:
    name = tasks.lm_task_name(prefix, lang)
    tasks.register_lm_task(
        name, lang, {s: _files("mono", lang, s, "txt") for s in SPLITS}, vocab,
        num_examples=_counts(manifest, "mono", lang))
    lm[lang] = name
  mt = {}
  for pair in available_pairs():
    src, tgt = pair.split("-")
    name = tasks.mt_task_name(prefix, src, tgt)
    tasks.register_translation_task(
        name, src, tgt, {s: _files("parallel", pair, s, "tsv") for s in SPLITS}, vocab,
        num_examples=_counts(manifest, "parallel", pair))
    mt[pair] = name
  return Registered(lm=lm, mt=mt)


DEFAULT = register(None, xvocab.load_vocab(xvocab.embedded_vocab_path()))
