"""Adaptation of a tiny model for tests: compiles in seconds on CPU.

python -m xlingo.train --config configs/tiny.py --workdir /tmp/xlingo_tiny
python -m xlingo.adapt --config configs/adapt_tiny.py --workdir /tmp/xlingo_adapt \
    --config.checkpoint.init_from=/tmp/xlingo_tiny
"""

from configs import tiny
from xlingo import config as xconfig


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.adapt = xconfig.adapt_section()
  c.data.train_languages = ("de",)
  c.train.learning_rate = 1e-3
  c.adapt.lora.rank = 4
  c.adapt.adapter.bottleneck = 8
  c.adapt.prefix.length = 4
  c.adapt.bleu_examples = 2
  c.adapt.max_decode_len = 4
  return c
