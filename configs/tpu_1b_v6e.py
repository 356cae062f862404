"""configs/tpu_1b.py's ~1B model on one v6e-8 host (8 Trillium chips, topology 2x4).

Same model, batch and schedule as tpu_1b.py, pure FSDP over 8 chips instead of 16, remat
``save_mlp_input`` instead of ``full`` (docs/TPU.md has the policies compiled for each config). Per chip a
v6e has 918 bf16 TFLOP/s and 32 GB of HBM against a v5e's 197 and 16 GB (Google's v5e/v6e
pages), so this one host has 2.3x the peak compute of a v5e-16's four hosts, and one host means
no multi-host start-up or cross-host data sharding. docs/TPU.md has both compiled for their
topologies (bench/tpu_aot.py).

python -m xlingo.train --config configs/tpu_1b_v6e.py --workdir gs://BUCKET/xlingo/tpu_1b \
  --config.data.vocab_path=gs://BUCKET/xlingo/vocab32k.model \
  --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""

from configs import tpu_1b

NUM_DEVICES = 8  # v6e-8: 8 chips on one host, one JAX device each


def get_config(arg=None):
  c = tpu_1b.get_config(arg)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, NUM_DEVICES, 1
  # Twice tpu_1b's rows per chip in twice its HBM: keeping the MLP's input (the residual after
  # attention) fits with 13% spare (25.8 of 29.8 GiB) and spares the out projection's replay.
  c.model.remat_policy = "save_mlp_input"
  return c
