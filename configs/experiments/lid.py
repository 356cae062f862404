"""The language-ID loss at weight LAMBDA (issue 17 c): lambda = 0, 0.1, 1.

  python -m xlingo.train --config configs/experiments/lid.py:0 --workdir workdirs/lid_0
  python -m xlingo.train --config configs/experiments/lid.py:0.1 --workdir workdirs/lid_0.1
  python -m xlingo.train --config configs/experiments/lid.py:1 --workdir workdirs/lid_1

The language embedding is on and hidden for 30% of the examples (model.lang_emb_dropout); the
loss is taken on those examples' tokens, where the head must read the text. Validation reports
val/lid_acc[/<lang>] on text given with no hint (lambda = 0 leaves the head untrained: chance)
and val/bpb/<lang>. Append ',tiny' for a smoke-test size.
"""

from configs.experiments import base
from xlingo import config as xconfig


def get_config(arg=None):
  a = xconfig.parse_arg(arg, "configs/experiments/lid.py", weight=0.1, size=base.SIZES)
  c = base.get_config(a.size)
  c.model.lid_head = True
  c.model.lang_emb_dropout = 0.3
  c.train.lid_loss_weight = a.weight
  return c
