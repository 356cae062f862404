"""Sampling temperature (issue 17 a): T = 1, 3.33, 100, or UniMax, at equal tokens.

  python -m xlingo.train --config configs/experiments/temperature.py:1 --workdir workdirs/t_1
  python -m xlingo.train --config configs/experiments/temperature.py:3.33 --workdir workdirs/t_3
  python -m xlingo.train --config configs/experiments/temperature.py:100 --workdir workdirs/t_100
  python -m xlingo.train --config configs/experiments/temperature.py:unimax --workdir workdirs/t_u

Every variant trains the same steps on rows of the same length, so the same number of tokens;
only how they are split among the nine languages differs (the start-of-run table shows the
plan, the `tokens/<lang>` rows of metrics.jsonl what was delivered). T = 3.33 is the base
config (configs/experiments/base.py). Append ',tiny' for a smoke-test size.
"""

from configs.experiments import base
from xlingo import config as xconfig


def get_config(arg=None):
  a = xconfig.parse_arg(arg, "configs/experiments/temperature.py", temperature=(3.33, "unimax"),
                        size=base.SIZES)
  c = base.get_config(a.size)
  if a.temperature == "unimax":
    c.data.sampling = "unimax"
  else:
    c.data.temperature = a.temperature
  return c
