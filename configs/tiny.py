"""A tiny model for tests: compiles in seconds on CPU.

python -m xlingo.train --config configs/tiny.py --workdir /tmp/xlingo_tiny
"""

from xlingo import config as xconfig


def get_config(arg=None):
  xconfig.parse_arg(arg, "configs/tiny.py")
  c = xconfig.base_config()
  xconfig.set_model_size(c.model, "tiny")
  c.model.max_len = 64
  c.model.dtype = "float32"
  c.data.seq_len = 64
  c.data.shuffle_buffer = 64
  c.train.steps = 6
  c.train.batch_size = 8
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 1
  c.checkpoint.every_steps = 3
  c.checkpoint.async_save = False
  return c
