"""The names of what a run keeps in its workdir, written once (everyone else joins these).

  WORKDIR/checkpoints/<step>/   the train state, data state and metadata (checkpoints.py)
  WORKDIR/best/                 the best-so-far state, a step directory of its own
  WORKDIR/lock/                 one trainer per workdir (workdir.py)
  WORKDIR/metrics.jsonl         one JSON row per logged or evaluated step (metrics.py)
  WORKDIR/tensorboard/          the same rows as TensorBoard events
  WORKDIR/languages.png         validation bits per byte per language over the run
  WORKDIR/<objective>_report.json   the report at the end of a run (adapt_report.json)

Metrics and the lock need these names without loading Orbax, so they live here rather than in
``checkpoints.py``.
"""

from __future__ import annotations

CHECKPOINTS = "checkpoints"
BEST = "best"
LOCK = "lock"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LANGUAGES_PLOT = "languages.png"


def report_name(objective: str) -> str:
  """The end-of-run report of an objective (``adapt`` -> ``adapt_report.json``)."""
  return f"{objective}_report.json"
