"""The language table: language code <-> id, in the order of ``config.data.languages``.

That order is the model's language-embedding table, so it is appended to, never reordered.
Tools that load a model need only this (no TensorFlow, no seqio).
"""

from __future__ import annotations

from collections.abc import Sequence

from xlingo.errors import DataError


class LanguageTable:
  """Language code <-> id, in the order of ``config.data.languages``."""

  def __init__(self, codes: Sequence[str]):
    self.codes = tuple(codes)
    if len(set(self.codes)) != len(self.codes):
      raise DataError(f"data.languages has duplicates: {self.codes}; list each language once")
    self._ids = {c: i for i, c in enumerate(self.codes)}

  def id(self, code: str) -> int:
    try:
      return self._ids[code]
    except KeyError:
      raise DataError(
          f"unknown language {code!r}: not in data.languages={self.codes}; add it there "
          "(append only: the order is the model's language-embedding table)") from None

  def __len__(self):
    return len(self.codes)
