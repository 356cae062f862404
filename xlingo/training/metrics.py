"""Metric writers (TensorBoard, metrics.jsonl, console), peak FLOP/s and MFU, and the plot."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xlingo import paths
from xlingo.training import layout

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

# HBM bandwidth per chip, bytes/s, from the same pages: v4 "1200 GBps", v5e "819 GBps", v5p
# "2765 GBps", v6e "1640 GBps" (bench/tpu_aot.py's roofline: the time a step's HBM traffic needs).
TPU_HBM_BANDWIDTH = {
    "TPU v4": 1200e9,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5": 2765e9,
    "TPU v5p": 2765e9,
    "TPU v6 lite": 1640e9,
    "TPU v6e": 1640e9,
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


MEASURED = "measured matmul"  # peak_flops_per_device's source when no hardware peak is known


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
  return host / max(jax.local_device_count(), 1), f"{MEASURED} ({kind})"


class MetricWriter:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard (clu); process 0 only.

  ``start_step`` is the step the run continues from: the file is first made that checkpoint's
  history (``truncate_jsonl_after``; a fresh start sets an older file aside).

  metrics.jsonl: locally one appended, fsynced line per write, so a crash tears at most the
  last line (dropped by the next run). In a bucket, where an object cannot be appended to, the
  whole file is uploaded at each ``flush`` (the loop flushes before every checkpoint save, so a
  resumed run finds every row up to its checkpoint), at most every ``FLUSH_S`` seconds between
  and at ``close``.

  TensorBoard: clu writes through ``tf.io.gfile``, which cannot reach a GCS emulator, so a test
  against one could not cover a gs:// workdir's events. For a remote workdir the events are
  written to a local temporary directory and copied through the path layer at each flush;
  production takes the same route, so the route the tests prove is the one that runs.
  """

  FLUSH_S = 60.0

  def __init__(self, workdir: str, start_step: int = 0, storage: paths.Retrying | None = None):
    self.active = jax.process_index() == 0
    self._storage = storage
    self.workdir = paths.resolve(workdir)
    self.path = paths.join(self.workdir, layout.METRICS)
    self.remote = paths.is_remote(self.workdir)
    self._tb = None
    self._tb_dir = paths.join(self.workdir, layout.TENSORBOARD)
    self._tb_local = None
    self._copied: dict[str, int] = {}
    self._pending = ""
    self._text = ""
    self._last_flush = time.monotonic()
    if not self.active:
      return
    _start_history(self.path, start_step)
    if self.remote:
      self._text = paths.read_text(self.path) if paths.exists(self.path) else ""
      self._tb_local = tempfile.mkdtemp(prefix="xlingo_tensorboard_")
    else:
      paths.makedirs(self.workdir)
    from clu import metric_writers

    self._tb = metric_writers.SummaryWriter(self._tb_local or self._tb_dir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self.remote:
      self._pending += line
      if time.monotonic() - self._last_flush > self.FLUSH_S:
        self.flush()
    else:
      paths.append_text(self.path, line)
    self._tb.write_scalars(int(step), clean)

  def flush(self) -> None:
    if not self.active:
      return
    self._tb.flush()
    if not self.remote:
      return
    if self._storage is not None:  # retried while the store is away (the rows stay pending)
      self._storage.run(self._upload, "uploading metrics.jsonl")
    else:
      self._upload()
    self._last_flush = time.monotonic()

  def _upload(self) -> None:
    if self._pending:
      paths.write_text(self.path, self._text + self._pending)
      self._text += self._pending
      self._pending = ""
    for name in os.listdir(self._tb_local):  # our own temporary directory
      local = os.path.join(self._tb_local, name)
      n = os.path.getsize(local)
      if self._copied.get(name) != n:
        paths.copy_file(local, paths.join(self._tb_dir, name))
        self._copied[name] = n

  def close(self) -> None:
    if self._tb is None:
      return
    self._tb.close()
    self.flush()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)  # our own temporary directory
    self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a torn last line (a kill mid-append) and unparsable lines
  are skipped."""
  if not paths.exists(path):
    return []
  rows = []
  for line in paths.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def truncate_jsonl_after(path: str, step: int) -> None:
  """Make metrics.jsonl the history of the checkpoint at ``step``: drop the rows past it
  (written after that checkpoint was saved) and a torn last line (what a kill or a full disk
  in the middle of an append leaves); keep every other line as it was."""
  if not paths.exists(path):
    return
  text = paths.read_text(path)
  lines = text.splitlines(keepends=True)
  keep, dropped, torn = [], 0, False
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except ValueError:
      if i == len(lines) - 1 and line.strip():
        torn = True
        continue
      keep.append(line)
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
      dropped += 1
      continue
    keep.append(line if line.endswith("\n") else line + "\n")
  new = "".join(keep)
  if new != text:
    paths.write_text(path, new)
  if torn:
    console(f"xlingo: dropped a torn last line of {path} ({len(lines[-1])} bytes, from an "
            f"interrupted write); the {len(keep)} rows before it are kept")


def _start_history(path: str, start_step: int) -> None:
  """A resumed run keeps the rows up to its checkpoint. A fresh start (step 0) redoes step 0;
  rows past it belong to a run whose checkpoints are gone, so the file is set aside, not lost."""
  if start_step > 0:
    truncate_jsonl_after(path, start_step)
    return
  rows = read_jsonl(path)
  if any(isinstance(r.get("step"), int) and r["step"] > 0 for r in rows):
    aside = f"{path}.before-{int(time.time())}"
    paths.rename(path, aside)
    console(f"xlingo: {path} held rows of an earlier run with no checkpoint left; kept them "
            f"as {aside} and start a new history")
  else:
    truncate_jsonl_after(path, -1)


class Progress:
  """One console line per log step: step, loss, each active objective term, steps/s, tokens/s,
  MFU, input wait, ETA.

  ``mfu_measured``: the peak is a matmul rate measured at start-up (CPU, unknown devices), not
  a hardware peak. It is measured under the same load as the run, so a crawling machine still
  shows a high share; the line says what the share is of ("MFU* 80% of measured matmul")
  rather than pass it off as utilisation of the hardware."""

  def __init__(self, total_steps: int, start_step: int, mfu_measured: bool = False):
    self.total = total_steps
    self.start_step = start_step
    self.mfu_measured = mfu_measured
    self.t0 = time.perf_counter()

  def line(self, step: int, m: Mapping[str, float], terms=()) -> str:
    """``terms``: the names in ``m`` of the objective's own metrics (``lid_loss``,
    ``contrastive_acc``, ``kl``, ...), shown after the loss; ``*_acc`` as a percentage."""
    elapsed = time.perf_counter() - self.t0
    done = step - self.start_step
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    shown = " ".join(f"{k} {100 * m[k]:.1f}%" if k.endswith("_acc") else f"{k} {m[k]:.4g}"
                     for k in terms if k in m)
    mfu = 100 * m.get("mfu", 0)
    mfu = f"MFU* {mfu:.0f}% of measured matmul" if self.mfu_measured else f"MFU {mfu:.1f}%"
    return (f"step {step:>6}/{self.total} | loss {m.get('loss', float('nan')):.4f} | "
            + (f"{shown} | " if shown else "")
            + f"{rate:.2f} steps/s | {m.get('tokens_per_s', 0):,.0f} tok/s | {mfu} | input wait "
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


def plot_languages(workdir: str, languages, out_name: str = layout.LANGUAGES_PLOT) -> str | None:
  """PNG of per-language training loss and validation bits per byte over steps."""
  rows = read_jsonl(paths.join(paths.resolve(workdir), layout.METRICS))
  if not rows or jax.process_index() != 0:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  # a task's fine-tuning (xlingo.finetune) validates accuracy, not bits per byte
  right = "val/bpb" if any(k.startswith("val/bpb/") for r in rows for k in r) else "val/acc"
  for lang in languages:
    for ax, key in ((axes[0], f"loss/{lang}"), (axes[1], f"{right}/{lang}")):
      pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
      if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=lang, marker="o" if key.startswith("val") else None, ms=3)
  axes[0].set_title("training loss per language (nats/token)")
  axes[1].set_title("validation bits per byte" if right == "val/bpb" else
                    "validation accuracy (task)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  path = paths.join(paths.resolve(workdir), out_name)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())
  return path
