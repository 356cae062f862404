"""LM pretraining.

  python -m xlingo.train --config configs/small.py --workdir workdirs/lm [--config.KEY=VALUE]

Resumes from WORKDIR's latest checkpoint when there is one; SIGTERM saves and exits 0.
"""

import sys

from xlingo import cli


def main(argv=None):
  from xlingo.training import loop, step

  cli.run_main(argv or sys.argv, __doc__, lambda c, w: loop.run(c, w, step.LM_OBJECTIVE))


if __name__ == "__main__":
  main()
