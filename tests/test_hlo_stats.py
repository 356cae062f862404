"""bench/hlo_stats.py: loop trip counts against a hand count of a compiled tiny model, and the
collective classifier on handwritten HLO."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from configs import tiny
from xlingo.model import decoder as decoder_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import hlo_stats  # noqa: E402

B, T = 2, 16


def _compiled_grad_hlo(remat_policy: str) -> tuple[str, object]:
  cfg = tiny.get_config().model  # scanned blocks: the layers are one while loop
  cfg.remat_policy = remat_policy
  model = decoder_lib.Decoder(cfg)
  tokens = jnp.ones((B, T), jnp.int32)
  params = jax.eval_shape(lambda r: nn.unbox(model.init(r, tokens))["params"],
                          jax.random.PRNGKey(0))

  def loss(p):
    return jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled.as_text(), cfg


@pytest.mark.parametrize("remat_policy", ["full", "save_qkv_proj_mlp_input"])
def test_matmul_flops_with_trip_counts_match_the_hand_count(remat_policy):
  hlo, cfg = _compiled_grad_hlo(remat_policy)
  assert hlo.count(" while(") >= 2  # forward and backward scans: counted once without trips
  stats = hlo_stats.stats(hlo)
  assert stats["unknown_loops"] == 0
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f  # weights that multiply
  # Forward 2 + backward 4 FLOPs per weight and token; the output projection too; plain
  # attention computes every (query, key) pair: QK^T and AV, 2 FLOPs each, forward + 2x back.
  want = B * T * (6 * (cfg.num_layers * per_layer + d * cfg.vocab_size)
                  + cfg.num_layers * 12 * n * h * T)
  # Full remat: the backward pass replays each block's forward but the down projection, whose
  # output only feeds the residual stream; keeping q/k/v and the MLP's input spares the replay
  # of the q/k/v and out projections.
  replayed = per_layer - d * f
  if remat_policy == "save_qkv_proj_mlp_input":
    replayed -= d * n * h + 2 * d * k * h + n * h * d
  want += cfg.num_layers * B * T * (2 * replayed + 4 * n * h * T)
  assert stats["matmul_flops"] == want


HLO = """HloModule handwritten

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (p: (s32[], bf16[8,1024], bf16[256,1024])) -> pred[] {
  %p = (s32[], bf16[8,1024]{1,0}, bf16[256,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (s32[], bf16[8,1024], bf16[256,1024])) -> (s32[], bf16[8,1024], bf16[256,1024]) {
  %q = (s32[], bf16[8,1024]{1,0}, bf16[256,1024]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %step = s32[] constant(2)
  %next = s32[] add(%j, %step)
  %x.1 = bf16[8,1024]{1,0} get-tuple-element(%q), index=1
  %shard = bf16[256,1024]{1,0} get-tuple-element(%q), index=2
  %ag = (bf16[256,1024]{1,0}, bf16[1024,1024]{1,0}) all-gather-start(%shard), dimensions={0}
  %w = bf16[1024,1024]{1,0} all-gather-done(%ag)
  %ar = bf16[8,1024]{1,0} all-reduce(%x.1), replica_groups={}, to_apply=%sum
  %mm = bf16[8,1024]{1,0} dot(%ar, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %cp = (bf16[8,1024]{1,0}, bf16[8,1024]{1,0}) collective-permute-start(%mm), source_target_pairs={{0,1},{1,0}}
  %y = bf16[8,1024]{1,0} collective-permute-done(%cp)
  ROOT %t = (s32[], bf16[8,1024]{1,0}, bf16[256,1024]{1,0}) tuple(%next, %y, %shard)
}

ENTRY %main (a: bf16[8,1024], b: bf16[256,1024], c: f32[1,4,8], k: f32[3,8,16]) -> bf16[1,1024] {
  %a = bf16[8,1024]{1,0} parameter(0)
  %b = bf16[256,1024]{1,0} parameter(1)
  %c = f32[1,4,8]{2,1,0} parameter(2)
  %k = f32[3,8,16]{2,1,0} parameter(3)
  %conv = f32[1,4,16]{2,1,0} convolution(%c, %k), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,1024]{1,0}, bf16[256,1024]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], bf16[8,1024]{1,0}, bf16[256,1024]{1,0}) while(%init), condition=%cond, body=%body
  %out = bf16[8,1024]{1,0} get-tuple-element(%loop), index=1
  %host = bf16[4,8,1024]{2,1,0:S(5)} parameter(4)
  %row = bf16[1,8,1024]{2,1,0} reshape(%out)
  %offloaded = bf16[4,8,1024]{2,1,0:S(5)} dynamic-update-slice(%host, %row, %zero, %zero, %zero)
  ROOT %rs = bf16[1,1024]{1,0} reduce-scatter(%out), dimensions={0}, to_apply=%sum
}
"""


def test_collectives_by_kind_and_loop_trips_on_handwritten_hlo():
  stats = hlo_stats.stats(HLO)
  trips = 3  # i = 0, 2, 4 < 6
  act = 8 * 1024 * 2  # bf16[8,1024]
  assert stats["unknown_loops"] == 0
  assert stats["sync_collective_bytes"] == {
      "all-reduce": trips * act, "all-gather": 0, "reduce-scatter": act, "all-to-all": 0,
      "collective-permute": 0}
  assert stats["async_collective_bytes"] == {
      "all-reduce": 0, "all-gather": trips * 1024 * 1024 * 2, "reduce-scatter": 0,
      "all-to-all": 0, "collective-permute": trips * act}
  assert stats["largest_sync_all_reduce"] == (act, "bf16[8,1024]")
  assert stats["host_transfer_bytes"] == act  # the row written to host memory, not the buffer
  # The dot, 3 times; the convolution once: 4 outputs x 16 features x 8 inputs, over 10 of the
  # 12 (output, tap) pairs of a 3-tap window padded by 1 on each side.
  assert stats["matmul_flops"] == trips * 2 * 8 * 1024 * 1024 + 2 * 16 * 8 * 10
