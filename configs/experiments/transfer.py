"""Cross-lingual task transfer (issue 24 point 4, docs/SCIENCE.md h): fine-tune a model of
configs/experiments/base.py (its runs: base, le_off, cl_0, cl_0.1) on the embedded chapter task
and measure test accuracy in every language.

  python -m xlingo.finetune --config configs/experiments/transfer.py:classifier,full,en \
      --workdir workdirs/ft --config.checkpoint.init_from=workdirs/cl_0.1

The arg is HEAD,MODE,TRAIN: HEAD classifier | verbalizer (finetune.head), MODE full | lora
(adapt.mode), TRAIN en (English labelled data only: zero-shot in the other seven) | all (the
labelled training data of all eight languages: translate-train, the upper bound). Append
',tiny' for a smoke-test size.
"""

from configs.experiments import base
from xlingo import config as xconfig

TASK_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "ja", "zh")
# adapt.mode -> learning rate (LoRA trains few parameters and wants a higher one, as in (e))
RATES = {"full": 1e-3, "lora": 3e-3}


def get_config(arg=None):
  a = xconfig.parse_arg(arg, "configs/experiments/transfer.py",
                        head=("classifier", "verbalizer"), mode=tuple(RATES),
                        train=("en", "all"), size=base.SIZES)
  c = base.get_config(a.size)
  c.finetune = xconfig.finetune_section()
  c.adapt = xconfig.adapt_section()
  c.adapt.mode = a.mode
  c.finetune.head = a.head
  c.finetune.train_languages = ("en",) if a.train == "en" else TASK_LANGUAGES
  c.finetune.max_len = 64
  c.finetune.patience = 2
  c.train.learning_rate = RATES[a.mode]
  c.train.warmup_steps = 10
  c.train.steps = 200 if a.size == "small" else 20
  c.train.eval_every = 50 if a.size == "small" else 10
  c.train.log_every = 25 if a.size == "small" else 10
  if a.head == "verbalizer" and a.size == "small":
    # scoring all 12 label names runs 12 rows per example (a step and an evaluation cost 12
    # classifier ones): fewer steps, evaluated at the start and the end only
    c.train.steps = 40
    c.train.eval_every = 40
  c.checkpoint.every_steps = c.train.eval_every
  return c
