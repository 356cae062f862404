"""Adaptation of a small pretrained model to German on the embedded corpus (docs/ADAPTATION.md).

The ':pretrain' variant is the base model's LM pretraining (all languages); the default is the
adaptation from it, in full fine-tuning or, with --config.adapt.mode=lora, LoRA:

  python -m xlingo.train --config configs/adapt_small.py:pretrain --workdir workdirs/pre
  python -m xlingo.adapt --config configs/adapt_small.py --workdir workdirs/adapt_full \
      --config.checkpoint.init_from=workdirs/pre
  python -m xlingo.adapt --config configs/adapt_small.py --workdir workdirs/adapt_lora \
      --config.checkpoint.init_from=workdirs/pre --config.adapt.mode=lora
"""

from xlingo import config as xconfig


def get_config(arg=None):
  run = xconfig.parse_arg(arg, "configs/adapt_small.py", run=("", "pretrain")).run
  c = xconfig.base_config()
  # About 6 M parameters: ~1 s a step on a 2-core CPU, so each run takes minutes.
  xconfig.set_model_size(c.model, "base")
  c.model.max_len = 128
  c.model.dtype = "float32"
  c.data.seq_len = 128
  c.train.batch_size = 8
  c.train.eval_batches = 4
  c.train.log_every = 10
  c.checkpoint.async_save = False
  if run == "pretrain":
    c.train.steps = 200
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
    return c
  c.adapt = xconfig.adapt_section()
  c.data.train_languages = ("de",)
  c.train.steps = 60
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 5
  c.train.eval_every = 20
  c.checkpoint.every_steps = 20
  c.adapt.early_stop_patience = 0
  c.adapt.lora.rank = 8
  c.adapt.lora.alpha = 16.0
  return c
