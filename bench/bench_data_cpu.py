"""CPU seconds per million packed tokens of the training iterator, and its wall tokens/s.

  python bench/bench_data_cpu.py [BATCHES]     (from the checkout to measure; default 4000)

configs/small.py's training iterator (``inputs.train_iterator``), 100 batches of warm-up, then
BATCHES batches: the process's user + system CPU time (every thread: the readers' workers,
tf.data's) over the non-padding tokens drawn, and those tokens over the wall time. On a
machine shared with other jobs the wall figure follows the share of the cores the process
gets (more threads, more share); the CPU figure is the work the pipeline does per token.
It imports xlingo from the current directory, so one copy measures any checkout (run it from
each, alternately, to compare). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(batches: int = 4000) -> dict:
  from configs import small
  from xlingo.data import inputs

  cfg = small.get_config()
  plan = inputs.plan_inputs(cfg)
  it = inputs.train_iterator(plan, cfg)
  for _ in range(100):
    next(it)
  c0, w0, tokens = _cpu_s(), time.perf_counter(), 0
  for _ in range(batches):
    tokens += int(np.count_nonzero(next(it)["segment_ids"]))
  cpu, wall = _cpu_s() - c0, time.perf_counter() - w0
  out = {"cpu_s_per_Mtok": round(cpu / tokens * 1e6, 4), "wall_tokens_per_s": round(tokens / wall),
         "tokens": tokens, "batches": batches}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
