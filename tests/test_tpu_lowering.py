"""The train step lowers and compiles for a real TPU topology (libtpu, no TPU needed): splash
attention and the chunked loss included, so a change that breaks TPU lowering fails here."""

import importlib.util
import os
import sys

import pytest

from configs import tiny
from xlingo.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_aot():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[test]' brings it)")
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  # Its import sets libtpu's environment (no metadata server, a shared lockfile) before
  # libtpu loads.
  import tpu_aot

  return tpu_aot


def test_train_step_compiles_for_v5e_2x2_with_splash_and_chunked_loss():
  tpu_aot = _tpu_aot()
  c = tiny.get_config()
  c.model.max_len = c.data.seq_len = 128  # splash tiles rows in blocks of 128
  c.model.dtype = "bfloat16"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2  # heads and vocabulary over tensor
  c.train.loss_chunk_size = 32
  figures, compiled = tpu_aot.compile_for_devices(c, tpu_aot.topology_devices("v5e:2x2"))
  assert figures["devices"] == 4 and figures["device_kind"] == "TPU v5 lite"
  assert figures["attention"] == "splash"
  # Forward, dq and dkv Mosaic kernels, once each inside the scanned block.
  assert figures["splash_kernels"] == 3
  hlo = compiled.as_text()
  # Per chip: 8 rows / fsdp 2 = 4, vocabulary 8192 / tensor 2 = 4096. Chunks of 32 positions,
  # never the whole 128-position row of logits.
  assert "f32[4,32,4096]" in hlo and "f32[4,128,4096]" not in hlo
  assert 0 < figures["total_gib"] < figures["hbm_gib"]
  # The scanned layers' and the loss chunks' loops read (bench/hlo_stats.py), and the step's
  # matmuls (forward, remat replay, backward) exceed the model's own FLOPs.
  assert figures["unknown_loops"] == 0
  assert figures["hlo_matmul_tflop"] > figures["model_tflop"] - figures["kernel_tflop"] > 0
  assert 0 < figures["roofline_mfu"] <= figures["compute_mfu"] < 1


def test_topology_name_errors_are_one_line():
  tpu_aot = _tpu_aot()
  from xlingo.errors import ConfigError

  with pytest.raises(ConfigError, match="not a TPU topology"):
    tpu_aot.topology_devices("v5e:3x7x9")


@pytest.mark.parametrize("kind,flops,hbm,bandwidth", [
    ("TPU v4", 275e12, 32 * 2**30, 1200e9),
    ("TPU v5 lite", 197e12, 16e9, 819e9),  # v5e, as JAX names it
    ("TPU v5e", 197e12, 16e9, 819e9),
    ("TPU v5", 459e12, 95e9, 2765e9),  # v5p, as libtpu's topology names it
    ("TPU v5p", 459e12, 95e9, 2765e9),
    ("TPU v6 lite", 918e12, 32e9, 1640e9),  # v6e
])
def test_tpu_peak_and_hbm_lookup(kind, flops, hbm, bandwidth):
  assert metrics.lookup_device_kind(metrics.PEAK_FLOPS, kind) == flops
  assert metrics.lookup_device_kind(metrics.TPU_HBM_BYTES, kind) == hbm
  assert metrics.lookup_device_kind(metrics.TPU_HBM_BANDWIDTH, kind) == bandwidth


def test_device_kind_lookup_by_prefix_and_unknown():
  assert metrics.lookup_device_kind(metrics.PEAK_FLOPS, "NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.lookup_device_kind(metrics.PEAK_FLOPS, "cpu") is None
  assert metrics.lookup_device_kind(metrics.PEAK_FLOPS, "TPU v7x") is None


def _sync_activation_all_reduces(hlo: str, seq: int, d_model: int) -> list[str]:
  """Synchronous all-reduces of activation-shaped buffers ([..., seq, d_model], or those rows
  flattened): what tensor parallelism with the batch replicated over the tensor axis emits
  after every attention output and MLP down projection."""
  import hlo_stats

  module = hlo_stats.Module(hlo)
  found = []
  for instr, _, _ in module.instructions():
    if hlo_stats.collective_kind(instr.opcode) != ("all-reduce", False):
      continue
    for _, dims in hlo_stats.arrays(instr.shape):
      if len(dims) >= 2 and dims[-1] == d_model and (
          (len(dims) >= 3 and dims[-2] == seq) or dims[-2] % seq == 0 and dims[-2] < 64 * seq):
        found.append(instr.shape)
  return found


@pytest.mark.slow
def test_tpu_8b_mesh_has_no_synchronous_activation_all_reduce():
  """configs/tpu_8b.py's mesh on its slice (v5p-64, 32 chips): at the 8B's width, with two
  blocks and 256 positions so that it compiles in about a minute, the step has no synchronous
  all-reduce of activations, while fsdp 16 x tensor 2 (its former mesh) has them."""
  from configs import tpu_8b

  tpu_aot = _tpu_aot()
  devices = tpu_aot.topology_devices("v5p:2x4x4")
  c = tpu_8b.get_config()
  c.model.num_layers = 2
  c.model.max_len = c.data.seq_len = 256
  c.train.batch_size = 32
  seq, d = c.data.seq_len, c.model.d_model
  _, compiled = tpu_aot.compile_for_devices(c, devices)
  assert (c.mesh.fsdp, c.mesh.tensor) == (32, 1)
  assert _sync_activation_all_reduces(compiled.as_text(), seq, d) == []
  c.mesh.fsdp, c.mesh.tensor = 16, 2
  _, compiled = tpu_aot.compile_for_devices(c, devices)
  assert _sync_activation_all_reduces(compiled.as_text(), seq, d)
