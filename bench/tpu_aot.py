"""Compile the real train step for a TPU topology on a machine without a TPU; print its memory.

  python bench/tpu_aot.py --config configs/tpu_1b.py --topology v5e:4x4 [--config.K=V ...]

libtpu (``pip install -e '.[tpu]'``) describes the topology's chips as abstract devices
(``jax.experimental.topologies.get_topology_desc``); the config's mesh is built on them, and the
loop's own train step (``step.make_train_step`` jitted by ``step.jit_train_step``: the state's
shardings, the batch's, donation) is lowered from abstract state and compiled for them. Nothing
runs and nothing is allocated. ``compiled.memory_analysis()`` gives what one chip needs:

  total_gib = args_gib + out_gib + temp_gib - alias_gib   (the donated state is aliased)

against ``hbm_gib`` (Google's per-chip figure, ``metrics.TPU_HBM_BYTES``). ``attention`` is what
``model.attention_impl`` resolved to for these devices, and ``splash_kernels`` counts the
Mosaic kernel calls in the compiled program (the proof that splash attention is in it; each
call site counts once, however often a loop runs it).
``flops`` is XLA's cost analysis of one chip's program (it counts each while loop's body once
and does not see inside Mosaic kernels, so it is far below a step's work); ``model_flops`` is one chip's share of
``decoder.flops_per_token`` x tokens per step (``model_tflop`` the same in TFLOP).

From the compiled program's HLO text (``bench/hlo_stats.py``, loop trip counts applied):
``hlo_matmul_tflop`` (dot/convolution FLOPs per chip per step; recomputation shows as the
excess over ``model_tflop``), ``sync_collective_gib`` and ``async_collective_gib`` (bytes per
chip per step by collective kind), ``largest_sync_all_reduce`` (its shape and size), ``hbm_traffic_gib`` (an
estimate), ``host_transfer_gib`` (offloaded activations' HBM<->host copies, which the roofline
leaves out) and ``roofline_mfu`` (``roofline``). Prints one JSON line.

Topology names are libtpu's: v4:2x2x4, v5e:4x4, v5p:2x4x4, v6e:2x4, ... (chips per dimension).
"""

from __future__ import annotations

import json
import os
import sys

# Before jax is imported: the host computes on CPU; libtpu must not look for a TPU VM's
# metadata server (it waits on it otherwise).
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs errors about it
# libtpu takes /tmp/libtpu_lockfile for the life of any process that loads it (any JAX process
# without JAX_PLATFORMS=cpu, once libtpu is installed); compiling needs no chip, so share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30


def topology_devices(name: str):
  """The abstract TPU devices of a topology such as 'v5e:4x4'; ConfigError without libtpu."""
  import importlib.util

  from xlingo.errors import ConfigError

  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError("libtpu is not installed; pip install -e '.[tpu]' (it compiles for TPU "
                      "topologies on any machine)")
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # noqa: BLE001 - libtpu raises its own types
    raise ConfigError(f"--topology={name!r} is not a TPU topology libtpu knows ({e}); use e.g. "
                      "v5e:4x4, v5p:2x4x4, v6e:2x4") from None


def compile_for_devices(config, devices):
  """Lower and compile the loop's train step for ``devices``: (figures dict, compiled)."""
  import jax.numpy as jnp
  import numpy as np

  from xlingo import sharding
  from xlingo.model import attention
  from xlingo.model import decoder as decoder_lib
  from xlingo.training import metrics
  from xlingo.training import state as state_lib
  from xlingo.training import step as step_lib

  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  t = config.train
  sharding.check_batch_divisible(t.batch_size // t.microbatches, mesh)
  model = decoder_lib.Decoder(config.model)
  factory = state_lib.StateFactory(model, config, mesh, rules)
  # Only bits-per-byte sums read the byte table; its values do not change the program.
  byte_table = np.ones((config.model.vocab_size,), np.float32)
  objective = step_lib.lm_objective(config, model)
  step_fn = step_lib.make_train_step(objective, config, factory.tx, byte_table,
                                     len(config.data.languages))
  compiled, lower_s, compile_s = step_lib.compile_train_step(objective, step_fn, factory, mesh,
                                                             rules, config)
  ma = compiled.memory_analysis()
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
           - ma.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  kind = devices[0].device_kind
  hbm = metrics.lookup_device_kind(metrics.TPU_HBM_BYTES, kind)
  n = len(devices)
  tokens = t.batch_size * config.data.seq_len
  model_flops = decoder_lib.flops_per_token(config.model, config.data.seq_len) * tokens / n
  impl = attention.choose_implementation(config.model.attention_impl,
                                         jnp.dtype(config.model.dtype), config.model.head_dim,
                                         platform=devices[0].platform)
  if impl == "splash" and not attention.splash_supported(config.data.seq_len):
    impl = "xla"
  hlo = compiled.as_text()
  hlo_figures = roofline(config, kind, hlo, model_flops)
  return {
      "devices": n, "device_kind": kind, "mesh": dict(mesh.shape),
      "params_b": round(state_lib.param_count(factory.params_abstract) / 1e9, 3),
      "batch": t.batch_size, "seq_len": config.data.seq_len, "microbatches": t.microbatches,
      "loss_chunk_size": config.train.loss_chunk_size, "remat": config.model.remat_policy,
      "attention": impl,
      "args_gib": round(ma.argument_size_in_bytes / GIB, 3),
      "out_gib": round(ma.output_size_in_bytes / GIB, 3),
      "alias_gib": round(ma.alias_size_in_bytes / GIB, 3),
      "temp_gib": round(ma.temp_size_in_bytes / GIB, 3),
      "total_gib": round(total / GIB, 3),
      "hbm_gib": round(hbm / GIB, 2) if hbm else None,
      "spare": round(1 - total / hbm, 3) if hbm else None,
      "flops": float(cost.get("flops", float("nan"))) if cost else None,
      "model_flops": model_flops,
      **hlo_figures,
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
  }, compiled


def _tflop(flops: float) -> float:
  return float(f"{flops / 1e12:.5g}")  # 5 significant digits: a tiny test model's too


def roofline(config, kind: str, hlo: str, model_flops: float) -> dict:
  """Per-step figures of one chip's compiled program (``hlo_stats``) and its roofline MFU.

  roofline_mfu = model FLOPs / peak / max(compute time, HBM time): compute time is the HLO's
  matmul FLOPs (loop trip counts applied, rematerialisation included) plus the attention
  kernels' (``kernel_tflop``: the model's attention FLOPs, which Mosaic kernels hide from the
  HLO, with the forward kernel run again under remat) at the data-sheet peak; HBM time is
  ``hbm_traffic_gib`` at the data-sheet bandwidth (an estimate that counts each top-level
  fusion's inputs and outputs in full; ``compute_mfu`` is the bound without it). Collectives
  are assumed overlapped: the synchronous ones (``sync_collective_gib``) are what that
  assumption costs.
  """
  import hlo_stats

  from xlingo.model import decoder as decoder_lib
  from xlingo.training import metrics

  s = hlo_stats.stats(hlo)
  m = config.model
  seq = config.data.seq_len
  # The attention term of flops_per_token (halved for causality: the kernels skip the masked
  # half): the model's FLOPs per token minus those of its weights (at length 0).
  per_token = decoder_lib.flops_per_token(m, seq)
  attention = per_token - decoder_lib.flops_per_token(m, 0)
  tokens = model_flops / per_token  # one chip's share of the step's tokens
  kernel_flops = attention * tokens * (4 / 3 if m.remat_policy != "none" else 1)
  peak = metrics.lookup_device_kind(metrics.PEAK_FLOPS, kind)
  bandwidth = metrics.lookup_device_kind(metrics.TPU_HBM_BANDWIDTH, kind)
  mfu = compute_mfu = None
  if peak and bandwidth:
    compute_s = (s["matmul_flops"] + kernel_flops) / peak
    mfu = round(model_flops / peak / max(compute_s, s["hbm_bytes"] / bandwidth), 3)
    compute_mfu = round(model_flops / peak / compute_s, 3)
  return {
      "hlo_matmul_tflop": _tflop(s["matmul_flops"]),
      "kernel_tflop": _tflop(kernel_flops),
      "model_tflop": _tflop(model_flops),
      "hbm_traffic_gib": round(s["hbm_bytes"] / GIB, 1),
      "sync_collective_gib": {k: round(v / GIB, 3) for k, v in s["sync_collective_bytes"].items()},
      "async_collective_gib": {k: round(v / GIB, 3)
                               for k, v in s["async_collective_bytes"].items()},
      "host_transfer_gib": round(s["host_transfer_bytes"] / GIB, 2),
      "largest_sync_all_reduce": "{1} {0:.0f} MiB".format(s["largest_sync_all_reduce"][0] / 2**20,
                                                          s["largest_sync_all_reduce"][1]),
      "splash_kernels": s["splash_kernels"], "unknown_loops": s["unknown_loops"],
      "compute_mfu": compute_mfu, "roofline_mfu": mfu,
  }


def main(argv=None) -> dict:
  from xlingo import cli

  def define(fl):
    from absl import flags

    flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5e:4x4", flag_values=fl)

  argv = list(argv or sys.argv)
  fl = cli.parse_flags(argv, __doc__, define)
  if not fl.topology:
    cli.fail("--topology is required, e.g. --topology v5e:4x4")
  config = fl.config
  cfg_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if cfg_path is None and "--config" in argv:
    cfg_path = argv[argv.index("--config") + 1]
  out: dict = {}

  def body():
    out.update({"config": cfg_path, "topology": fl.topology})
    out.update(compile_for_devices(config, topology_devices(fl.topology))[0])

  cli.run_body(body)
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
