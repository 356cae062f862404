"""Data pipeline throughput: packed tokens/s against the raw SentencePiece encode rate.

  .venv/bin/python bench/bench_data.py [--seconds 20] [--seq_len 256 --batch_size 8]

In one process, alternating ``--rounds`` times (this machine's speed drifts by +-30% over
minutes, so the two figures are taken side by side):
  (a) raw: ``SentencePieceProcessor.EncodeAsIds`` over a list of lines (one batched call) of the
      embedded corpus's train split, the lines drawn with the mixture's rates (what the pipeline
      reads), tokens/s (EOS not counted), best pass of about a second. This is the ceiling: no
      reading, mixing or packing.
  (b) pipeline: ``inputs.plan_inputs(configs/small.py)`` -> ``inputs.train_iterator`` ->
      ``next()`` for ``--seconds / --rounds``, counting non-padding tokens (segment_ids > 0,
      EOS included), after a warm-up. ``--temperature_schedule`` sets
      ``data.temperature_schedule`` (rates that move over the run).
Prints each round, the medians, their ratio (the median of the rounds' ratios) and the packing
efficiency, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import json
import os
import pstats
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [ln.strip() for ln in f if ln.strip()]


def mixed_lines(plan, num: int, seed: int = 0) -> list[str]:
  """``num`` train lines of the plan's LM tasks, languages drawn with the mixture's rates."""
  from xlingo.data import vocab as xvocab

  files = xvocab.embedded_files("train", list(plan.lm_tasks))
  pools = {lang: [ln for p in paths for ln in _lines(p)] for lang, paths in files.items()}
  langs = list(plan.lm_tasks)
  p = np.array([plan.rates[plan.lm_tasks[lang]] for lang in langs], float)
  rng = np.random.default_rng(seed)
  choice = rng.choice(len(langs), size=num, p=p / p.sum())
  out = []
  for i in choice:
    pool = pools[langs[i]]
    out.append(pool[int(rng.integers(len(pool)))])
  return out


def raw_rate(sp, lines: list[str], min_seconds: float = 1.0) -> tuple[float, int]:
  """(tokens/s, tokens per pass) of a batched EncodeAsIds over ``lines``, best of the passes."""
  sp.EncodeAsIds(lines[:256])  # warm-up
  best, ntok, spent = 0.0, 0, 0.0
  while spent < min_seconds:
    t0 = time.perf_counter()
    ids = sp.EncodeAsIds(lines)
    dt = time.perf_counter() - t0
    spent += dt
    ntok = sum(len(x) for x in ids)
    best = max(best, ntok / dt)
  return best, ntok


def pipeline_rate(it, seconds: float, warmup_batches: int) -> dict:
  for _ in range(warmup_batches):
    next(it)
  tokens = slots = batches = 0
  t0 = time.perf_counter()
  while True:
    b = next(it)
    seg = b["segment_ids"]
    tokens += int(np.count_nonzero(seg))
    slots += seg.size
    batches += 1
    dt = time.perf_counter() - t0
    if dt >= seconds:
      break
  return {"tokens_per_s": tokens / dt, "batches_per_s": batches / dt, "batches": batches,
          "tokens": tokens, "packing_efficiency": tokens / slots, "seconds": dt}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seconds", type=float, default=20.0, help="pipeline timing, all rounds")
  ap.add_argument("--seq_len", type=int, default=None, help="default: configs/small.py's")
  ap.add_argument("--batch_size", type=int, default=None, help="default: configs/small.py's")
  ap.add_argument("--packing", default=None, choices=("concat", "first_fit"),
                  help="default: the config's data.packing")
  ap.add_argument("--rounds", type=int, default=5, help="raw/pipeline alternations")
  ap.add_argument("--group_size", type=int, default=None,
                  help="default: the config's data.group_size (0: per-example pipeline)")
  ap.add_argument("--temperature_schedule", default="",
                  help="data.temperature_schedule, e.g. '((0, 1.0), (1, 3.33))'")
  ap.add_argument("--warmup_batches", type=int, default=50)
  ap.add_argument("--raw_lines", type=int, default=20_000)
  ap.add_argument("--profile", type=int, default=0, metavar="N",
                  help="also cProfile N batches and print the top functions")
  args = ap.parse_args(argv)

  from configs import small
  from xlingo.data import inputs

  cfg = small.get_config()
  if args.seq_len:
    cfg.data.seq_len = args.seq_len
    cfg.model.max_len = max(cfg.model.max_len, args.seq_len)
  if args.batch_size:
    cfg.train.batch_size = args.batch_size
  if args.packing:
    cfg.data.packing = args.packing
  if args.group_size is not None:
    cfg.data.group_size = args.group_size
  if args.temperature_schedule:
    cfg.data.temperature_schedule = ast.literal_eval(args.temperature_schedule)
  t0 = time.perf_counter()
  plan = inputs.plan_inputs(cfg)
  plan_s = time.perf_counter() - t0

  lines = mixed_lines(plan, args.raw_lines, seed=cfg.data.seed)
  t0 = time.perf_counter()
  it = inputs.train_iterator(plan, cfg)
  next(it)
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup_batches):
    next(it)
  rounds = []
  for r in range(args.rounds):
    raw, raw_tokens = raw_rate(plan.vocab.tokenizer, lines)
    res = pipeline_rate(it, args.seconds / args.rounds, 0)
    rounds.append((raw, res))
    print(f"round {r}: raw {raw:,.0f} tokens/s, pipeline {res['tokens_per_s']:,.0f} tokens/s "
          f"({res['tokens_per_s'] / raw:.1%})")
  raw = float(np.median([x for x, _ in rounds]))
  tps = float(np.median([y["tokens_per_s"] for _, y in rounds]))
  ratio = float(np.median([y["tokens_per_s"] / x for x, y in rounds]))
  eff = sum(y["tokens"] for _, y in rounds) / sum(y["tokens"] / y["packing_efficiency"]
                                                    for _, y in rounds)
  bps = float(np.median([y["batches_per_s"] for _, y in rounds]))
  secs = sum(y["seconds"] for _, y in rounds)
  print(f"raw SentencePiece EncodeAsIds (batched, {len(lines)} mixed train lines, "
        f"{raw_tokens} tokens): median {raw:,.0f} tokens/s")
  print(f"pipeline (seq_len={cfg.data.seq_len}, batch={cfg.train.batch_size}, "
        f"packing={cfg.data.packing}, group_size={cfg.data.group_size}): median "
        f"{tps:,.0f} packed tokens/s, {bps:.1f} batches/s over {secs:.1f} s")
  print(f"pipeline / raw: {ratio:.1%}   packing efficiency: {eff:.1%}   plan: {plan_s:.1f} s   "
        f"first batch: {first_s:.1f} s")
  if args.profile:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.profile):
      next(it)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
  out = {"raw_tokens_per_s": round(raw), "pipeline_tokens_per_s": round(tps),
         "ratio": round(ratio, 4), "packing_efficiency": round(eff, 4),
         "batches_per_s": round(bps, 2), "seq_len": cfg.data.seq_len,
         "batch_size": cfg.train.batch_size, "packing": cfg.data.packing,
         "group_size": cfg.data.group_size,
         "temperature_schedule": [list(p) for p in cfg.data.temperature_schedule],
         "rounds": args.rounds, "seconds": round(secs, 2),
         "plan_s": round(plan_s, 2), "first_batch_s": round(first_s, 2)}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
