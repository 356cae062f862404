"""Language sampling rates, their schedule, replay, mixture registration and the start-of-run
table. The rate functions are pure: sizes and settings in, one rate per task out.

Temperature sampling (XLM, mT5): p_l ∝ n_l^(1/T), n_l the task's examples. T = 1 follows the
data, T → ∞ is uniform; mT5 used T = 3.33 (alpha = 0.3). The same as
``seqio.mixing_rate_num_examples(temperature=T)`` (a test checks), computed here from the
counts so that the rates at any temperature of a schedule are one expression.

UniMax (Chung et al., 2023): spread the run's token budget uniformly over languages, but give no
language more than ``max_epochs`` passes over its data; what a small language cannot take is
shared among the larger ones. It stands on exact token counts (counts.py).

Temperature schedule (``data.temperature_schedule``): ((fraction of the run, T), ...) points;
between two points 1/T moves linearly (the rates' exponent), before the first and after the
last it stays. The fraction is of the run's tokens read (inputs.py's scheduled reader).

Replay (``adapt.replay_ratio`` = r): the tasks of the languages not adapted to take together a
share r of the examples drawn, the adapted-to tasks (LM and translation) 1 - r, each group
keeping its rates' proportions.

Rates are example-sampling rates, one per task, normalised to sum to 1, of the examples trained
(a pair dropped for a source that fills a row, or a JSON record without text, is not one:
the streams draw lines at rate x TaskStats.lines_per_example). ``language_weights`` multiply
them before replay and normalisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import seqio

from xlingo.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TaskStats:
  """Sizes of one task's train split, as training reads it (counts.SplitCounts)."""

  name: str
  lang: str  # the language trained on (a pair's target)
  examples: int  # examples (lines) in the split, as the streams draw them
  tokens: int  # the tokens trained (sources and EOS included; pairs cut to a row)
  src_lang: str = ""  # a conditional task's source language
  source_tokens: int = 0
  truncated: int = 0  # pairs cut in their target to fit data.seq_len
  cut_tokens: int = 0  # target tokens not trained (cut, or in dropped pairs)
  dropped: int = 0  # lines that train nothing (a pair whose source fills a row, a JSON record
  # without text)
  exact: bool = True  # False: scaled from a sample (counts.py)
  validation: bool = True  # validation data: the language's text, or a pair's own pairs

  @property
  def kept(self) -> int:
    """Examples trained (rates and shares are of these)."""
    return max(self.examples - self.dropped, 0)

  @property
  def tokens_per_example(self) -> float:
    return self.tokens / max(self.kept, 1)

  @property
  def lines_per_example(self) -> float:
    """Lines a stream draws per example trained: a rate of examples over this is the rate at
    which its lines are drawn."""
    return self.examples / max(self.kept, 1)


# --- rates -----------------------------------------------------------------------------------


def check_temperature(t: float, key: str = "data.temperature") -> None:
  if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
    raise ConfigError(
        f"{key}={t!r} must be a positive number (1 = proportional to size, 3.33 = mT5, large = "
        f"uniform); set --config.{key}")


def normalised(rates: Mapping[str, float]) -> dict[str, float]:
  total = sum(rates.values())
  if total <= 0:
    raise ConfigError("every task has rate 0; check data.language_weights")
  return {k: v / total for k, v in rates.items()}


def temperature_rates(examples: Mapping[str, float], temperature: float) -> dict[str, float]:
  """p ∝ n^(1/T) over tasks' example counts."""
  check_temperature(temperature)
  return normalised({k: float(n) ** (1.0 / temperature) for k, n in examples.items()})


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
  return normalised({s.name: budgets[s.name] / max(s.tokens_per_example, 1e-9) for s in stats})


def with_replay(rates: Mapping[str, float], replay: Sequence[str],
                ratio: float) -> dict[str, float]:
  """Rates where the tasks in ``replay`` take together a share ``ratio`` of the examples and
  the others ``1 - ratio``, each group in its own proportions."""
  if not replay or not ratio:
    return normalised(rates)
  if not 0.0 < ratio < 1.0:
    raise ConfigError(f"adapt.replay_ratio={ratio} must be in [0, 1)")
  rep = set(replay)
  r_sum = sum(v for k, v in rates.items() if k in rep)
  t_sum = sum(v for k, v in rates.items() if k not in rep)
  if r_sum <= 0 or t_sum <= 0:
    raise ConfigError("adapt.replay_ratio > 0 needs tasks both to adapt to and to replay with "
                      "rate > 0; check data.train_languages and data.language_weights")
  return {k: (ratio * v / r_sum if k in rep else (1.0 - ratio) * v / t_sum)
          for k, v in rates.items()}


@dataclasses.dataclass(frozen=True)
class RateRule:
  """How rates are computed from the task sizes (the data config, resolved)."""

  sampling: str = "temperature"
  temperature: float = 3.33
  budget_tokens: float = 0.0
  unimax_max_epochs: float = 4.0
  weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # by language
  replay: tuple = ()  # task names replayed
  replay_ratio: float = 0.0

  def rates(self, stats: Sequence[TaskStats], temperature: float | None = None):
    """Normalised example-sampling rate per task (``temperature``: instead of the rule's)."""
    if self.sampling == "temperature":
      raw = temperature_rates({s.name: s.kept for s in stats},
                              self.temperature if temperature is None else temperature)
    elif self.sampling == "unimax":
      raw = unimax_rates(stats, self.budget_tokens, self.unimax_max_epochs)
    else:
      raise ConfigError(f"data.sampling={self.sampling!r} is unknown; use 'temperature' or "
                        "'unimax'")
    if self.weights:
      raw = {s.name: raw[s.name] * float(self.weights.get(s.lang, 1.0)) for s in stats}
    return with_replay(normalised(raw), self.replay, self.replay_ratio)


def compute_rates(stats: Sequence[TaskStats], *, sampling: str, temperature: float,
                  budget_tokens: float, unimax_max_epochs: float,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
  """Normalised example-sampling rate per task; ``weights`` (by language) multiply the rates."""
  return RateRule(sampling, temperature, budget_tokens, unimax_max_epochs,
                  dict(weights or {})).rates(stats)


# --- the temperature schedule ---------------------------------------------------------------


def check_schedule(schedule, sampling: str) -> tuple[tuple[float, float], ...]:
  """``data.temperature_schedule`` as ((fraction, T), ...), checked; () for none."""
  if not schedule:
    return ()
  example = "e.g. --config.data.temperature_schedule='((0, 1.0), (1, 3.33))'"
  try:
    points = tuple((float(f), float(t)) for f, t in schedule)
  except (TypeError, ValueError):
    raise ConfigError(f"data.temperature_schedule={schedule!r} must be (fraction of the run, "
                      f"temperature) pairs; {example}") from None
  if sampling != "temperature":
    raise ConfigError(f"data.temperature_schedule is for data.sampling='temperature', not "
                      f"{sampling!r}; leave it empty or sample by temperature")
  fracs = [f for f, _ in points]
  if any(not 0.0 <= f <= 1.0 for f in fracs) or fracs != sorted(fracs):
    raise ConfigError(f"data.temperature_schedule={schedule!r}: fractions of the run must rise "
                      f"from 0 to 1; {example}")
  for _, t in points:
    check_temperature(t, "data.temperature_schedule")
  return points


def temperature_at(schedule: Sequence[tuple[float, float]], x: float) -> float:
  """The schedule's temperature at fraction ``x`` of the run (1/T linear between points; a
  point repeated at one fraction is a step, taken at that fraction)."""
  if x < schedule[0][0]:
    return schedule[0][1]
  for (f0, t0), (f1, t1) in zip(schedule[:-1], schedule[1:], strict=True):
    if x < f1:
      a = (x - f0) / (f1 - f0)
      return 1.0 / ((1.0 - a) / t0 + a / t1)
  return schedule[-1][1]


def token_shares(stats: Sequence[TaskStats], rates: Mapping[str, float]) -> dict[str, float]:
  """Each task's share of the tokens drawn at these example rates."""
  return normalised({s.name: rates[s.name] * s.tokens_per_example for s in stats})


@dataclasses.dataclass(frozen=True)
class Plan:
  """The rates over a run: fixed, or moving with a temperature schedule."""

  stats: tuple
  rule: RateRule
  run_tokens: float
  schedule: tuple = ()
  points: int = 201  # fractions of the run the schedule's shares are averaged over

  def rates_at(self, x: float) -> dict[str, float]:
    """Example rates at fraction ``x`` of the run's tokens."""
    if not self.schedule:
      return self.rule.rates(self.stats)
    return self.rule.rates(self.stats, temperature_at(self.schedule, x))

  def _grid(self, x0: float, x1: float) -> np.ndarray:
    if not self.schedule:
      return np.array([0.0])
    return x0 + (x1 - x0) * (np.arange(self.points) + 0.5) / self.points

  def task_tokens(self, x0: float = 0.0, x1: float = 1.0) -> dict[str, float]:
    """Tokens each task gets between fractions x0 and x1 of the run (token shares averaged
    over the schedule: a fraction of the run is a fraction of its tokens)."""
    grid = self._grid(x0, x1)
    total = {s.name: 0.0 for s in self.stats}
    for x in grid:
      for k, v in token_shares(self.stats, self.rates_at(float(x))).items():
        total[k] += v / len(grid)
    return {k: v * self.run_tokens * (x1 - x0) for k, v in total.items()}

  def epochs(self) -> dict[str, float]:
    """Expected passes over each task's train split in the run."""
    tok = self.task_tokens()
    return {s.name: tok[s.name] / max(s.tokens, 1) for s in self.stats}

  def shares(self, x0: float = 0.0, x1: float = 1.0) -> dict[str, dict[str, float]]:
    """Planned shares by language between fractions x0 and x1 of the run:
    ``example_share`` (examples drawn, by the language trained on) and ``token_share`` (tokens,
    a pair's source counted for the source's language, as the batches' language ids have it)."""
    tok = self.task_tokens(x0, x1)
    ex: dict[str, float] = {}
    tk: dict[str, float] = {}
    for s in self.stats:
      ex[s.lang] = ex.get(s.lang, 0.0) + tok[s.name] / max(s.tokens_per_example, 1e-9)
      src = tok[s.name] * s.source_tokens / max(s.tokens, 1)
      tk[s.lang] = tk.get(s.lang, 0.0) + tok[s.name] - src
      if s.src_lang:
        tk[s.src_lang] = tk.get(s.src_lang, 0.0) + src
    return {"example_share": normalised(ex), "token_share": normalised(tk)}


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
  """Expected passes over each task's data when ``run_tokens`` tokens are drawn at ``rates``."""
  shares = token_shares(stats, rates)
  return {s.name: shares[s.name] * run_tokens / max(s.tokens, 1) for s in stats}


# --- the start-of-run table ------------------------------------------------------------------


def format_table(plan: Plan, seq_len: int = 0, no_validation: Sequence[str] = (),
                 no_validation_pairs: Sequence[str] = ()) -> str:
  """The start-of-run table (columns explained under it), then what was cut to fit a row, the
  languages and pairs without validation data, the schedule and the replay share."""
  task_tok = plan.task_tokens()
  tok_share = normalised(task_tok)
  ex_share = normalised({s.name: task_tok[s.name] / max(s.tokens_per_example, 1e-9)
                         for s in plan.stats})
  epochs = {s.name: task_tok[s.name] / max(s.tokens, 1) for s in plan.stats}
  langs = {s.name: f"{s.src_lang}>{s.lang}" if s.src_lang else s.lang for s in plan.stats}
  # Columns as wide as their longest entry: user task names and pairs can be long.
  nw = max([24, *map(len, langs)])
  lw = max([6, *map(len, langs.values())])
  header = (f"{'task':<{nw}} {'lang':<{lw}} {'examples':>9} {'tokens':>11} {'ex.share':>8} "
            f"{'tok.share':>9} {'epochs':>7} {'valid.':>6}")
  lines = [header, "-" * len(header)]
  for s in sorted(plan.stats, key=lambda s: (-ex_share[s.name], s.name)):
    mark = "" if s.exact else "~"
    lines.append(f"{s.name:<{nw}} {langs[s.name]:<{lw}} {s.examples:>9,d} "
                 f"{mark + f'{s.tokens:,d}':>11} {ex_share[s.name]:>8.3f} "
                 f"{tok_share[s.name]:>9.3f} {epochs[s.name]:>7.2f} "
                 f"{'yes' if s.validation else 'NONE':>6}")
  lines.append("examples, tokens: the train split as training reads it (every example "
               "tokenized, EOS included; ~ scaled from a sample)")
  lines.append("ex.share, tok.share: shares of the examples, tokens drawn over the run (a "
               "pair's source counts for its task)")
  lines.append(f"epochs: passes over the split in the run's {plan.run_tokens:,.0f} tokens")
  lines.append("valid.: a language's validation text (val/bpb), a pair's own validation pairs "
               "(BLEU/chrF, val/retrieval)")
  cut = [s for s in plan.stats if s.truncated or s.dropped]
  if cut:
    lines.append(f"pairs cut to fit data.seq_len={seq_len} (the source kept whole, the target "
                 "cut; a source that fills the row: the pair dropped):")
    for s in cut:
      lines.append(f"  {s.name}: {s.truncated:,d} of {s.examples:,d} pairs cut, {s.dropped:,d} "
                   f"dropped, {s.cut_tokens:,d} target tokens not trained")
  if no_validation:
    lines.append(f"no validation data for {', '.join(no_validation)}: no val/bpb for "
                 f"{'it' if len(no_validation) == 1 else 'them'} (data.file_val_patterns)")
  if no_validation_pairs:
    lines.append(f"no validation pairs for {', '.join(no_validation_pairs)}: no val/retrieval "
                 "and no BLEU/chrF on them (data.file_pair_val_patterns)")
  if plan.schedule:
    pts = ", ".join(f"{f:g}: T={t:g}" for f, t in plan.schedule)
    lines.append(f"temperature schedule ({pts}); ex.share at 0% / 50% / 100% of the run:")
    at = [plan.rates_at(x) for x in (0.0, 0.5, 1.0)]
    for s in sorted(plan.stats, key=lambda s: (-ex_share[s.name], s.name)):
      lines.append(f"  {s.name:<{nw}} " + " / ".join(f"{r[s.name]:.3f}" for r in at))
  if plan.rule.replay:
    langs = sorted({s.lang for s in plan.stats if s.name in plan.rule.replay})
    lines.append(f"replay (adapt.replay_ratio): {plan.rule.replay_ratio:g} of the examples "
                 f"from {', '.join(langs)}")
  return "\n".join(lines)


def check_epochs(stats: Sequence[TaskStats], epochs: Mapping[str, float],
                 max_epochs: float) -> None:
  """ConfigError when any task's language would be read more than ``max_epochs`` times over
  the run (``epochs``: Plan.epochs; ``data.max_epochs``; 0 or less: no bound)."""
  if not max_epochs or max_epochs <= 0:
    return
  over = sorted(((epochs[s.name], s.lang) for s in stats if epochs[s.name] > max_epochs),
                reverse=True)
  if over:
    listed = ", ".join(f"{lang} {e:,.1f}" for e, lang in over)
    raise ConfigError(
        f"planned epochs over the run exceed data.max_epochs={max_epochs:g} ({listed}); use a "
        "larger corpus for them (data.source, data.tfds_name), lower their rates "
        "(data.temperature, data.language_weights) or train.steps, or raise data.max_epochs "
        "(0 = no bound)")
