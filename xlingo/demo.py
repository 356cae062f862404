"""The CPU demo: train configs/small.py on the embedded corpus, then show what it learned.

  ./launch/local.sh demo [--workdir DIR] [--steps N]

Runs the real LM loop (the same as ``python -m xlingo.train``), resuming when run again, then
prints per-language validation bits per byte before and after training and generates a few
samples in several languages, the language chosen through the language embedding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SAMPLE_PROMPTS = {
    "en": "The package manager",
    "de": "Das Paket",
    "fr": "Le système",
    "es": "El sistema",
    "ja": "パッケージ",
    "ru": "Жизнь",
    "zh": "系统",
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="workdirs/demo", help="run directory (resumed if present)")
  p.add_argument("--steps", type=int, default=None, help="override train.steps")
  p.add_argument("--config", default=os.path.join(_root(), "configs", "small.py"))
  args, extra = p.parse_known_args(argv)

  from xlingo import cli

  argv_train = ["xlingo.demo", "--config", args.config, "--workdir", args.workdir, *extra]
  if args.steps:
    argv_train.append(f"--config.train.steps={args.steps}")
  t0 = time.time()
  state = {}

  def body(config, workdir):
    from xlingo.training import loop, step

    state["config"] = config
    state["last"] = loop.run(config, workdir, step.LM)

  cli.run_main(argv_train, __doc__, body)
  config = state["config"]
  if config.train.steps and not _finished(args.workdir, config.train.steps):
    return 0  # preempted: the loop already said how to resume
  print(f"\ntraining took {time.time() - t0:.0f} s (wall, including start-up and evaluation)")
  _before_after(args.workdir, config)
  _samples(args.workdir, config)
  print(f"\nworkdir: {args.workdir} (metrics.jsonl, tensorboard/, languages.png, checkpoints/)")
  return 0


def _root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finished(workdir: str, steps: int) -> bool:
  from xlingo.training import layout, metrics

  rows = metrics.read_jsonl(os.path.join(workdir, layout.METRICS))
  return any(r["step"] == steps and "val/bpb" in r for r in rows)


def _before_after(workdir: str, config) -> None:
  from xlingo.training import layout, metrics

  rows = [r for r in metrics.read_jsonl(os.path.join(workdir, layout.METRICS)) if "val/bpb" in r]
  first, last = rows[0], rows[-1]
  print(f"\nvalidation bits per byte, step {first['step']} -> step {last['step']}:")
  print(f"  {'lang':<6}{'before':>9}{'after':>9}{'change':>9}")
  for lang in list(config.data.languages) + [None]:
    key = f"val/bpb/{lang}" if lang else "val/bpb"
    if key in first and key in last:
      a, b = first[key], last[key]
      print(f"  {lang or 'all':<6}{a:>9.3f}{b:>9.3f}{b - a:>+9.3f}")


def _samples(workdir: str, config) -> None:
  from xlingo import decode
  from xlingo.training.load import load_model

  lm = load_model(config, workdir)
  langs = [lang for lang in SAMPLE_PROMPTS if lang in lm.table.codes]
  prompts = [SAMPLE_PROMPTS[lang] for lang in langs]
  ids = [lm.table.id(lang) for lang in langs]
  vocab = lm.vocab
  prompt_ids = [list(vocab.encode(p)) for p in prompts]
  outs = decode.generate_ids(lm.model, lm.params, prompt_ids, ids, max_len=32,
                             temperature=0.7, top_k=40, seed=0, eos_id=vocab.eos_id,
                             start_id=vocab.start_id,
                             utf8=decode.utf8_table(vocab, lm.model.config.vocab_size))
  print("\nsamples (temperature 0.7, top-k 40), language chosen by the language embedding:")
  for lang, p_ids, out in zip(langs, prompt_ids, outs, strict=True):
    # Decoded with the prompt, so the first piece keeps its word boundary.
    text = vocab.decode(p_ids + list(out)).replace("\n", " ")
    print(f"  [{lang}] {text}")


if __name__ == "__main__":
  sys.exit(main())
