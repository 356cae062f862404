"""A ~8B-parameter cross-lingual LM at sequence length 2048 on a v5p-64 (32 chips).

v5p-64 counts TensorCores: 64 cores are 32 chips, and JAX sees one device per chip.
Mesh fsdp=16 x tensor=2: tensor parallelism over pairs of chips halves the activation
memory of the wide SwiGLU and the heads, FSDP shards the rest. Grouped-query attention
(8 KV heads) shrinks the decode-time KV cache 4x. Needs a 32k SentencePiece vocabulary.

python -m xlingo.train --config configs/tpu_8b.py --workdir gs://BUCKET/xlingo/tpu_8b \
  --config.data.vocab_path=gs://BUCKET/xlingo/vocab32k.model
"""

from xlingo import config as xconfig

NUM_DEVICES = 32


def get_config(arg=None):
  del arg
  c = xconfig.base_config()
  c.model.vocab_size = 32768
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 16384
  c.model.max_len = 2048
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat_policy = "full"

  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 2

  c.data.seq_len = 2048
  c.data.shuffle_buffer = 10_000
  c.train.batch_size = 512  # 1M tokens per step
  c.train.steps = 60_000
  c.train.learning_rate = 1.5e-4
  c.train.warmup_steps = 2000
  c.train.z_loss = 1e-4
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 16
  c.checkpoint.every_steps = 1000
  return c
