"""int8 training (``model.quantization=int8``) against float: the loss curve on CPU, and the
dots of the compiled TPU program.

  python bench/bench_int8.py [--steps 200] [--seeds 0,1]
      trains configs/tiny.py (float32) both ways, the same data and seeds, in-process through
      the loop; prints each run's final loss (mean of the last 3 logged) and the int8 - float
      gap, mean +- sd over the seeds.
  python bench/bench_int8.py --topology v5e:4x4 --config configs/tpu_1b.py [--config.K=V ...]
      compiles the train step for a TPU topology without a TPU (bench/tpu_aot.py) with
      model.quantization=int8 and without, and prints for each one JSON line: the memory
      figures and the compiled program's matmuls (``convolution``/``dot`` ops) counted by operand
      types, e.g. {"s8,s8": 21, "bf16,bf16": 9}. The int8 run's s8 x s8 dots are the blocks'
      projections, forward and backward; what stays bf16 is attention and the vocabulary
      projection. Slow: minutes per compile.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiled HLO text names an op's operands without their types: '%dot.3 = s32[..]{..}
# dot(%a, %b), ...'; every instruction's type is on the line that defines it (names are unique
# in a module).
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", re.M)
_DOT = re.compile(r"= \w+\[[^\]]*\]\S* (?:convolution|dot)\(%([\w.\-]+), %([\w.\-]+)\)")


def count_dots(hlo: str) -> dict[str, int]:
  """Matmul ops of an HLO module's text by operand types ('s8,s8': n); each op once, however
  often its loop runs."""
  types = dict(_DEF.findall(hlo))
  out: dict[str, int] = {}
  for a, b in _DOT.findall(hlo):
    key = f"{types.get(a, '?')},{types.get(b, '?')}"
    out[key] = out.get(key, 0) + 1
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def aot(argv) -> None:
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import tpu_aot  # sets the environment libtpu needs before jax is imported

  from xlingo import cli

  def define(fl):
    from absl import flags

    flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5e:4x4", flag_values=fl)

  fl = cli.parse_flags(argv, __doc__, define)
  devices = tpu_aot.topology_devices(fl.topology)
  for q in ("int8", "none"):
    config = fl.config
    config.model.quantization = q
    figures, compiled = tpu_aot.compile_for_devices(config, devices)
    keep = ("total_gib", "hbm_gib", "spare", "temp_gib", "args_gib", "remat", "mesh",
            "compile_s")
    print(json.dumps({"topology": fl.topology, "quantization": q,
                      **{k: figures[k] for k in keep},
                      "dots": count_dots(compiled.as_text())}), flush=True)


def curve(steps: int, seeds: list[int]) -> None:
  # CPU only: an installed libtpu would otherwise look for a TPU (and wait on its lock file).
  os.environ["JAX_PLATFORMS"] = "cpu"
  import numpy as np

  sys.path.insert(0, ROOT)
  from configs import tiny
  from xlingo.training import loop

  def final_loss(q: str, seed: int) -> float:
    c = tiny.get_config()
    c.model.quantization = q
    c.train.seed = seed
    c.train.steps = steps
    c.train.warmup_steps = max(2, steps // 20)
    c.train.log_every = max(1, steps // 20)
    c.train.eval_every = steps
    c.checkpoint.every_steps = steps
    with tempfile.TemporaryDirectory() as wd:
      loop.run(c, wd)
      rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    return float(np.mean(losses[-3:]))

  res = {q: [final_loss(q, s) for s in seeds] for q in ("none", "int8")}
  gap = np.array(res["int8"]) - np.array(res["none"])
  line = {"steps": steps, "seeds": seeds, "float32": res["none"], "int8": res["int8"],
          "gap_mean": float(gap.mean()), "gap_sd": float(gap.std(ddof=1)) if len(seeds) > 1
          else 0.0}
  print(json.dumps(line), flush=True)


def main(argv=None) -> None:
  argv = list(argv or sys.argv)
  if any(a.startswith("--topology") for a in argv):
    aot(argv)
    return
  import argparse

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seeds", default="0,1")
  a = p.parse_args(argv[1:])
  curve(a.steps, [int(s) for s in a.seeds.split(",")])


if __name__ == "__main__":
  main()
