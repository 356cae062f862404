"""LM pretraining.

  python -m xlingo.train --config configs/small.py --workdir workdirs/lm [--config.KEY=VALUE]

Resumes from WORKDIR's latest checkpoint when there is one; SIGTERM saves and exits 0.
"""

import sys

from xlingo import cli


def run(config, workdir: str) -> dict:
  from xlingo.training import loop, step

  return loop.run(config, workdir, step.LM)


def main(argv=None):
  # The loop (jax, TensorFlow) is imported only after the flags parsed: config errors first.
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  cli.exit_when_done(main)
