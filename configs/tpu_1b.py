"""A ~1B-parameter cross-lingual LM at sequence length 2048 on 16 chips (v4-32 or v5e-16).

Pure FSDP (fsdp=16): at this size every chip holds 1/16 of the params and optimizer state
and no tensor parallelism is needed. Needs a 32k SentencePiece vocabulary: train one with
xlingo.data.vocab and set data.vocab_path.

python -m xlingo.train --config configs/tpu_1b.py --workdir gs://BUCKET/xlingo/tpu_1b \
  --config.data.vocab_path=gs://BUCKET/xlingo/vocab32k.model
"""

from xlingo import config as xconfig

NUM_DEVICES = 16  # v4-32 and v5e-16 both have 16 chips, one JAX device each


def get_config(arg=None):
  del arg
  c = xconfig.base_config()
  c.model.vocab_size = 32768
  c.model.d_model = 2048
  c.model.num_layers = 18
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.head_dim = 128
  c.model.mlp_dim = 5632
  c.model.max_len = 2048
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  # Saving the block's matmul outputs would need ~29 GiB per chip at 16 x 2048 tokens;
  # full recomputation keeps activations to the residual stream.
  c.model.remat_policy = "full"

  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 1

  c.data.seq_len = 2048
  c.data.shuffle_buffer = 10_000
  c.train.batch_size = 256  # 0.5M tokens per step
  c.train.steps = 40_000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.z_loss = 1e-4
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 16
  c.checkpoint.every_steps = 1000
  return c
