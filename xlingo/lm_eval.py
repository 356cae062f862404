"""lm-evaluation-harness with xlingo's model and tasks (needs the extra: pip install
'xlingo[eval]').

  python -m xlingo.lm_eval --model xlingo --model_args workdir=W[,config=configs/tiny.py,lang=auto] \\
      --tasks xlingo_chapter,xlingo_translation [--limit 8] [--log_samples --output_path OUT]

Every flag is lm-eval's own (``lm_eval --help``), passed through as given; this command only
registers the ``xlingo`` model (``xlingo.lm_eval_adapter``; the plain ``lm_eval`` command
cannot see a model registered outside lm-eval), adds the shipped tasks
(``xlingo/lm_eval_tasks``) as ``--include_path`` when none is given, and sets
``--batch_size 16`` when none is given (lm-eval's default is 1). Bad xlingo input (a workdir
without checkpoints, an unknown language, a continuation longer than the context) ends in one
line and exit code 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


def _has(argv, flag: str) -> bool:
  return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv=None) -> None:
  from xlingo import cli

  argv = list(sys.argv[1:] if argv is None else argv)
  if importlib.util.find_spec("lm_eval") is None:
    cli.fail("lm-eval is not installed; install the extra: pip install -e '.[eval]' "
             "(lm-eval==0.4.13)")
  help_only = not argv or any(a in ("-h", "--help") for a in argv)
  sub = argv[0] if argv and not argv[0].startswith("-") else "run"
  if not help_only and sub in ("run", "ls", "validate"):
    if not _has(argv, "--include_path"):
      argv += ["--include_path", TASKS_DIR]
    else:
      print(f"xlingo: --include_path given; add {TASKS_DIR} to it for xlingo's tasks",
            flush=True)
    if sub == "run" and not (_has(argv, "--batch_size") or _has(argv, "-b")):
      argv += ["--batch_size", "16"]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  import lm_eval.models  # noqa: F401  lm-eval's own models stay reachable (registry filled)
  from lm_eval.__main__ import cli_evaluate

  import xlingo.lm_eval_adapter  # noqa: F401  registers --model xlingo

  sys.argv = ["lm_eval", *argv]
  cli.run_body(cli_evaluate)


if __name__ == "__main__":
  main()
