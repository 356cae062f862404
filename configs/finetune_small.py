"""Task fine-tuning of the demo's model (configs/small.py, ./launch/local.sh demo) on the
embedded chapter task: trained in English, measured zero-shot in every language.

python -m xlingo.train --config configs/small.py --workdir workdirs/demo
python -m xlingo.finetune --config configs/finetune_small.py --workdir workdirs/ft_en \
    --config.checkpoint.init_from=workdirs/demo [--config.finetune.head=verbalizer] \
    [--config.adapt.mode=lora]
python -m xlingo.evaluate --config configs/finetune_small.py --workdir workdirs/ft_en \
    --task chapter
"""

from configs import small
from xlingo import config as xconfig


def get_config(arg=None):
  c = small.get_config(arg)
  c.finetune = xconfig.finetune_section()
  c.adapt = xconfig.adapt_section()
  c.finetune.max_len = 128
  c.train.steps = 150
  c.train.batch_size = 16
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 10
  c.train.log_every = 10
  c.train.eval_every = 25
  c.checkpoint.every_steps = 25
  c.checkpoint.async_save = False
  c.finetune.patience = 3
  return c
