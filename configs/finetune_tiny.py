"""Task fine-tuning of a tiny model (tests, and a minutes-long CPU run): the embedded chapter task
(paragraph -> Debian Reference chapter) learned in English, measured in every language.

python -m xlingo.train --config configs/tiny.py --workdir /tmp/xlingo_tiny \
    --config.train.steps=300 --config.train.eval_every=100 --config.checkpoint.every_steps=100
python -m xlingo.finetune --config configs/finetune_tiny.py --workdir /tmp/xlingo_ft \
    --config.checkpoint.init_from=/tmp/xlingo_tiny
"""

from configs import tiny
from xlingo import config as xconfig


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.finetune = xconfig.finetune_section()
  c.adapt = xconfig.adapt_section()
  c.finetune.max_len = 64
  # About 2.8 epochs of the English train split (2,262 paragraphs): a minute or two on CPU.
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 50
  c.train.eval_every = 100
  c.checkpoint.every_steps = 100
  c.adapt.lora.rank = 4
  c.adapt.adapter.bottleneck = 8
  c.adapt.prefix.length = 4
  return c
