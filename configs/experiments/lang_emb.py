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
from xlingo.errors import ConfigError

VARIANTS = {"on": (True, 0.0), "off": (False, 0.0), "dropout": (True, 0.3)}


def get_config(arg=None):
  variant, size = base.parse(arg, "on")
  if variant not in VARIANTS:
    raise ConfigError(f"lang_emb variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
  c = base.get_config(size)
  c.model.use_lang_emb, c.model.lang_emb_dropout = VARIANTS[variant]
  return c
