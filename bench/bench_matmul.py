"""Matmul rates for the shapes of configs/small.py's train step, in JAX (XLA) or PyTorch.

  .venv/bin/python bench/bench_matmul.py                 # XLA, jitted a @ b and a.T @ b
  .venv-bench/bin/python bench/bench_matmul.py --torch   # the same shapes in PyTorch

[M, K] x [K, N] for the rows of a batch (8 x 256 = 2048 tokens), d_model 512, MLP 2048 and
the 8192-piece vocabulary, plus the 2048^3 ceiling that bench_train.py uses. Best of
``--repeats`` runs after one warm-up; float32. Prints one line per shape and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = [(2048, 512, 2048), (2048, 2048, 512), (512, 2048, 2048), (2048, 512, 512),
          (512, 2048, 512), (2048, 512, 8192), (2048, 8192, 512), (8192, 2048, 512),
          (2048, 2048, 2048)]


def best_time(fn, args, repeats: int) -> float:
  fn(*args)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn(*args)
    best = min(best, time.perf_counter() - t)
  return best


def rates_jax(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  mm = jax.jit(lambda a, b: a @ b)
  mm_t = jax.jit(lambda a_t, b: a_t.T @ b)
  run = lambda f: lambda x, y: f(x, y).block_until_ready()
  out = {}
  for m, k, n in SHAPES:
    a, a_t, b = jnp.ones((m, k)), jnp.ones((k, m)), jnp.ones((k, n))
    t = best_time(run(mm), (a, b), repeats)
    t_t = best_time(run(mm_t), (a_t, b), repeats)
    out[f"{m}x{k}x{n}"] = (2 * m * k * n / t / 1e9, 2 * m * k * n / t_t / 1e9)
  return out


def rates_torch(repeats: int, threads: int) -> dict:
  import torch

  torch.set_num_threads(threads)
  out = {}
  with torch.no_grad():
    for m, k, n in SHAPES:
      a, a_t, b = torch.ones(m, k), torch.ones(k, m), torch.ones(k, n)
      t = best_time(lambda x, y: x @ y, (a, b), repeats)
      t_t = best_time(lambda x, y: x.T @ y, (a_t, b), repeats)
      out[f"{m}x{k}x{n}"] = (2 * m * k * n / t / 1e9, 2 * m * k * n / t_t / 1e9)
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--torch", action="store_true", help="measure PyTorch instead of XLA")
  ap.add_argument("--threads", type=int, default=2, help="PyTorch threads")
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args(argv)
  rates = rates_torch(args.repeats, args.threads) if args.torch else rates_jax(args.repeats)
  name = "torch" if args.torch else "xla"
  for shape, (plain, trans) in rates.items():
    print(f"{name} {shape:>16}: {plain:6.1f} GFLOP/s   A^T: {trans:6.1f} GFLOP/s")
  out = {"stack": name, "gflops": {k: [round(v, 1) for v in r] for k, r in rates.items()}}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
