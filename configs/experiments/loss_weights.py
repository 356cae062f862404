"""Per-language LM loss weights around a main language (train.loss_weights, train.main_language).

  python -m xlingo.train --config configs/experiments/loss_weights.py:de,0.3 --workdir workdirs/lw_de

'MAIN,OTHERS[,SIZE]': MAIN weighs train.main_language_weight (1.0; override with
--config.train.main_language_weight=W), every other language OTHERS. Sampling is unchanged
(data.temperature); the start-of-run line "LM loss weights per language" shows the weights, and
the metrics (loss/<lang>, bpb/<lang>, val/*) stay unweighted.
"""

import ml_collections

from configs.experiments import base
from xlingo.errors import ConfigError


def get_config(arg=None):
  parts = [p.strip() for p in str(arg or "de,0.3").split(",")]
  main = parts[0]
  try:
    others = float(parts[1]) if len(parts) > 1 else 0.3
  except ValueError:
    raise ConfigError(f"loss_weights experiment: {parts[1]!r} is not a weight (e.g. "
                      "loss_weights.py:de,0.3)") from None
  c = base.get_config(parts[2] if len(parts) > 2 else "small")
  if main not in c.data.languages:
    raise ConfigError(f"loss_weights experiment: {main!r} is not in data.languages")
  c.train.main_language = main
  c.train.loss_weights = ml_collections.ConfigDict(
      {lang: others for lang in c.data.languages if lang != main})
  return c
