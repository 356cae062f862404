"""A ~1B-parameter cross-lingual LM at sequence length 2048 on 16 chips (v5litepod-16 or v4-32).

Pure FSDP (fsdp=16): at this size every chip holds 1/16 of the params and optimizer state
and no tensor parallelism is needed. Splash attention and the chunked loss keep one v5e chip
(16 GB) at about 10.4 GiB without microbatching (bench/tpu_aot.py, docs/TPU.md). Reads mC4
(TFDS c4/multilingual, prepared in a bucket) and needs a 32k SentencePiece vocabulary: train
one with xlingo.data.vocab and set data.vocab_path. configs/tpu_1b_v6e.py runs the same model
on one v6e-8 host.

python -m xlingo.train --config configs/tpu_1b.py --workdir gs://BUCKET/xlingo/tpu_1b \
  --config.data.vocab_path=gs://BUCKET/xlingo/vocab32k.model \
  --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""

from xlingo import config as xconfig

NUM_DEVICES = 16  # v4-32 and v5litepod-16 (v5e) both have 16 chips, one JAX device each


def get_config(arg=None):
  xconfig.parse_arg(arg, "configs/tpu_1b.py")
  c = xconfig.tpu_pretrain_config(seq_len=2048)
  xconfig.set_model_size(c.model, "1b")
  # Full remat (tpu_pretrain_config): keeping even the MLP's input (save_mlp_input) needs 13.44
  # of 14.90 GiB per chip, under 10% spare; docs/TPU.md has the policies compiled for v5e 4x4.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 1
  c.train.batch_size = 256  # 0.5M tokens per step
  c.train.steps = 40_000
  c.train.learning_rate = 3e-4
  return c
