"""Contrastive alignment at weight BETA over the seven en-X pairs (issue 17 d).

Pretraining, beta = 0 (retrieval measured, not trained) and beta > 0:

  python -m xlingo.train --config configs/experiments/contrastive.py:0 --workdir workdirs/cl_0
  python -m xlingo.train --config configs/experiments/contrastive.py:0.1 --workdir workdirs/cl_0.1

Zero-shot transfer: adapt one of them to German alone (``adapt:BETA`` keeps aligning at that
weight during adaptation, L_transfer = L_LM(de) + beta * L_cl), then read the change in the
other languages from WORKDIR/adapt_report.json and the val/retrieval/* rows:

  python -m xlingo.adapt --config configs/experiments/contrastive.py:adapt:0.1 \
      --workdir workdirs/cl_0.1_de --config.checkpoint.init_from=workdirs/cl_0.1

Validation reports val/retrieval/<src>-<tgt> both ways for every pair, and val/bpb/<lang>.
Append ',tiny' for a smoke-test size (e.g. contrastive.py:0.1,tiny).
"""

from configs.experiments import base
from xlingo import config as xconfig

PAIRS = ("en-de", "en-es", "en-fr", "en-it", "en-ja", "en-pt", "en-zh")


def get_config(arg=None):
  # 'adapt:' in front: the adaptation run from a pretrained one
  adapting = str(arg or "").startswith("adapt:")
  a = xconfig.parse_arg(str(arg).removeprefix("adapt:") if adapting else arg,
                        "configs/experiments/contrastive.py", beta=0.1, size=base.SIZES)
  size = a.size
  c = base.get_config(size)
  c.train.contrastive.weight = a.beta
  c.train.contrastive.pairs = PAIRS
  c.train.contrastive.batch_size = 16
  if adapting:
    c.adapt = xconfig.adapt_section()
    c.data.train_languages = ("de",)
    c.train.steps = 60 if size == "small" else 20
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 5
    c.train.eval_every = 20 if size == "small" else 10
    c.checkpoint.every_steps = c.train.eval_every
  return c
