"""Train-step time of each adaptation mode against full fine-tuning, on one config.

  .venv/bin/python bench/bench_peft.py [--config configs/small.py] [--steps 8 --warmup 2] \
      [--modes full,lora,adapter,prefix,lang_emb] [--set K=V ...]

For every mode the config gets ``xlingo.config.adapt_section()`` with ``adapt.mode`` set, and
``adapt.resolve_config`` turns the mode into ``train.trainable``; the loop's train step
(``step.make_train_step``, jitted with the loop's shardings and donation) is compiled from
abstract shapes and run on random packed batches of the config's shape (``bench_train
--synthetic``'s batches; no data layer). The modes run round-robin, one step each per round,
so load from other jobs on a shared machine falls on all of them alike.

Reported per mode: the median and the fastest step time and their ratios to full fine-tuning
(on a machine shared with other jobs the fastest step is the better estimate of what the
program itself costs; the median shows what a run saw), the compiled
step's FLOPs (XLA's cost analysis of the whole program: forward, backward and update) and
their ratio to full, the parameters and the trained parameters. A frozen parameter costs no
weight gradient (``training.state.split_params``), so the backward pass of a
parameter-efficient mode keeps only the activation gradients (down to its lowest trained
parameter) and skips the weight-gradient matmuls and the optimizer update of the frozen
weights. Prints one JSON line at the end; runs unchanged on a GPU or TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import load_config, synthetic_batches  # noqa: E402

from xlingo import adapt, sharding  # noqa: E402
from xlingo import config as xconfig  # noqa: E402
from xlingo.model import decoder as decoder_lib  # noqa: E402
from xlingo.model import peft  # noqa: E402
from xlingo.training import state as state_lib  # noqa: E402
from xlingo.training import step as step_lib  # noqa: E402


def mode_config(path: str, overrides: list[str], mode: str):
  cfg = load_config(path, overrides)
  if "adapt" not in cfg:
    cfg.adapt = xconfig.adapt_section()
  cfg.adapt.mode = mode
  cfg.checkpoint.init_from = cfg.checkpoint.init_from or "unused"  # nothing is loaded here
  if not cfg.data.train_languages:
    cfg.data.train_languages = (cfg.data.languages[0],)
  if mode == "freeze" and cfg.train.trainable in (".*", ""):
    cfg.train.trainable = "blocks/.*mlp/"
  adapt.resolve_config(cfg)
  return cfg


def compiled_step(cfg, mesh, rules):
  """(compiled step, initial state, params, trained params, FLOPs, compile seconds)."""
  model = decoder_lib.Decoder(cfg.model, peft.spec_from_config(cfg))
  factory = state_lib.StateFactory(model, cfg, mesh, rules)
  byte_table = np.ones((cfg.model.vocab_size,), np.float32)
  objective = step_lib.lm_objective(cfg, model)
  fn = step_lib.make_train_step(objective, cfg, factory.tx, byte_table, len(cfg.data.languages))
  compiled, lower_s, compile_s = step_lib.compile_train_step(objective, fn, factory, mesh, rules,
                                                             cfg)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = factory.init(jax.random.PRNGKey(cfg.train.seed))
  n_all = state_lib.param_count(factory.params_abstract)
  n_trained = state_lib.param_count(state_lib.trained_params(factory.params_abstract,
                                                             cfg.train.trainable))
  return compiled, state, n_all, n_trained, float(cost.get("flops", float("nan"))), (
      lower_s + compile_s)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/small.py")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--modes", default="full,lora,adapter,prefix,lang_emb")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--warmup", type=int, default=2)
  args, rest = ap.parse_known_args(argv)
  args.set += [a[len("--config."):] for a in rest if a.startswith("--config.")]
  modes = args.modes.split(",")
  if modes[0] != "full":
    modes = ["full"] + [m for m in modes if m != "full"]
  base = mode_config(args.config, args.set, "full")
  mesh = sharding.make_mesh(base.mesh)
  rules = sharding.logical_rules(base.mesh)
  batch_sh = sharding.batch_sharding(mesh)
  batches = [jax.make_array_from_process_local_data(batch_sh, b)
             for b in synthetic_batches(base, 4)]
  runs = {}
  for mode in modes:
    cfg = mode_config(args.config, args.set, mode)
    runs[mode] = dict(zip(("step", "state", "params", "trained", "flops", "compile_s"),
                          compiled_step(cfg, mesh, rules)))
    print(f"{mode}: compiled in {runs[mode]['compile_s']:.1f} s, "
          f"{runs[mode]['trained'] / 1e6:.3f} M of {runs[mode]['params'] / 1e6:.2f} M parameters "
          f"trained", flush=True)
  times = {m: [] for m in modes}
  with sharding.mesh_context(mesh, rules):
    for i in range(args.warmup + args.steps):
      for mode, r in runs.items():
        t = time.perf_counter()
        r["state"], m = r["step"](r["state"], batches[i % len(batches)], {})
        float(m["loss"])  # blocks until the step is done
        if i >= args.warmup:
          times[mode].append(time.perf_counter() - t)
  full_s, full_flops = statistics.median(times["full"]), runs["full"]["flops"]
  full_min = min(times["full"])
  out = {"config": args.config, "overrides": args.set, "platform": jax.devices()[0].platform,
         "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "batch": base.train.batch_size, "seq_len": base.data.seq_len, "steps": args.steps,
         "modes": {}}
  print(f"{'mode':<9} {'median ms':>9} {'vs full':>8} {'min ms':>8} {'vs full':>8} "
        f"{'GFLOP':>8} {'vs full':>8} {'trained':>10}")
  for mode, r in runs.items():
    s, fastest = statistics.median(times[mode]), min(times[mode])
    out["modes"][mode] = {
        "step_ms_median": round(s * 1e3, 1), "step_time_ratio": round(s / full_s, 3),
        "step_ms_min": round(fastest * 1e3, 1),
        "step_time_ratio_min": round(fastest / full_min, 3),
        "step_ms_all": [round(x * 1e3, 1) for x in times[mode]],
        "gflops": round(r["flops"] / 1e9, 3), "flops_ratio": round(r["flops"] / full_flops, 3),
        "params": r["params"], "trained_params": r["trained"],
        "compile_s": round(r["compile_s"], 1)}
    print(f"{mode:<9} {s * 1e3:>9.1f} {s / full_s:>8.3f} {fastest * 1e3:>8.1f} "
          f"{fastest / full_min:>8.3f} {r['flops'] / 1e9:>8.2f} {r['flops'] / full_flops:>8.3f} "
          f"{r['trained']:>10,}")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
