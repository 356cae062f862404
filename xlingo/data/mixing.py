"""Language sampling rates (temperature, UniMax), mixture registration and the start-of-run table.

Temperature sampling (XLM, mT5): p_l ∝ n_l^(1/T). T = 1 follows the data, T → ∞ is uniform;
mT5 used T = 3.33 (alpha = 0.3). Rates are computed by ``seqio.mixing_rate_num_examples`` from
each task's example count, so a registered mixture and the printed table agree.

UniMax (Chung et al., 2023): spread the run's token budget uniformly over languages, but give no
language more than ``max_epochs`` passes over its data; what a small language cannot take is
shared among the larger ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence

import seqio
from absl import logging as absl_logging

from xlingo.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TaskStats:
  """Sizes of one task's train split."""

  name: str
  lang: str
  examples: int
  tokens: int  # exact or estimated from a sample

  @property
  def tokens_per_example(self) -> float:
    return self.tokens / max(self.examples, 1)


def check_temperature(t: float) -> None:
  if not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
    raise ConfigError(
        f"data.temperature={t!r} must be a positive number (1 = proportional to size, "
        "3.33 = mT5, large = uniform); set --config.data.temperature")


def unimax_token_budgets(tokens: Mapping[str, float], budget: float,
                         max_epochs: float) -> dict[str, float]:
  """UniMax: per-language token budgets, uniform with at most ``max_epochs`` over each."""
  if max_epochs <= 0:
    raise ConfigError(f"data.unimax_max_epochs={max_epochs} must be > 0")
  out = {}
  remaining = float(budget)
  order = sorted(tokens, key=lambda k: tokens[k])
  for i, k in enumerate(order):
    share = remaining / (len(order) - i)
    out[k] = min(share, max_epochs * tokens[k])
    remaining -= out[k]
  return out


def unimax_rates(stats: Sequence[TaskStats], budget_tokens: float,
                 max_epochs: float) -> dict[str, float]:
  """Example-sampling rates that realise the UniMax token budgets."""
  budgets = unimax_token_budgets({s.name: s.tokens for s in stats}, budget_tokens, max_epochs)
  raw = {s.name: budgets[s.name] / s.tokens_per_example for s in stats}
  total = sum(raw.values())
  return {k: v / total for k, v in raw.items()}


def compute_rates(stats: Sequence[TaskStats], *, sampling: str, temperature: float,
                  budget_tokens: float, unimax_max_epochs: float,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
  """Normalised example-sampling rate per task; ``weights`` (by language) multiply the rates."""
  if sampling == "temperature":
    check_temperature(temperature)
    rate_fn = functools.partial(seqio.mixing_rate_num_examples, temperature=temperature)
    # Tasks are sized by their sources' example counts; seqio warns once per task about not
    # using cached statistics, which says nothing here.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
      raw = {s.name: float(rate_fn(seqio.get_mixture_or_task(s.name))) for s in stats}
    finally:
      absl_logging.set_verbosity(verbosity)
  elif sampling == "unimax":
    raw = unimax_rates(stats, budget_tokens, unimax_max_epochs)
  else:
    raise ConfigError(f"data.sampling={sampling!r} is unknown; use 'temperature' or 'unimax'")
  if weights:
    by_name = {s.name: s.lang for s in stats}
    raw = {k: v * float(weights.get(by_name[k], 1.0)) for k, v in raw.items()}
  total = sum(raw.values())
  if total <= 0:
    raise ConfigError("every task has rate 0; check data.language_weights")
  return {k: v / total for k, v in raw.items()}


def register_mixture(task_rates: Mapping[str, float], prefix: str = "xlingo.mix") -> str:
  """Register (idempotently) a mixture of the given tasks and rates; returns its name.

  A seqio mixture holds the Task objects it was made with: when a task was registered again
  since (same name, other files), the mixture is made again over the current ones.
  """
  key = ",".join(f"{k}:{v:.12g}" for k, v in sorted(task_rates.items()))
  name = f"{prefix}.{hashlib.sha1(key.encode()).hexdigest()[:12]}"
  if name in seqio.MixtureRegistry.names():
    tasks = seqio.MixtureRegistry.get(name).tasks
    if all(t.name in seqio.TaskRegistry.names() and seqio.TaskRegistry.get(t.name) is t
           for t in tasks):
      return name
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(k, float(v)) for k, v in sorted(task_rates.items())])
  return name


def epochs_over_run(stats: Sequence[TaskStats], rates: Mapping[str, float],
                    run_tokens: float) -> dict[str, float]:
  """Expected passes over each task's data when ``run_tokens`` tokens are drawn."""
  mean_tokens = sum(rates[s.name] * s.tokens_per_example for s in stats)
  examples_drawn = run_tokens / max(mean_tokens, 1e-9)
  return {s.name: rates[s.name] * examples_drawn / max(s.examples, 1) for s in stats}


def format_table(stats: Sequence[TaskStats], rates: Mapping[str, float],
                 run_tokens: float) -> str:
  """The start-of-run table: language, examples, tokens, rate and epochs over the run."""
  epochs = epochs_over_run(stats, rates, run_tokens)
  header = f"{'task':<24} {'lang':<6} {'examples':>9} {'tokens':>10} {'rate':>7} {'epochs':>8}"
  lines = [header, "-" * len(header)]
  for s in sorted(stats, key=lambda s: -rates[s.name]):
    lines.append(f"{s.name:<24} {s.lang:<6} {s.examples:>9,d} {s.tokens:>10,d} "
                 f"{rates[s.name]:>7.3f} {epochs[s.name]:>8.2f}")
  lines.append(f"run: {run_tokens:,.0f} tokens")
  return "\n".join(lines)


def check_epochs(stats: Sequence[TaskStats], rates: Mapping[str, float], run_tokens: float,
                 max_epochs: float) -> None:
  """ConfigError when any language would be read more than ``max_epochs`` times over the run
  (``data.max_epochs``; 0 or less: no bound)."""
  if not max_epochs or max_epochs <= 0:
    return
  epochs = epochs_over_run(stats, rates, run_tokens)
  over = sorted(((epochs[s.name], s.lang) for s in stats if epochs[s.name] > max_epochs),
                reverse=True)
  if over:
    listed = ", ".join(f"{lang} {e:,.1f}" for e, lang in over)
    raise ConfigError(
        f"planned epochs over the run exceed data.max_epochs={max_epochs:g} ({listed}); use a "
        "larger corpus for them (data.source, data.tfds_name), lower their rates "
        "(data.temperature, data.language_weights) or train.steps, or raise data.max_epochs "
        "(0 = no bound)")
