"""The shared base of the objective experiments (docs/SCIENCE.md, README "Objectives").

A 2.1 M-parameter model (the "small" size: d_model 128, 4 layers, 128-token rows, batch 16)
trained for 300 steps on all nine languages of the embedded corpus: a run takes three to five
minutes on a 2-core CPU, so each experiment's variants and seeds run in minutes.
``size='tiny'`` is configs/tiny.py's model and a short run (smoke tests). Seeds:
--config.train.seed=N --config.data.seed=N.
"""

from configs import tiny
from xlingo import config as xconfig

# The experiments' ':arg' ends in ',SIZE' (xconfig.parse_arg choices; the first is the default).
SIZES = ("small", "tiny")


def get_config(size: str = "small"):
  if size not in SIZES:
    raise xconfig.ConfigError(f"experiment size {size!r} is unknown; use one of "
                              f"{', '.join(SIZES)}")
  if size == "tiny":
    c = tiny.get_config()
    c.train.steps = 100
    c.train.learning_rate = 1e-2
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    c.train.log_every = 10
    return c
  c = xconfig.base_config()
  xconfig.set_model_size(c.model, "small")
  c.model.max_len = 128
  c.model.dtype = "float32"
  c.model.scan_layers = False  # four blocks: unrolled is faster on CPU (configs/small.py)
  c.data.seq_len = 128
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 100
  c.checkpoint.async_save = False
  return c
