"""The one family of xlingo errors.

Every error xlingo raises on purpose for bad input (a config value, a data file, a vocabulary, a
checkpoint) derives from :class:`XlingoError`, and its message is one line that names the
problem and the fix. The command line (``xlingo.cli``) prints such an error as that one line and
exits with its ``exit_code``; any other exception is a bug, and its traceback is shown.
"""

from __future__ import annotations


class XlingoError(Exception):
  """Base of every deliberate xlingo error; ``exit_code`` is what the CLI exits with."""

  exit_code = 2


class ConfigError(XlingoError, ValueError):
  """A config value or command-line flag is wrong; the message names the key and the fix."""


class DataError(XlingoError, ValueError):
  """Bad data input: the message names the file or key and the fix."""


class VocabError(XlingoError, ValueError):
  """A vocabulary or its training input is unusable; the message names the path and the fix."""


class CheckpointError(XlingoError, RuntimeError):
  """A checkpoint cannot be used; the message says which and what to do."""


class StorageError(CheckpointError):
  """The storage of a workdir failed or stalled for longer than ``checkpoint.storage_retry_s``
  (or a stop request came while it was stuck). A stalled call may still hold a thread, so the
  command line exits at once after the line, without waiting for it."""

  abandons_threads = True


class NonFiniteError(XlingoError, FloatingPointError):
  """Training produced a non-finite loss or gradient; the run stops (exit code 3)."""

  exit_code = 3
