"""Per-language LM loss weights around a main language (train.loss_weights, train.main_language).

  python -m xlingo.train --config configs/experiments/loss_weights.py:de,0.3 --workdir workdirs/lw_de

'MAIN,OTHERS[,SIZE]': MAIN weighs train.main_language_weight (1.0; override with
--config.train.main_language_weight=W), every other language OTHERS. Sampling is unchanged
(data.temperature); the start-of-run line "LM loss weights per language" shows the weights, and
the metrics (loss/<lang>, bpb/<lang>, val/*) stay unweighted.
"""

import ml_collections

from configs.experiments import base
from xlingo import config as xconfig


def get_config(arg=None):
  a = xconfig.parse_arg(arg, "configs/experiments/loss_weights.py", main="de", others=0.3,
                        size=base.SIZES)
  c = base.get_config(a.size)
  if a.main not in c.data.languages:
    raise xconfig.ConfigError(f"loss_weights experiment: {a.main!r} is not in data.languages")
  c.train.main_language = a.main
  c.train.loss_weights = ml_collections.ConfigDict(
      {lang: a.others for lang in c.data.languages if lang != a.main})
  return c
