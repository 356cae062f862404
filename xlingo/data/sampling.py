"""Temperature-balanced samples of text by language, for training and extending a vocabulary,
and the ``--input LANG=GLOB`` files they are drawn from.

Language ``l`` with ``n_l`` lines gets a share of the sample proportional to
``n_l ** (1 / T)``, as in mBERT/XLM/mT5, so that small languages are not drowned by large ones
(``T = 1`` keeps the natural proportions, a large ``T`` tends to uniform).
"""

from __future__ import annotations

import random

from xlingo import paths
from xlingo.errors import VocabError


def expand_globs(lang_to_globs: dict[str, list[str]]) -> dict[str, list[str]]:
  """``{lang: [file]}`` from ``{lang: [glob]}`` (local or gs://); VocabError when a glob
  matches no file, or when no language is given."""
  if not lang_to_globs:
    raise VocabError("no --input; give the text as --input LANG='GLOB'")
  out = {}
  for lang, patterns in lang_to_globs.items():
    files = []
    for pattern in patterns:
      matched = [p for p in paths.glob(pattern) if paths.isfile(p)]
      if not matched:
        raise VocabError(f"--input {lang}={pattern} matches no file; check the path or glob")
      files.extend(matched)
    out[lang] = files
  return out


def sampling_rates(counts: dict[str, int], temperature: float) -> dict[str, float]:
  """Share of each language in the training text: ``n ** (1/T)`` normalised to sum to 1."""
  if temperature <= 0:
    raise VocabError(f"temperature must be > 0, got {temperature}")
  if not counts or any(n <= 0 for n in counts.values()):
    raise VocabError(f"every language needs at least one line, got {counts}")
  weights = {lang: n ** (1.0 / temperature) for lang, n in counts.items()}
  total = sum(weights.values())
  return {lang: w / total for lang, w in weights.items()}


def sample_counts(counts: dict[str, int], temperature: float, budget: int) -> dict[str, int]:
  """Lines to draw per language for a ``budget`` of lines (at least one each)."""
  rates = sampling_rates(counts, temperature)
  return {lang: max(1, round(rate * budget)) for lang, rate in rates.items()}


def balanced_sample(
    lang_to_lines: dict[str, list[str]], temperature: float, budget: int, seed: int = 0
) -> dict[str, list[str]]:
  """Temperature-balanced sample: big languages subsampled, small ones repeated."""
  counts = {lang: len(lines) for lang, lines in lang_to_lines.items()}
  targets = sample_counts(counts, temperature, budget)
  out = {}
  for lang in sorted(lang_to_lines):
    lines = list(lang_to_lines[lang])
    random.Random(f"{seed}:{lang}").shuffle(lines)
    target = targets[lang]
    reps, rest = divmod(target, len(lines))
    out[lang] = lines * reps + lines[:rest]
  return out
