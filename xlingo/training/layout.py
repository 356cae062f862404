"""The names of what a run keeps in its workdir, written once (everyone else joins these).

  WORKDIR/checkpoints/<step>/   the train state, data state and metadata (checkpoints.py)
  WORKDIR/best/                 the best-so-far state, a step directory of its own
  WORKDIR/lock/                 one trainer per workdir (workdir.py)
  WORKDIR/metrics.jsonl         one JSON row per logged or evaluated step (metrics.py)
  WORKDIR/tensorboard/          the same rows as TensorBoard events
  WORKDIR/profile/              jax.profiler traces of train.profile_steps (hooks.profiler)
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
PROFILE = "profile"


def report_name(objective: str) -> str:
  """The end-of-run report of an objective (``adapt`` -> ``adapt_report.json``)."""
  return f"{objective}_report.json"

# What a run keeps in its workdir, by kind (besides the lock, always a directory): checked
# before a run starts (``workdir.check_layout``), so a file where a directory belongs is one
# line at the start, not a traceback at the first save.
KINDS = {CHECKPOINTS: "dir", METRICS: "file", TENSORBOARD: "dir", BEST: "dir"}
