"""Language embeddings on, off, or on with the hint hidden for 30% of the examples (issue 17 b).

  python -m xlingo.train --config configs/experiments/lang_emb.py:on --workdir workdirs/le_on
  python -m xlingo.train --config configs/experiments/lang_emb.py:off --workdir workdirs/le_off
  python -m xlingo.train --config configs/experiments/lang_emb.py:dropout --workdir workdirs/le_drop
  python -m xlingo.generate --config configs/experiments/lang_emb.py:dropout \
      --workdir workdirs/le_drop --lang de --prompt "Debian"      # or --lang none

Validation reports val/bpb/<lang> (with the hint) and, where there is a language embedding,
val/bpb_nohint/<lang> (the same text with no hint). Append ',tiny' for a smoke-test size.
"""

from configs.experiments import base
from xlingo import config as xconfig

VARIANTS = {"on": (True, 0.0), "off": (False, 0.0), "dropout": (True, 0.3)}


def get_config(arg=None):
  a = xconfig.parse_arg(arg, "configs/experiments/lang_emb.py", variant=tuple(VARIANTS),
                        size=base.SIZES)
  c = base.get_config(a.size)
  c.model.use_lang_emb, c.model.lang_emb_dropout = VARIANTS[a.variant]
  return c
