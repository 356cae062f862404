"""What a run says when its storage fails: one line each, never Orbax's chained tracebacks.

A full disk names the workdir, the free space and a checkpoint's size, and what was kept; a
storage error that is being retried (``paths.Retrying``) is one line per retry; when the
retries give up, the line ends with the command that resumes (``resume_command``).
"""

from __future__ import annotations

import logging
import shlex
import sys

from xlingo import paths
from xlingo.errors import CheckpointError
from xlingo.training import layout


class _DropDiskFullRecords(logging.Filter):
  """Orbax logs a failed background save with its traceback (six chained ones for a full
  disk) before the error reaches the loop, which reports a full disk as one line; a storage
  error that is retried (``paths.Retrying``) is reported in one line per retry."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and (paths.is_disk_full(exc) or paths.is_transient(exc)))
                or "No space left on device" in record.getMessage())


def quiet_disk_full_logs() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropDiskFullRecords) for f in absl_logger.filters):
    absl_logger.addFilter(_DropDiskFullRecords())


def report_retry(what: str, cause: str, waited_s: float, left_s: float) -> None:
  print(f"xlingo: {what} failed ({cause}); retrying for up to {left_s:.0f} s more",
        flush=True)


def resume_command() -> str:
  """This process's own command line, which resumes the run (``python -m xlingo.train ...``)."""
  return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def disk_full_error(workdir: str, need_bytes: int | None = None) -> CheckpointError:
  """The one line for 'no space left on device' while a run writes to its workdir."""
  wd = paths.resolve(workdir)
  ck = paths.join(wd, layout.CHECKPOINTS)
  steps = sorted(int(n) for n in paths.listdir(ck) if n.isdigit())
  if steps:  # the state alone undercounts: the data state can be larger
    need_bytes = max(need_bytes or 0, paths.tree_size(paths.join(ck, str(steps[-1]))))
  free = paths.free_bytes(wd)
  mib = lambda b: f"{b / 2**20:,.0f} MiB"
  space = (f"a checkpoint of this run needs about {mib(need_bytes)}" if need_bytes
           else "a checkpoint needs more than that")
  free_txt = f"{mib(free)} free there" if free is not None else "the store is full"
  kept = (f"the last complete checkpoint (step {steps[-1]}) is kept" if steps
          else "no checkpoint had been saved yet")
  return CheckpointError(
      f"disk full while writing to --workdir {wd} ({free_txt}; {space}); {kept}. Free space "
      "(or copy the workdir to a larger disk) and run the same command again to resume")
