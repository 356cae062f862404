"""The process's native streams: silencing C-level stderr around libraries that log to fd 2
(TensorFlow's start-up, the SentencePiece trainer). Shared by the command line and the data
tools, which may not import the CLI."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def native_stderr_silenced():
  """Silence the process's C-level stderr (fd 2) inside the block; Python errors still raise."""
  try:
    saved = os.dup(2)
  except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
    yield
    return
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
