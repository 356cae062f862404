"""Train-step throughput and MFU, with the matmul ceiling measured in the same run.

  .venv/bin/python bench/bench_train.py [--config configs/small.py] [--steps 10 --warmup 3]
  .venv/bin/python bench/bench_train.py --config configs/tpu_1b.py --synthetic \
      --config.mesh.fsdp=1 --config.train.batch_size=8 [--config.K=V ...]
  .venv/bin/python bench/bench_train.py --config configs/tpu_1b.py --compile_only

Config overrides: ``--config.K=V`` (or ``--set K=V``), repeatable. ``--ab K=V`` times a second
program with one more override, alternating with the first step by step (on a shared machine
the load then falls on both alike); its figures are the ``ab_*`` fields.

Throughput mode: the loop's train step (``step.make_train_step`` jitted by
``step.jit_train_step``: the loop's shardings and donation), ``.lower(abstract state, abstract
batch).compile()`` (exactly what ``loop.run`` does) -> ``--steps`` timed steps after
``--warmup`` steps. The batches are real packed batches from the config's data pipeline (read
before timing, so input time is not counted), or with ``--synthetic`` random tokens of the
config's shape (batch x seq_len), built without the data layer: that path imports no
seqio/TensorFlow, so it runs where only jax, flax and optax are installed (a GPU box).
Reports the median step time, tokens/s (batch x seq_len per step, padding included, as the
loop's ``tokens_per_s``), and MFU = ``decoder.flops_per_token`` x tokens/s / ceiling, where
the ceiling is the best of ``--matmul_repeats`` runs of an n^3 matmul in the model's compute
dtype on the same device(s) (n = 2048 on CPU, 8192 on an accelerator); ``mfu_peak`` is the same
against the device's data-sheet peak (``metrics.PEAK_FLOPS``) where the table knows it.

Compile-only mode: the train step is lowered and compiled from abstract shapes (no parameter
or optimizer state is materialised, no data is read) on a mesh of ``--devices`` fake CPU
devices (fsdp over all of them; 0 = the real devices with the config's mesh).

Prints one JSON line at the end. Runs unchanged on a GPU or TPU (it uses the default device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  for kv in overrides:
    key, val = kv.split("=", 1)
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(val)) if not isinstance(node[leaf], str) else val
  return cfg


def matmul_ceiling(n: int, dtype, repeats: int) -> float:
  """Best FLOP/s of an n x n x n matmul over ``repeats`` timed runs (after one warm-up)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def compile_step(cfg, mesh, rules, model, factory, byte_table, num_langs):
  """The loop's train step, lowered and compiled from abstract shapes: (compiled, lower_s,
  compile_s)."""
  from xlingo.training import step as step_lib

  objective = step_lib.lm_objective(cfg, model)
  step_fn = step_lib.make_train_step(objective, cfg, factory.tx, byte_table, num_langs)
  return step_lib.compile_train_step(objective, step_fn, factory, mesh, rules, cfg)


def synthetic_setup(cfg):
  """Mesh, rules, model, state factory and byte table for ``cfg`` without the data layer."""
  import numpy as np

  from xlingo import sharding
  from xlingo.model import decoder as decoder_lib
  from xlingo.training import state as state_lib

  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_rules(cfg.mesh)
  sharding.check_batch_divisible(cfg.train.batch_size // cfg.train.microbatches, mesh)
  model = decoder_lib.Decoder(cfg.model)
  factory = state_lib.StateFactory(model, cfg, mesh, rules)
  return mesh, rules, model, factory, np.ones((cfg.model.vocab_size,), np.float32)


def synthetic_batches(cfg, n: int, seed: int = 0) -> list[dict]:
  """``n`` host batches of random tokens in the config's shape, rows packed with 1-4 documents
  (so the segment mask is exercised as in real packed batches)."""
  import numpy as np

  from xlingo.training import step as step_lib

  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  out = []
  for _ in range(n):
    cuts = np.sort(rng.integers(1, t, (b, 3)), axis=1)
    pos_t = np.arange(t)
    seg = 1 + (pos_t[None, :, None] >= cuts[:, None, :]).sum(-1)
    starts = np.where(seg > 1, np.take_along_axis(cuts, np.maximum(seg - 2, 0), 1), 0)
    batch = {"inputs": rng.integers(1, cfg.model.vocab_size, (b, t)),
             "targets": rng.integers(1, cfg.model.vocab_size, (b, t)),
             "segment_ids": seg, "positions": pos_t[None, :] - starts,
             "lang_ids": rng.integers(0, len(cfg.data.languages), (b, t)),
             "loss_weights": np.ones((b, t), np.float32),
             "raw_bytes": np.full((b, t), 3)}
    assert tuple(batch) == step_lib.BATCH_FEATURES
    out.append({k: v.astype(np.float32 if k == "loss_weights" else np.int32)
                for k, v in batch.items()})
  return out


def run_compile_only(cfg, args) -> dict:
  import jax
  import jax.numpy as jnp

  from xlingo import sharding
  from xlingo.model import decoder as decoder_lib
  from xlingo.training import loop
  from xlingo.training import state as state_lib

  if args.devices:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  loop.validate_config(cfg)
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.logical_rules(cfg.mesh)
  model = decoder_lib.Decoder(cfg.model)
  factory = state_lib.StateFactory(model, cfg, mesh, rules)
  setup_s = time.perf_counter() - t0
  # The byte table only feeds bits-per-byte sums; its values do not change the program.
  byte_table = jnp.zeros((cfg.model.vocab_size,), jnp.float32)
  compiled, lower_s, compile_s = compile_step(cfg, mesh, rules, model, factory, byte_table,
                                              len(cfg.data.languages))
  mem = loop._memory_line(compiled)
  out = {"mode": "compile_only", "config": args.config, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "mesh": dict(mesh.shape),
         "params_m": round(state_lib.param_count(factory.params_abstract) / 1e6, 1),
         "scan_layers": bool(cfg.model.scan_layers), "remat": cfg.model.remat_policy,
         "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
         "setup_s": round(setup_s, 2), "lower_s": round(lower_s, 2),
         "compile_s": round(compile_s, 2), "lower_plus_compile_s": round(lower_s + compile_s, 2)}
  print(f"compiled the train step in {lower_s:.1f} s (lower) + {compile_s:.1f} s (compile){mem}")
  return out


def run_throughput(cfg, args) -> dict:
  import jax
  import jax.numpy as jnp

  from xlingo import sharding
  from xlingo.model import attention as attention_lib
  from xlingo.model import decoder as decoder_lib
  from xlingo.training import metrics

  synthetic = getattr(args, "synthetic", False)
  n_batches = min(args.steps + args.warmup, 8)
  if synthetic:
    mesh, rules, model, factory, byte_table = synthetic_setup(cfg)
    num_langs = len(cfg.data.languages)
    host_batches = synthetic_batches(cfg, n_batches)
  else:
    from xlingo.data import inputs
    from xlingo.training import loop

    loop.validate_config(cfg)
    s = loop.build(cfg)
    mesh, rules, model, factory, byte_table = s.mesh, s.rules, s.model, s.factory, s.byte_table
    num_langs = len(s.plan.table)
    it = inputs.train_iterator(s.plan, cfg)
    host_batches = [next(it) for _ in range(n_batches)]
  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  n = args.matmul_n or (2048 if on_cpu else 8192)
  dtype = jnp.dtype(cfg.model.dtype)
  ceiling_before = matmul_ceiling(n, dtype, args.matmul_repeats)

  compiled, lower_s, compile_s = compile_step(cfg, mesh, rules, model, factory, byte_table,
                                              num_langs)
  print(f"train step: lower {lower_s:.1f} s, compile {compile_s:.1f} s")
  runs = {"a": compiled}
  ab = getattr(args, "ab", None)
  if ab:
    # The variant shares the state's shapes (a loss or attention knob), so the same factory
    # and batches serve both.
    cfg_b = load_config(args.config, list(args.set) + [ab])
    runs["b"] = compile_step(cfg_b, mesh, rules, decoder_lib.Decoder(cfg_b.model), factory,
                             byte_table, num_langs)[0]
  batch_sh = sharding.batch_sharding(mesh)
  batches = [jax.make_array_from_process_local_data(batch_sh, b) for b in host_batches]
  states = {k: factory.init(jax.random.PRNGKey(cfg.train.seed)) for k in runs}
  all_times = {k: [] for k in runs}
  losses = {}
  with sharding.mesh_context(mesh, rules):
    for i in range(args.warmup + args.steps):
      b = batches[i % len(batches)]
      # With --ab the two programs alternate step by step, so load from other jobs falls on
      # both alike.
      for k, fn in runs.items():
        t = time.perf_counter()
        states[k], m = fn(states[k], b, {})
        losses[k] = float(m["loss"])  # blocks until the step is done
        if i >= args.warmup:
          all_times[k].append(time.perf_counter() - t)
  times, loss = all_times["a"], losses["a"]
  step_s = statistics.median(times)
  # Measured before and after the steps (best of both), so a burst of load from other jobs
  # during one measurement does not set the ceiling.
  ceiling = max(ceiling_before, matmul_ceiling(n, dtype, args.matmul_repeats))
  print(f"matmul ceiling ({n}^3, {dtype.name}, best of 2 x {args.matmul_repeats}) on "
        f"{dev.device_kind}: {ceiling / 1e9:,.1f} GFLOP/s per device")
  tokens = cfg.train.batch_size * cfg.data.seq_len
  tps = tokens / step_s
  flops_tok = decoder_lib.flops_per_token(cfg.model, cfg.data.seq_len)
  # Fake CPU devices share the host's cores: the host ceiling is the whole budget.
  ndev = 1 if on_cpu else jax.device_count()
  mfu = flops_tok * tps / (ceiling * ndev)
  peak = metrics.lookup_device_kind(metrics.PEAK_FLOPS, dev.device_kind)
  mfu_peak = flops_tok * tps / (peak * jax.device_count()) if peak and not on_cpu else None
  print(f"{cfg.train.batch_size}x{cfg.data.seq_len} tokens/step: median step {step_s * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {len(times)} steps -> "
        f"{tps:,.0f} tokens/s, {flops_tok / 1e6:.1f} MFLOP/token, MFU {mfu:.1%} "
        f"(final loss {loss:.3f})" + (f"; MFU {mfu_peak:.1%} of the {peak / 1e12:.0f} TFLOP/s "
                                      "data-sheet peak" if mfu_peak else ""))
  return {"mode": "throughput", "synthetic": synthetic, "config": args.config,
          "platform": dev.platform,
          "device_kind": dev.device_kind, "devices": jax.device_count(),
          "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len, "dtype": dtype.name,
          "step_ms_median": round(step_s * 1e3, 2), "step_ms_all": [round(x * 1e3, 1) for x in times],
          "tokens_per_s": round(tps), "flops_per_token": flops_tok,
          "matmul_n": n, "matmul_ceiling_gflops": round(ceiling / 1e9, 1),
          "achieved_gflops": round(flops_tok * tps / 1e9, 1), "mfu": round(mfu, 4),
          "mfu_peak": round(mfu_peak, 4) if mfu_peak else None,
          "attention": attention_lib.choose_implementation(
              cfg.model.attention_impl, dtype, cfg.model.head_dim, dev.platform),
          "remat": cfg.model.remat_policy, "loss_chunk_size": cfg.train.loss_chunk_size,
          "compile_s": round(lower_s + compile_s, 2), "loss": round(loss, 4),
          **({"ab": ab, "ab_step_ms_median": round(statistics.median(all_times["b"]) * 1e3, 2),
              "ab_step_ms_all": [round(x * 1e3, 1) for x in all_times["b"]],
              "ab_loss": round(losses["b"], 4)} if ab else {})}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/small.py")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. --set train.batch_size=16 (repeatable)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--matmul_n", type=int, default=0, help="0: 2048 on CPU, 8192 otherwise")
  ap.add_argument("--matmul_repeats", type=int, default=7)
  ap.add_argument("--compile_only", action="store_true",
                  help="only lower+compile the step from abstract shapes and time that")
  ap.add_argument("--devices", type=int, default=8,
                  help="compile_only: this many fake CPU devices, fsdp over all (0: real)")
  ap.add_argument("--synthetic", action="store_true",
                  help="random token batches of the config's shape; no data layer, no TF")
  ap.add_argument("--ab", metavar="KEY=VALUE",
                  help="also time the config with this override, alternating step by step")
  argv = list(sys.argv[1:] if argv is None else argv)
  # --config.K=V, as the loops take them, next to --set K=V.
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  args = ap.parse_args([a for a in argv if not a.startswith("--config.")])
  args.set = list(args.set) + overrides
  if args.compile_only and args.devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}").strip()
  cfg = load_config(args.config, args.set)
  out = run_compile_only(cfg, args) if args.compile_only else run_throughput(cfg, args)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
