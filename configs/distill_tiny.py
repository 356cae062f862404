"""Distillation with tiny models for tests: a 1-layer student of a configs/tiny.py teacher.

python -m xlingo.train --config configs/tiny.py --workdir /tmp/xlingo_tiny
python -m xlingo.distill --config configs/distill_tiny.py --workdir /tmp/xlingo_distill_tiny \
    --config.distill.teacher_workdir=/tmp/xlingo_tiny
"""

from configs import tiny
from xlingo import config as xconfig


def get_config(arg=None):
  xconfig.parse_arg(arg, "configs/distill_tiny.py")
  c = tiny.get_config()
  c.distill = xconfig.distill_section(c.model)
  c.model.num_layers = 1
  return c
