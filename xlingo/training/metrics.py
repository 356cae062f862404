"""Metric writers (TensorBoard, metrics.jsonl, console), peak FLOP/s and MFU, and the plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per JAX device, keyed by ``device.device_kind`` (the strings JAX
# reports; jax's own Pallas TPU table maps the same names). One JAX device is one chip on
# every TPU below (v4 and v5p join their two TensorCores as one "megacore" device), so these
# are Google's per-chip figures, from the Cloud TPU system-architecture pages:
#   v4:  https://cloud.google.com/tpu/docs/v4   "Peak compute per chip 275 teraflops (bf16)"
#   v5e: https://cloud.google.com/tpu/docs/v5e  "Peak compute per chip (bf16) 197 TFLOPs"
#   v5p: https://cloud.google.com/tpu/docs/v5p  "Peak compute per chip (bf16) 459 TFLOPs"
#   v6e: https://cloud.google.com/tpu/docs/v6e  "Peak compute per chip (bf16) 918 TFLOPs"
# GPUs from NVIDIA's data sheets (dense bf16, SXM); their kinds carry a suffix such as
# "NVIDIA H100 80GB HBM3", so they are matched by prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

# HBM per chip from the same pages: v4 "32 GiB"; v5e "16 GB", v5p "95 GB", v6e "32 GB". The
# latter are taken as decimal gigabytes, the smaller reading, so a plan that fits here fits.
TPU_HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16e9,
    "TPU v5e": 16e9,
    "TPU v5": 95e9,
    "TPU v5p": 95e9,
    "TPU v6 lite": 32e9,
    "TPU v6e": 32e9,
}


def lookup_device_kind(table: Mapping[str, float], kind: str) -> float | None:
  """``table[kind]``, else the entry whose name is the longest prefix of ``kind``, else None.

  Exact first: "TPU v5" (v5p) is a prefix of "TPU v5 lite" (v5e), which has its own entry.
  """
  if kind in table:
    return table[kind]
  names = [name for name in table if kind.startswith(name + " ")]
  return table[max(names, key=len)] if names else None


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """The achieved FLOP/s of one large matmul on the default device (the practical ceiling)."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def peak_flops_per_device(configured: float, compute_dtype: str) -> tuple[float, str]:
  """(FLOP/s, where the figure comes from): config, the device table, or a measured matmul."""
  if configured and configured > 0:
    return float(configured), "config"
  kind = jax.devices()[0].device_kind
  flops = lookup_device_kind(PEAK_FLOPS, kind)
  if flops is not None:
    return flops, f"table ({kind})"
  # CPU or unknown: measure. With fake CPU devices all share the same cores, so the ceiling of
  # the whole host is divided among them.
  host = measure_matmul_flops(1024, jnp.dtype(compute_dtype))
  return host / max(jax.local_device_count(), 1), f"measured matmul ({kind})"


class MetricWriter:
  """Writes scalars to TensorBoard (clu) and to WORKDIR/metrics.jsonl; process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from clu import metric_writers

      self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._tb.write_scalars(int(step), clean)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl_after(path: str, step: int) -> None:
  """Drop records past ``step`` (written after the checkpoint a resumed run starts from)."""
  rows = read_jsonl(path)
  keep = [r for r in rows if r["step"] <= step]
  if len(keep) != len(rows):
    with open(path + ".tmp", "w") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


class Progress:
  """One console line per log step: step, loss, steps/s, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.start_step = start_step
    self.t0 = time.perf_counter()

  def line(self, step: int, m: Mapping[str, float]) -> str:
    elapsed = time.perf_counter() - self.t0
    done = step - self.start_step
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    return (f"step {step:>6}/{self.total} | loss {m.get('loss', float('nan')):.4f} | "
            f"{rate:.2f} steps/s | {m.get('tokens_per_s', 0):,.0f} tok/s | "
            f"MFU {100 * m.get('mfu', 0):.1f}% | input wait "
            f"{100 * m.get('input_wait_frac', 0):.1f}% | ETA {_fmt_time(eta)}")


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def console(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
    sys.stdout.flush()


def plot_languages(workdir: str, languages, out_name: str = "languages.png") -> str | None:
  """PNG of per-language training loss and validation bits per byte over steps."""
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if not rows or jax.process_index() != 0:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for lang in languages:
    for ax, key in ((axes[0], f"loss/{lang}"), (axes[1], f"val/bpb/{lang}")):
      pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
      if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=lang, marker="o" if key.startswith("val") else None, ms=3)
  axes[0].set_title("training loss per language (nats/token)")
  axes[1].set_title("validation bits per byte")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
