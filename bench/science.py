"""The experiments of docs/SCIENCE.md (issue 17): each objective's effect on the embedded corpus.

One command per experiment; it trains what is missing (every variant for every seed, as
subprocesses of the ordinary CLIs), then prints the experiment's tables, mean and standard
deviation over the seeds, and writes them to ROOT/EXPERIMENT.md:

  python bench/science.py temperature      # (a) T = 1, 3.33, 100, UniMax
  python bench/science.py lang_emb         # (b) language embeddings on / off / dropout
  python bench/science.py lid              # (c) language-ID loss, lambda = 0, 0.1, 1
  python bench/science.py contrastive      # (d) contrastive beta = 0 vs 0.1, zero-shot transfer
  python bench/science.py adaptation       # (e) full, LoRA, adapter, prefix, lang_emb
  python bench/science.py distill          # (f) KD vs LM-only student
  python bench/science.py vocab            # (g) Greek with and without an extended vocabulary
  python bench/science.py vocab_long       # (g) and the shipped one at the extended's bytes
  python bench/science.py transfer         # (h) chapter task from en: alignment, lang. embeddings
  python bench/science.py heads            # (h) classifier vs verbalizer, full vs LoRA, all langs
  python bench/science.py all

Options: --seeds 0,1 (default), --root DIR (default workdirs/science), --dry_run (print the
commands only). A run that finished is not run again (ROOT/NAME/sSEED/science_done.json); one
that was interrupted resumes from its checkpoint. Runs that several experiments share (the base
pretraining, which is T = 3.33 and language embeddings on) are trained once. Compiled programs
are shared across seeds through JAX's persistent cache in ROOT/.jax_cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Callable

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT_DIR)

from xlingo import config as xconfig  # noqa: E402

LANGS = xconfig.EMBEDDED_LANGUAGES
CORPUS = os.path.join(ROOT_DIR, "xlingo", "data", "corpus")
EXP = "configs/experiments"


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  module: str  # xlingo.train / xlingo.adapt / xlingo.distill / xlingo.finetune
  config: str
  extra: Callable[[int, str], list[str]] = lambda seed, root: []
  needs: tuple[str, ...] = ()


def _init_from(name):
  return lambda seed, root: [f"--config.checkpoint.init_from={_wd(root, name, seed)}"]


def _adapt_mode(run):
  mode, lr = ADAPT_MODES[run]
  extra = ["--config.adapt.adapter.per_language=True"] if run.startswith("adapter_lang") else []
  return lambda seed, root: [f"--config.checkpoint.init_from={_wd(root, 'pre6m', seed)}",
                             f"--config.adapt.mode={mode}", f"--config.train.learning_rate={lr}",
                             *extra]


def _wd(root, name, seed):
  return os.path.join(root, name, f"s{seed}")


def _el_ext(seed, root):
  return [f"--config.checkpoint.init_from={_wd(root, 'pre6m', seed)}",
          f"--config.data.vocab_path={_el_vocab(root)}.model"]


# (g)'s equal-step arms: this many steps, validated at the start and the end only (adapt_el.py's
# own 200 steps validated every 50 took 8.4 min for the six runs on a quiet machine; cut to fit
# a shared one on 2026-12-07, docs/SCIENCE.md (g)). 0: adapt_el.py's steps and eval_every.
VOCAB_STEPS = 100


def _vocab_steps(extra):
  if not VOCAB_STEPS:
    return extra
  return lambda seed, root: [*extra(seed, root), f"--config.train.steps={VOCAB_STEPS}",
                             f"--config.train.eval_every={VOCAB_STEPS}"]


def equal_bytes_steps(arm_row: dict, ref_row: dict, lang: str = "el") -> int:
  """The steps in which a run logging ``arm_row`` (its last training row: ``step`` and
  cumulative ``bytes/<lang>``) reads the ``bytes/<lang>`` of ``ref_row``, at its mean rate."""
  per_step = arm_row[f"bytes/{lang}"] / arm_row["step"]
  return max(1, round(ref_row[f"bytes/{lang}"] / per_step))


def _equal_bytes(arm, ref, extra):
  """``extra`` plus train.steps set so that the run reads the Greek bytes ``ref`` read (from
  the finished ``arm`` and ``ref`` runs of the same seed); validation only at its start and
  end."""

  def fn(seed, root):
    done = [os.path.join(_wd(root, n, seed), "science_done.json") for n in (arm, ref)]
    if not all(os.path.exists(d) for d in done):  # --dry_run before they ran
      steps = f"<steps in which {arm} reads {ref}'s bytes/el>"
    else:
      steps = equal_bytes_steps(last_train(_wd(root, arm, seed)),
                                last_train(_wd(root, ref, seed)))
    return [*extra(seed, root), f"--config.train.steps={steps}",
            f"--config.train.eval_every={steps}"]

  return fn


# --- (h) cross-lingual task transfer (issue 24): pretrain, fine-tune on the chapter task ------
# Pretraining at TRANSFER_STEPS (every arm the same; the 300 of configs/experiments/base.py did
# not fit the session's shared CPU), then xlingo.finetune with configs/experiments/transfer.py.
TRANSFER_STEPS = 100
TASK_LANGS = ("en", "de", "fr", "es", "it", "pt", "ja", "zh")
TRANSFER_PRE = {"tr_cl_0": ("contrastive.py:0", "β = 0, lang. emb. on"),
                "tr_cl_0.1": ("contrastive.py:0.1", "β = 0.1, lang. emb. on"),
                "tr_le_off": ("lang_emb.py:off", "β = 0, lang. emb. off")}
# fine-tuning run -> (pretrained run, transfer.py arg: HEAD,MODE,TRAIN, column title)
TRANSFER_FT = {
    "ft_cl_0": ("tr_cl_0", "classifier,full,en", "β = 0"),
    "ft_cl_0.1": ("tr_cl_0.1", "classifier,full,en", "β = 0.1"),
    "ft_le_off": ("tr_le_off", "classifier,full,en", "lang. emb. off"),
    "ft_cl_0.1_verb": ("tr_cl_0.1", "verbalizer,full,en", "verbalizer, full"),
    "ft_cl_0.1_lora": ("tr_cl_0.1", "classifier,lora,en", "classifier, LoRA"),
    "ft_cl_0.1_all": ("tr_cl_0.1", "classifier,full,all", "translate-train (8 langs)"),
}
TRANSFER_EXPERIMENTS = {
    "transfer": ("tr_cl_0.1", "ft_cl_0.1", "tr_cl_0", "ft_cl_0", "tr_le_off", "ft_le_off"),
    # cheapest first: the verbalizer's steps and evaluations cost 12 classifier ones
    "heads": ("tr_cl_0.1", "ft_cl_0.1", "ft_cl_0.1_lora", "ft_cl_0.1_all", "ft_cl_0.1_verb"),
}


def transfer_runs() -> list[Run]:
  steps = lambda seed, root: [f"--config.train.steps={TRANSFER_STEPS}"]
  runs = [Run(n, "xlingo.train", f"{EXP}/{c}", steps) for n, (c, _) in TRANSFER_PRE.items()]
  runs += [Run(n, "xlingo.finetune", f"{EXP}/transfer.py:{arg}", _init_from(pre), (pre,))
           for n, (pre, arg, _) in TRANSFER_FT.items()]
  return runs


def ft_report(wd) -> dict | None:
  """WORKDIR/finetune_report.json; None for a run not (yet) finished (its cells print '-')."""
  path = os.path.join(wd, "finetune_report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _test_acc(wd, langs) -> float | None:
  """The mean test accuracy over ``langs`` of a fine-tuning run."""
  rep = ft_report(wd)
  return None if rep is None else statistics.fmean(rep["test_acc"][x] for x in langs)


def _task_labels(lang, split):
  with open(os.path.join(CORPUS, "tasks", "chapter", f"{lang}.{split}.tsv"),
            encoding="utf-8") as f:
    return [line.split("\t", 1)[0] for line in f if line.strip()]


def majority_rates() -> tuple[dict, str]:
  """({lang: the test share of the English training split's most common chapter}, that
  chapter): what a model that learned only the class prior scores."""
  top = Counter(_task_labels("en", "train")).most_common(1)[0][0]
  return {lang: statistics.fmean(x == top for x in _task_labels(lang, "test"))
          for lang in TASK_LANGS}, top


def _transfer_table(root, seeds, names, titles=None) -> str:
  major, top = majority_rates()
  others = [x for x in TASK_LANGS if x != "en"]
  col = lambda n, fn: ms(over_seeds(root, n, seeds, fn))
  rows = [[lang + (" (trained)" if lang == "en" else ""), f"{major[lang]:.3f}"]
          + [col(n, lambda wd, k=lang: _test_acc(wd, [k])) for n in names] for lang in TASK_LANGS]
  rows.append(["mean of the other 7", f"{statistics.fmean(major[x] for x in others):.3f}"]
              + [col(n, lambda wd: _test_acc(wd, others)) for n in names])
  gap = lambda wd: None if ft_report(wd) is None else _test_acc(wd, others) - _test_acc(wd, ["en"])
  rows.append(["gap (others - en)", ""] + [col(n, gap) for n in names])
  rows.append(["best step", ""] + [", ".join(
      str(ft_report(_wd(root, n, s))["best_step"]) if ft_report(_wd(root, n, s)) else "-"
      for s in seeds) for n in names])
  rows.append(["wall s (fine-tuning)", ""] + [col(n, lambda wd: wall(wd) if ft_report(wd)
                                                  else None) for n in names])
  head = ["language (test)", f"majority ({top})"] + [(titles or {}).get(n, TRANSFER_FT[n][2])
                                                     for n in names]
  return table(head, rows)


def _pretrain_table(root, seeds) -> str:
  names = list(TRANSFER_PRE)
  rows = [["mean val bpb"] + [ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd))))
                              for n in names]]
  rows.append(["mean top-1 retrieval (14 directions)"] + [
      ms(over_seeds(root, n, seeds, lambda wd: _retrieval(final_val(wd))
                    if any(k.startswith("val/retrieval/") for k in final_val(wd)) else None))
      for n in names])
  rows.append(["wall s"] + [ms(over_seeds(root, n, seeds, wall)) for n in names])
  return table(["pretraining", *[TRANSFER_PRE[n][1] for n in names]], rows)


def transfer_tables(root, seeds) -> str:
  return (f"Pretraining ({TRANSFER_STEPS} steps):\n\n{_pretrain_table(root, seeds)}\n\n"
          f"Chapter task, classifier head, full fine-tuning on English only; test accuracy "
          f"(12 classes; chance 1/12 = 0.083):\n\n"
          f"{_transfer_table(root, seeds, ['ft_cl_0', 'ft_cl_0.1', 'ft_le_off'])}")


def heads_tables(root, seeds) -> str:
  return (f"Chapter task from the β = 0.1 model ({TRANSFER_STEPS} pretraining steps); test "
          f"accuracy (12 classes; chance 1/12 = 0.083). Trained on English unless noted:\n\n"
          + _transfer_table(root, seeds, TRANSFER_EXPERIMENTS["heads"][1:],
                            {"ft_cl_0.1": "classifier, full"}))


TRANSFER_TABLES = {"transfer": transfer_tables, "heads": heads_tables}


# run name -> (adapt.mode, learning rate): each parameter-efficient mode at two rates (the
# docs/ADAPTATION.md commands' and a higher one), since the best rate differs by mode.
ADAPT_MODES = {"full": ("full", "1e-3"), "lora": ("lora", "3e-3"), "adapter": ("adapter", "3e-3"),
               "prefix": ("prefix", "3e-3"), "lang_emb": ("lang_emb", "1e-2"),
               "lora_hi": ("lora", "1e-2"), "adapter_hi": ("adapter", "1e-2"),
               "prefix_hi": ("prefix", "3e-2"), "lang_emb_hi": ("lang_emb", "1e-1"),
               # one adapter per language (adapt.adapter.per_language): German's alone trains
               "adapter_lang": ("adapter", "1e-2")}


def _runs() -> dict[str, Run]:
  runs = [
      Run("base", "xlingo.train", f"{EXP}/temperature.py:3.33"),
      Run("t1", "xlingo.train", f"{EXP}/temperature.py:1"),
      Run("t100", "xlingo.train", f"{EXP}/temperature.py:100"),
      Run("unimax", "xlingo.train", f"{EXP}/temperature.py:unimax"),
      Run("le_off", "xlingo.train", f"{EXP}/lang_emb.py:off"),
      Run("le_dropout", "xlingo.train", f"{EXP}/lang_emb.py:dropout"),
      Run("lid_0.1", "xlingo.train", f"{EXP}/lid.py:0.1"),
      Run("lid_1", "xlingo.train", f"{EXP}/lid.py:1"),
      Run("cl_0", "xlingo.train", f"{EXP}/contrastive.py:0"),
      Run("cl_0.1", "xlingo.train", f"{EXP}/contrastive.py:0.1"),
      Run("cl_0_de", "xlingo.adapt", f"{EXP}/contrastive.py:adapt:0", _init_from("cl_0"),
          ("cl_0",)),
      Run("cl_0.1_de", "xlingo.adapt", f"{EXP}/contrastive.py:adapt:0.1", _init_from("cl_0.1"),
          ("cl_0.1",)),
      # (e) and (g) adapt configs/adapt_small.py's 6.3 M-parameter model.
      Run("pre6m", "xlingo.train", "configs/adapt_small.py:pretrain"),
      *[Run(f"adapt_{m}", "xlingo.adapt", "configs/adapt_small.py", _adapt_mode(m), ("pre6m",))
        for m in ADAPT_MODES],
      Run("el_old", "xlingo.adapt", f"{EXP}/adapt_el.py", _vocab_steps(_init_from("pre6m")),
          ("pre6m",)),
      Run("el_ext", "xlingo.adapt", f"{EXP}/adapt_el.py:extended", _vocab_steps(_el_ext),
          ("pre6m",)),
      # (g) at equal Greek text: each vocabulary trained for the steps in which it reads the
      # Greek bytes (bytes/el) the other read in its 200 steps.
      Run("el_ext_eqb", "xlingo.adapt", f"{EXP}/adapt_el.py:extended",
          _equal_bytes("el_ext", "el_old", _el_ext), ("pre6m", "el_old", "el_ext")),
      Run("el_old_eqb", "xlingo.adapt", f"{EXP}/adapt_el.py",
          _equal_bytes("el_old", "el_ext", _init_from("pre6m")), ("pre6m", "el_old", "el_ext")),
      # (f): the base run is the teacher (4 layers, d_model 128); students of 2 x 64.
      Run("student_kd", "xlingo.distill", "configs/distill_small.py",
          lambda seed, root: [f"--config.distill.teacher_workdir={_wd(root, 'base', seed)}"],
          ("base",)),
      Run("student_lm", "xlingo.train", "configs/distill_small.py:student"),
  ]
  return {r.name: r for r in [*runs, *transfer_runs()]}


RUNS = _runs()
EXPERIMENTS = {
    "temperature": ("t1", "base", "unimax", "t100"),
    "lang_emb": ("base", "le_off", "le_dropout"),
    # lambda = 0 is the dropout run of (b): the same model and data without the (then untrained)
    # head, so its bpb is lambda = 0's and its LID accuracy is chance by construction.
    "lid": ("le_dropout", "lid_0.1", "lid_1"),
    "contrastive": ("cl_0", "cl_0.1", "cl_0_de", "cl_0.1_de"),
    "adaptation": ("pre6m", *[f"adapt_{m}" for m in ADAPT_MODES]),
    "distill": ("base", "student_kd", "student_lm"),
    "vocab": ("pre6m", "el_old", "el_ext", "el_ext_eqb"),
    # (g) plus the shipped vocabulary trained on the extended one's Greek bytes (~1,100 steps)
    "vocab_long": ("pre6m", "el_old", "el_ext", "el_ext_eqb", "el_old_eqb"),
    **TRANSFER_EXPERIMENTS,
}


def _el_vocab(root):
  return os.path.join(root, "el_vocab")


# --- running --------------------------------------------------------------------------------


def _env(root):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT_DIR, env.get("PYTHONPATH", "")])
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, ".jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def _command(run: Run, seed: int, root: str) -> list[str]:
  return [sys.executable, "-m", run.module, "--config", run.config,
          f"--workdir={_wd(root, run.name, seed)}", f"--config.train.seed={seed}",
          f"--config.data.seed={seed}", *run.extra(seed, root)]


def _prepare(names, root, dry_run):
  if any(n == "el_ext" for n in names) and not os.path.exists(_el_vocab(root) + ".model"):
    cmd = [sys.executable, "-m", "xlingo.data.vocab", "extend", "--vocab",
           os.path.join(CORPUS, "vocab", "xlingo_8k.model"), "--input",
           f"el={os.path.join(CORPUS, 'new', 'el.train.txt')}", "--new_pieces", "1024",
           "--output", _el_vocab(root)]
    print(" ".join(cmd), flush=True)
    if not dry_run:
      subprocess.run(cmd, check=True, env=_env(root), cwd=ROOT_DIR)


_PRINTED: set = set()


def ensure(name: str, seed: int, root: str, dry_run: bool) -> None:
  run = RUNS[name]
  for dep in run.needs:
    ensure(dep, seed, root, dry_run)
  wd = _wd(root, name, seed)
  done = os.path.join(wd, "science_done.json")
  if os.path.exists(done) or (dry_run and wd in _PRINTED):
    return
  _PRINTED.add(wd)
  cmd = _command(run, seed, root)
  print(f"[{time.strftime('%H:%M:%S')}] " + " ".join(cmd[1:]), flush=True)
  if dry_run:
    return
  os.makedirs(wd, exist_ok=True)
  start = time.time()
  with open(os.path.join(wd, "science_log.txt"), "a") as log:
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(root),
                        cwd=ROOT_DIR).returncode
  if rc != 0:
    sys.exit(f"science: {name} seed {seed} failed with exit {rc}; see "
             f"{os.path.join(wd, 'science_log.txt')}, fix it and run the same command again")
  wall = time.time() - start
  with open(done, "w") as f:
    json.dump({"command": cmd[1:], "wall_s": wall}, f)
  print(f"  done in {wall:.0f} s", flush=True)


# --- reading results ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # the tables read each finished run's files many times
def _rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_val(wd) -> dict:
  return [r for r in _rows(wd) if any(k.startswith("val/bpb/") for k in r)][-1]


def last_train(wd) -> dict:
  return [r for r in _rows(wd) if "loss" in r][-1]


def step_time(wd) -> float:
  times = [r["step_time_s"] for r in _rows(wd) if "step_time_s" in r]
  return statistics.median(times[1:] or times)  # the first interval holds the compile


def wall(wd) -> float:
  with open(os.path.join(wd, "science_done.json")) as f:
    return json.load(f)["wall_s"]


@functools.lru_cache(maxsize=None)
def report(wd) -> dict:
  with open(os.path.join(wd, "adapt_report.json")) as f:
    return json.load(f)


def ms(values) -> str:
  """'mean ± sd' (sample standard deviation over the seeds); one value alone, without a ±."""
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return "-"
  m = statistics.fmean(values)
  digits = 3 if abs(m) < 100 else 1
  if len(values) == 1:
    return f"{m:.{digits}f}"
  return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def over_seeds(root, name, seeds, fn):
  return [fn(_wd(root, name, s)) for s in seeds]


def mean_bpb(row, langs=LANGS, prefix="val/bpb/"):
  """The mean over ``langs``; None where the row lacks one (e.g. no no-hint validation)."""
  keys = [f"{prefix}{lang}" for lang in langs]
  if not all(k in row for k in keys):
    return None
  return statistics.fmean(row[k] for k in keys)


def table(header, rows) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


def _train_bytes(lang):
  return os.path.getsize(os.path.join(CORPUS, "mono", f"{lang}.train.txt"))


# --- language of generated text -------------------------------------------------------------


class CharTrigramLID:
  """A naive Bayes classifier over character trigrams, trained on the embedded training text:
  an independent judge of which language ``generate`` wrote (it never sees the model)."""

  def __init__(self, langs=LANGS, lines_per_lang=3000):
    self.langs = langs
    self.logp, self.floor = {}, {}
    for lang in langs:
      counts = Counter()
      with open(os.path.join(CORPUS, "mono", f"{lang}.train.txt"), encoding="utf-8") as f:
        for i, line in enumerate(f):
          if i >= lines_per_lang:
            break
          counts.update(self._grams(line.strip()))
      total = sum(counts.values()) + len(counts) + 1
      self.logp[lang] = {g: math.log((c + 1) / total) for g, c in counts.items()}
      self.floor[lang] = math.log(1 / total)

  @staticmethod
  def _grams(text):
    t = f"  {text.lower()} "
    return [t[i:i + 3] for i in range(len(t) - 2)]

  def predict(self, text: str) -> str | None:
    grams = self._grams(text.strip())
    if not text.strip():
      return None
    return max(self.langs, key=lambda lang: sum(self.logp[lang].get(g, self.floor[lang])
                                                for g in grams))

  def accuracy_on_validation(self, lines_per_lang=200) -> float:
    hits = n = 0
    for lang in self.langs:
      with open(os.path.join(CORPUS, "mono", f"{lang}.validation.txt"), encoding="utf-8") as f:
        lines = [x for x in (line.strip() for line in f) if len(x) >= 20][:lines_per_lang]
      hits += sum(self.predict(x) == lang for x in lines)
      n += len(lines)
    return hits / n


def generation_follows_lang(wd: str, config_arg: str, lid: CharTrigramLID, samples=8,
                            seed=0) -> float:
  """Share of samples generated from BOS with ``--lang L`` (every L) that the character
  classifier assigns to L: how well the model's output follows the requested language."""
  from configs.experiments import lang_emb
  from xlingo import decode
  from xlingo.training import load

  config = lang_emb.get_config(config_arg)
  lm = load.load_model(config, wd)
  rows = [(i, lang) for i, lang in enumerate(lm.table.codes) for _ in range(samples)]
  texts = decode.generate(lm.model, lm.params, lm.vocab, [""] * len(rows),
                            [i for i, _ in rows], max_len=32, temperature=0.8, top_k=40,
                            seed=seed)
  return statistics.fmean(lid.predict(t) == lang for (_, lang), t in zip(rows, texts))


# --- the experiments' tables ----------------------------------------------------------------


def temperature_tables(root, seeds) -> str:
  names = _finished({"t1": "T = 1", "base": "T = 3.33", "t100": "T = 100", "unimax": "UniMax"},
                    root, seeds)
  order = sorted(LANGS, key=_train_bytes, reverse=True)
  rows = []
  for lang in order:
    rows.append([lang, f"{_train_bytes(lang) / 1e3:.0f}"] + [
        ms(over_seeds(root, n, seeds, lambda wd, k=lang: final_val(wd)[f"val/bpb/{k}"]))
        for n in names])
  rows.append(["mean", ""] + [ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd))))
                              for n in names])
  head = ["language", "train kB"] + list(names.values())
  shares = []
  for lang in order:
    shares.append([lang] + [
        f"{ms(over_seeds(root, n, seeds, lambda wd, k=lang: _share(wd, k)))} "
        f"({planned_share(_wd(root, n, seeds[0]), lang):.3f})" for n in names])
  shares.append(["largest deviation from the plan"] + [ms(over_seeds(
      root, n, seeds, lambda wd: max(abs(_share(wd, k) / planned_share(wd, k) - 1)
                                     for k in LANGS))) for n in names])
  steps = final_val(_wd(root, "base", seeds[0]))["step"]
  return (f"Validation bits per byte at step {steps}, by language (largest training text "
          f"first):\n\n{table(head, rows)}\n\nShare of the training tokens each language got "
          f"(tokens/<lang> at the last log step; in brackets the plan, tok.share of the "
          f"start-of-run table; the last row is max over languages of |realised / plan - 1|):"
          f"\n\n{table(['language'] + list(names.values()), shares)}")


def planned_share(wd, lang) -> float:
  """The token share the start-of-run table (in WORKDIR/science_log.txt) planned for ``lang``."""
  with open(os.path.join(wd, "science_log.txt"), encoding="utf-8") as f:
    for line in f:
      cols = line.split()
      if len(cols) >= 6 and cols[0].endswith(f".{lang}") and cols[1] == lang:
        return float(cols[5])
  raise ValueError(f"{wd}/science_log.txt has no start-of-run row for {lang}")


def _finished(names: dict, root, seeds) -> dict:
  """The runs of ``names`` finished for every seed (a table of what has run so far)."""
  return {n: h for n, h in names.items()
          if all(os.path.exists(os.path.join(_wd(root, n, s), "science_done.json"))
                 for s in seeds)}


def _share(wd, lang):
  row = last_train(wd)
  total = sum(row[f"tokens/{k}"] for k in LANGS)
  return row[f"tokens/{lang}"] / total


def lang_emb_tables(root, seeds) -> str:
  names = {"base": "on", "le_off": "off", "le_dropout": "dropout 0.3"}
  args = {"base": "on", "le_off": "off", "le_dropout": "dropout"}
  lid = CharTrigramLID()
  follow = {n: over_seeds(root, n, seeds, lambda wd, a=args[n]: generation_follows_lang(
      wd, a, lid)) for n in names}
  rows = [[lang] + [ms(over_seeds(root, n, seeds, lambda wd, k=lang: final_val(wd)[f"val/bpb/{k}"]))
                    for n in names] for lang in LANGS]
  rows.append(["mean"] + [ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd))))
                          for n in names])
  rows.append(["mean, no hint"] + [
      ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd), prefix="val/bpb_nohint/")))
      for n in names])
  rows.append(["generate follows --lang"] + [ms(follow[n]) for n in names])
  return (f"Validation bits per byte (with the language hint unless noted), and the share of "
          f"samples generated from BOS with `--lang L` that a character-trigram classifier "
          f"(trained on the embedded training text, {lid.accuracy_on_validation():.3f} accurate "
          f"on validation lines of 20+ characters) assigns to L (8 samples per language, "
          f"temperature 0.8, top-k 40, 32 tokens; chance is 1/9):\n\n"
          f"{table(['language'] + list(names.values()), rows)}")


def lid_tables(root, seeds) -> str:
  names = {"le_dropout": "λ = 0 (no head)", "lid_0.1": "λ = 0.1", "lid_1": "λ = 1"}

  def acc(key):
    return ["chance (1/9)"] + [ms(over_seeds(root, n, seeds, lambda wd: final_val(wd).get(key)))
                               for n in list(names)[1:]]

  rows = [["LID accuracy, no hint (val/lid_acc)"] + acc("val/lid_acc")]
  rows += [[f"LID accuracy, {lang}"] + acc(f"val/lid_acc/{lang}") for lang in LANGS]
  rows.append(["mean bpb, with hint"] + [
      ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd)))) for n in names])
  rows.append(["mean bpb, no hint"] + [
      ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd), prefix="val/bpb_nohint/")))
      for n in names])
  return table(["", *names.values()], rows)


def _retrieval(row):
  vals = [v for k, v in row.items() if k.startswith("val/retrieval/")]
  return statistics.fmean(vals)


def contrastive_tables(root, seeds) -> str:
  names = {"cl_0": "β = 0", "cl_0.1": "β = 0.1"}
  pre = [["mean top-1 retrieval (14 directions)"] + [
      ms(over_seeds(root, n, seeds, lambda wd: _retrieval(final_val(wd)))) for n in names]]
  pairs = sorted(k[len("val/retrieval/"):] for k in final_val(_wd(root, "cl_0", seeds[0]))
                 if k.startswith("val/retrieval/"))
  pre += [[f"retrieval {p}"] + [ms(over_seeds(
      root, n, seeds, lambda wd, p=p: final_val(wd)[f"val/retrieval/{p}"])) for n in names]
      for p in pairs]
  pre.append(["mean bpb"] + [ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd))))
                             for n in names])
  ada = {"cl_0_de": "β = 0", "cl_0.1_de": "β = 0.1"}
  zrows = [["de (adapted)"] + [ms(over_seeds(
      root, n, seeds, lambda wd: report(wd)["bpb"]["languages"]["de"]["change"])) for n in ada]]
  others = [lang for lang in LANGS if lang != "de"]
  zrows += [[lang] + [ms(over_seeds(
      root, n, seeds, lambda wd, k=lang: report(wd)["bpb"]["languages"][k]["change"]))
      for n in ada] for lang in others]
  zrows.append(["mean of the others"] + [ms(over_seeds(root, n, seeds, lambda wd: statistics.fmean(
      report(wd)["bpb"]["languages"][k]["change"] for k in others))) for n in ada])
  zrows.append(["mean retrieval after"] + [
      ms(over_seeds(root, n, seeds, lambda wd: _retrieval(final_val(wd)))) for n in ada])
  return (f"Pretraining:\n\n{table(['', *names.values()], pre)}\n\nZero-shot transfer: each "
          f"pretrained model adapted to German alone (LM on de, the alignment term kept at its "
          f"β), change in validation bits per byte per language (negative is better):\n\n"
          f"{table(['language', *ada.values()], zrows)}")


def adaptation_tables(root, seeds) -> str:
  rows = []
  others = [lang for lang in LANGS if lang != "de"]
  for m in ADAPT_MODES:
    n = f"adapt_{m}"
    rep = report(_wd(root, n, seeds[0]))
    rows.append([
        m.replace("_hi", "").replace("adapter_lang", "adapter, per language"), ADAPT_MODES[m][1],
        f"{rep['trained_params']:,}",
        ms(over_seeds(root, n, seeds, lambda wd: report(wd)["bpb"]["languages"]["de"]["after"])),
        ms(over_seeds(root, n, seeds, lambda wd: report(wd)["bpb"]["languages"]["de"]["change"])),
        ms(over_seeds(root, n, seeds, lambda wd: statistics.fmean(
            report(wd)["bpb"]["languages"][k]["change"] for k in others))),
        ms(over_seeds(root, n, seeds, lambda wd: 1e3 * step_time(wd))),
    ])
  rep = report(_wd(root, "adapt_full", seeds[0]))
  return (f"Adapting the 6.3 M-parameter base ({rep['params']:,} parameters) to German, "
          f"{rep['bpb']['after_step']} steps:\n\n" + table(
              ["mode", "learning rate", "trained parameters", "de bpb after", "de change",
               "others' mean change (forgetting)", "step time ms"], rows))


def distill_tables(root, seeds) -> str:
  names = {"base": "teacher (2.1 M)", "student_kd": "student, KD", "student_lm": "student, LM only"}
  rows = [[lang] + [ms(over_seeds(root, n, seeds, lambda wd, k=lang: final_val(wd)[f"val/bpb/{k}"]))
                    for n in names] for lang in LANGS]
  rows.append(["mean"] + [ms(over_seeds(root, n, seeds, lambda wd: mean_bpb(final_val(wd))))
                          for n in names])
  rows.append(["wall s"] + [ms(over_seeds(root, n, seeds, wall)) for n in names])
  return table(["language", *names.values()], rows)


def vocab_tables(root, seeds) -> str:
  names = {"el_old": "shipped 8,192", "el_ext": "extended 9,216",
           "el_ext_eqb": "extended, at shipped's Greek bytes",
           "el_old_eqb": "shipped, at extended's Greek bytes"}
  names = _finished(names, root, seeds)
  others = LANGS

  def change(wd, langs):
    return statistics.fmean(report(wd)["bpb"]["languages"][k]["change"] for k in langs)

  def cell(fn, digits=None):
    return [ms(over_seeds(root, n, seeds, fn)) if digits is None else
            " / ".join(f"{v:,.{digits}f}" for v in over_seeds(root, n, seeds, fn))
            for n in names]

  vocab = {"el_old": os.path.join(CORPUS, "vocab", "xlingo_8k.model"),
           "el_ext": _el_vocab(root) + ".model"}
  rows = [["el tokens per UTF-8 byte (validation)"] + [
      f"{tokens_per_byte(vocab[n.replace('_eqb', '')]):.3f}" for n in names]]
  rows.append(["steps (seed " + " / ".join(map(str, seeds)) + ")"] + cell(
      lambda wd: last_train(wd)["step"], 0))
  rows.append(["Greek training text read, kB (bytes/el)"] + cell(
      lambda wd: last_train(wd)["bytes/el"] / 1e3))
  rows.append(["validation bytes scored, el / the nine others"] + [
      " / ".join(f"{v:,.0f}" for v in (final_val(_wd(root, n, seeds[0]))["val/bytes/el"], sum(
          final_val(_wd(root, n, seeds[0]))[f"val/bytes/{k}"] for k in others))) for n in names])
  rows.append(["el bpb before"] + cell(
      lambda wd: report(wd)["bpb"]["languages"]["el"]["before"]))
  rows.append(["el bpb after"] + cell(lambda wd: report(wd)["bpb"]["languages"]["el"]["after"]))
  rows.append(["forgetting: the others' mean bpb change"] + cell(lambda wd: change(wd, others)))
  rows.append(["step time ms"] + cell(lambda wd: 1e3 * step_time(wd)))
  rows.append(["wall s"] + cell(wall))
  return table(["", *names.values()], rows)


def tokens_per_byte(model_path, lang="el") -> float:
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
  with open(os.path.join(CORPUS, "new", f"{lang}.validation.txt"), encoding="utf-8") as f:
    lines = [x.strip() for x in f if x.strip()]
  return sum(len(ids) for ids in sp.encode(lines)) / sum(len(x.encode()) for x in lines)


TABLES = {"temperature": temperature_tables, "lang_emb": lang_emb_tables, "lid": lid_tables,
          "contrastive": contrastive_tables, "adaptation": adaptation_tables,
          "distill": distill_tables, "vocab": vocab_tables, "vocab_long": vocab_tables,
          **TRANSFER_TABLES}


def cost(root, names, seeds) -> str:
  total = sum(wall(_wd(root, n, s)) for n in names for s in seeds)
  return f"cost: {len(names) * len(seeds)} runs, {total / 60:.1f} min of wall time in all"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--root", default=os.path.join(ROOT_DIR, "workdirs", "science"))
  ap.add_argument("--dry_run", action="store_true")
  a = ap.parse_args(argv)
  try:
    seeds = [int(s) for s in a.seeds.split(",")]
  except ValueError:
    ap.error(f"--seeds={a.seeds}: give integers separated by commas, e.g. 0,1")
  root = os.path.abspath(a.root)
  wanted = list(EXPERIMENTS) if a.experiment == "all" else [a.experiment]
  for exp in wanted:
    names = EXPERIMENTS[exp]
    _prepare(names, root, a.dry_run)
    for n in names:  # each run for every seed before the next (the costliest come last)
      for seed in seeds:
        ensure(n, seed, root, a.dry_run)
    if a.dry_run:
      continue
    text = f"## {exp}\n\n{TABLES[exp](root, seeds)}\n\nseeds {a.seeds}; {cost(root, names, seeds)}\n"
    print(text, flush=True)
    with open(os.path.join(root, f"{exp}.md"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
