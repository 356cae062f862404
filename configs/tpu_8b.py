"""A ~8B-parameter cross-lingual LM at sequence length 2048 on a v5p-64 (32 chips).

v5p-64 counts TensorCores: 64 cores are 32 chips, and JAX sees one device per chip.
Pure FSDP (fsdp=32): the compiled program (bench/tpu_aot.py, docs/TPU.md) needs 26.4 GiB per
chip against 35.9 GiB for fsdp=16 x tensor=2, with the same matmul FLOPs and no synchronous
activation all-reduce (tensor=2 replicates the batch over each pair of chips and all-reduces
every attention output and MLP down projection, bf16[32,2048,4096], 81 GiB per chip per step).
Remat keeps q/k/v, the MLP's input and its up projection (``save_qkv_proj_mlp_input_mlp_up``):
77.4 GiB per chip (12.5% spare) for 11.8% fewer matmul FLOPs per step than full remat (1706
vs 1935 TFLOP per chip).
Grouped-query attention (8 KV heads) shrinks the decode-time KV cache 4x. Reads mC4 (TFDS
c4/multilingual, prepared in a bucket) and needs a 32k SentencePiece vocabulary.

python -m xlingo.train --config configs/tpu_8b.py --workdir gs://BUCKET/xlingo/tpu_8b \
  --config.data.vocab_path=gs://BUCKET/xlingo/vocab32k.model \
  --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""

from xlingo import config as xconfig

NUM_DEVICES = 32


def get_config(arg=None):
  xconfig.parse_arg(arg, "configs/tpu_8b.py")
  c = xconfig.tpu_pretrain_config(seq_len=2048)
  xconfig.set_model_size(c.model, "8b")
  c.model.tie_embeddings = False
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, NUM_DEVICES, 1
  c.model.remat_policy = "save_qkv_proj_mlp_input_mlp_up"  # least replay that fits, docs/TPU.md
  c.train.batch_size = 512  # 1M tokens per step
  c.train.steps = 60_000
  c.train.learning_rate = 1.5e-4
  return c
