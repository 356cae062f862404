"""Adapting configs/adapt_small.py's pretrained model to Greek, a script the shipped vocabulary
lacks, with and without an extended vocabulary (docs/ADAPTATION.md, "A new script").

  python -m xlingo.train --config configs/adapt_small.py:pretrain --workdir workdirs/pre
  python -m xlingo.data.vocab extend --vocab xlingo/data/corpus/vocab/xlingo_8k.model \
      --input el='xlingo/data/corpus/new/el.train.txt' --new_pieces 1024 \
      --output workdirs/el_vocab
  python -m xlingo.adapt --config configs/experiments/adapt_el.py --workdir workdirs/el_old \
      --config.checkpoint.init_from=workdirs/pre
  python -m xlingo.adapt --config configs/experiments/adapt_el.py:extended \
      --workdir workdirs/el_ext --config.checkpoint.init_from=workdirs/pre \
      --config.data.vocab_path=workdirs/el_vocab.model

Greek is appended to the pretrained model's nine languages (a fresh language-embedding row)
and trained on ``xlingo/data/corpus/new/el.train.txt`` (Debian's Greek message catalogs,
SOURCES.md); validation covers Greek and the nine others (their files from the embedded
corpus), so the table at the end shows the gain on Greek and what the others lose. With
``:extended`` the model's vocabulary grows by the 1024 pieces ``vocab extend`` added: their
embedding rows start at the mean of the old rows of the pieces each decodes to
(``xlingo.training.restore``), every old piece keeps its id and row.

Validation scores every language's whole validation file (``train.eval_max_bytes=0``), so both
vocabularies are scored on the same bytes (``val/bytes/<lang>``); Greek lines longer than a
128-token row (with the shipped vocabulary, about one token per byte) are scored in sliding
windows that keep 64 tokens of context (``train.eval_context``). Compare the two at equal
Greek text by ``bytes/el`` in metrics.jsonl, not by steps (docs/SCIENCE.md (g)).
"""

import os

from configs import adapt_small
from xlingo import config as xconfig

CORPUS = os.path.join(os.path.dirname(xconfig.__file__), "data", "corpus")
NEW_PIECES = 1024


def get_config(arg=None):
  # no argument: the shipped vocabulary
  vocab = xconfig.parse_arg(arg, "configs/experiments/adapt_el.py", vocab=("", "extended")).vocab
  c = adapt_small.get_config()
  c.data.languages = xconfig.EMBEDDED_LANGUAGES + ("el",)
  c.model.num_languages = len(c.data.languages)
  c.data.source = "files"
  c.data.file_patterns = {lang: os.path.join(CORPUS, "mono", f"{lang}.train.txt")
                          for lang in xconfig.EMBEDDED_LANGUAGES}
  c.data.file_val_patterns = {lang: os.path.join(CORPUS, "mono", f"{lang}.validation.txt")
                              for lang in xconfig.EMBEDDED_LANGUAGES}
  c.data.file_patterns["el"] = os.path.join(CORPUS, "new", "el.train.txt")
  c.data.file_val_patterns["el"] = os.path.join(CORPUS, "new", "el.validation.txt")
  c.data.train_languages = ("el",)
  c.train.steps = 200
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 10
  c.train.eval_every = 50
  # The same text for both tokenizers: the whole validation file of each language, long lines
  # in windows with 64 tokens of context (the default -1 scores the first eval_batches
  # batches, which hold ~5x fewer Greek bytes with the shipped vocabulary than the extended).
  c.train.eval_max_bytes = 0
  c.train.eval_context = 64
  c.checkpoint.every_steps = 100
  if vocab == "extended":
    c.data.vocab_path = "workdirs/el_vocab.model"
    c.model.vocab_size = 8192 + NEW_PIECES
  return c
