"""How much validation text each language's numbers stand for, per setting of
``train.eval_max_bytes``: the first ``train.eval_batches`` batches (-1, whose text depends on
the tokenizer), the first ``--max_bytes`` bytes of whole lines, and the whole split (0).

  python bench/bench_eval_text.py --config configs/small.py [--config.K=V ...] --max_bytes 32768

Prints one line per language: the raw UTF-8 bytes scored (loss weight > 0) under each, from
``inputs.validation_set``, exactly what validation and ``xlingo.evaluate`` score.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def scored_bytes(plan, config, lang: str) -> int:
  from xlingo.data import inputs

  return int(sum(float((b["raw_bytes"] * b["loss_weights"]).sum())
                 for b in inputs.validation_set(plan, config, lang)))


def main(argv=None) -> dict:
  from xlingo import cli

  def define(fl):
    from absl import flags

    flags.DEFINE_integer("max_bytes", 32768, "train.eval_max_bytes to compare", flag_values=fl)

  fl = cli.parse_flags(argv or sys.argv, __doc__, define)
  from xlingo.data import inputs

  config = fl.config
  plan = inputs.plan_inputs(config)
  out = {}
  for lang in plan.eval_tasks:
    row = {}
    for setting in (-1, fl.max_bytes, 0):
      config.train.eval_max_bytes = setting
      row[setting] = scored_bytes(plan, config, lang)
    out[lang] = row
    print(f"{lang}: first {config.train.eval_batches} batch(es) {row[-1]:,} bytes | "
          f"eval_max_bytes={fl.max_bytes}: {row[fl.max_bytes]:,} | whole split: {row[0]:,}",
          flush=True)
  return out


if __name__ == "__main__":
  main()
