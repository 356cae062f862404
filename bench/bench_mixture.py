"""The mix the training iterator delivers against the plan: shares by language.

  python bench/bench_mixture.py --config configs/small.py [--config.K=V ...] --tokens 2000000

Draws batches from ``inputs.train_iterator`` (exactly what training reads) until ``--tokens``
non-padding tokens have been drawn, then prints one JSON line with four maps language -> share:

  realised_token_share    the drawn tokens by their language id (padding excluded; a pair's
                          source counts for the source's language, as tokens/<lang> does)
  realised_example_share  the examples whose first token was drawn, by the language trained on
                          (a pair's target language)
  planned_token_share     the plan's shares over the same stretch of the run
  planned_example_share   (inputs.InputPlan.planned_shares; under a temperature schedule, the
                          rates averaged over that stretch)

and ``max_rel_dev_token_share`` / ``max_rel_dev_example_share`` (the largest |realised /
planned - 1| over the languages), the counts and the time taken. A per-language table goes to
stderr. The packers take batches from the head of the token stream, so the drawn tokens are a
prefix of the stream and the examples drawn are those starting in it.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


class _ExampleLog:
  """Wraps a PackedIterator's ``stream.add`` to note where each example starts in the stream
  and its language (the language of its last token: a pair's target)."""

  def __init__(self, packed):
    self.offset = 0
    self.starts: list[np.ndarray] = []
    self.langs: list[np.ndarray] = []
    self._add = packed.stream.add
    packed.stream.add = self.add

  def add(self, tokens, lang_ids, weights, starts, *rest):
    first = np.flatnonzero(starts)
    if first.size:
      last = np.append(first[1:], len(tokens)) - 1
      self.starts.append(self.offset + first)
      self.langs.append(np.asarray(lang_ids)[last])
    self.offset += len(tokens)
    self._add(tokens, lang_ids, weights, starts, *rest)

  def counts(self, upto: int, num_langs: int) -> np.ndarray:
    if not self.starts:
      return np.zeros(num_langs, np.int64)
    starts, langs = np.concatenate(self.starts), np.concatenate(self.langs)
    return np.bincount(langs[starts < upto], minlength=num_langs)


def _shares(counts: np.ndarray, codes) -> dict[str, float]:
  total = max(float(counts.sum()), 1.0)
  return {c: float(n) / total for c, n in zip(codes, counts, strict=True)}


def _max_rel_dev(realised: dict, planned: dict) -> float:
  return max((abs(realised.get(k, 0.0) / v - 1.0) for k, v in planned.items() if v > 0),
             default=0.0)


def measure(config, tokens: int) -> dict:
  """Draw ``tokens`` non-padding tokens from the training iterator of ``config``; the shares
  (module docstring) as a dict."""
  from xlingo.data import inputs

  t0 = time.perf_counter()
  plan = inputs.plan_inputs(config)
  it = inputs.train_iterator(plan, config)
  log = _ExampleLog(getattr(it, "it", it))
  codes = plan.table.codes
  tok = np.zeros(len(codes), np.int64)
  batches = 0
  while tok.sum() < tokens:
    b = next(it)
    real = b["segment_ids"] > 0
    tok += np.bincount(b["lang_ids"][real], minlength=len(codes))
    batches += 1
  drawn = int(tok.sum())
  planned = plan.planned_shares(drawn)
  ex = log.counts(drawn, len(codes))
  out = {
      "realised_token_share": _shares(tok, codes),
      "realised_example_share": _shares(ex, codes),
      "planned_token_share": {c: planned["token_share"].get(c, 0.0) for c in codes},
      "planned_example_share": {c: planned["example_share"].get(c, 0.0) for c in codes},
  }
  out["max_rel_dev_token_share"] = _max_rel_dev(out["realised_token_share"],
                                                out["planned_token_share"])
  out["max_rel_dev_example_share"] = _max_rel_dev(out["realised_example_share"],
                                                  out["planned_example_share"])
  d = config.data
  out.update(tokens=drawn, examples=int(ex.sum()), batches=batches, sampling=d.sampling,
             temperature=d.temperature, temperature_schedule=[list(p) for p in
                                                              d.temperature_schedule],
             run_tokens=plan.mix.run_tokens, seconds=round(time.perf_counter() - t0, 2))
  return out


def _table(out: dict) -> str:
  lines = [f"{'lang':<6} {'tokens: realised':>17} {'planned':>8} {'examples: realised':>19} "
           f"{'planned':>8}"]
  for c, p in out["planned_token_share"].items():
    lines.append(f"{c:<6} {out['realised_token_share'][c]:>17.4f} {p:>8.4f} "
                 f"{out['realised_example_share'][c]:>19.4f} "
                 f"{out['planned_example_share'][c]:>8.4f}")
  lines.append(f"max relative deviation: tokens {out['max_rel_dev_token_share']:.3f}, examples "
               f"{out['max_rel_dev_example_share']:.3f} ({out['tokens']:,d} tokens, "
               f"{out['examples']:,d} examples, {out['seconds']} s)")
  return "\n".join(lines)


def main(argv=None) -> dict:
  from xlingo import cli

  def define(fl):
    from absl import flags

    flags.DEFINE_integer("tokens", 1_000_000, "non-padding tokens to draw", flag_values=fl)

  fl = cli.parse_flags(argv or sys.argv, __doc__, define)
  out = measure(fl.config, fl.tokens)
  print(_table(out), file=sys.stderr)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
