"""What the training loop does besides stepping: ``(every, fn)`` hooks.

A :class:`Hook` runs ``fn(tick)`` after every ``every``-th step and after the last one (``every``
0: once, at the end of a run that finished). The loop's own are the log line (timing, MFU,
tokens per language: :class:`LogWindow`), validation (per-language bits per byte plus every
evaluator of the objective's terms: :func:`validator`, which ``xlingo.evaluate`` runs too) and
the per-language plot at the end, and the profiler's trace (:func:`profiler`); an entry point adds its own through its recipe
(``step.Recipe.hooks``: factories ``(env) -> Hook``), e.g. adaptation's best copy and early
stopping (:class:`EarlyStopping`) and its report at the end. A hook that returns True stops the
run after this step (its state is saved first, as at any stop).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlingo import paths
from xlingo.data import iterator
from xlingo.training import layout, metrics

LN2 = math.log(2.0)


@dataclasses.dataclass
class Tick:
  """The step a hook runs after; ``val`` is this step's validation once a hook has run it."""

  step: int
  state: Any
  is_last: bool
  val: dict | None = None


@dataclasses.dataclass(frozen=True)
class Hook:
  every: int  # steps between calls, and after the last step; 0: at the end of a finished run
  fn: Callable[[Tick], bool | None]

  def due(self, step: int, is_last: bool) -> bool:
    return bool(self.every) and (step % self.every == 0 or is_last)


@dataclasses.dataclass(frozen=True)
class Env:
  """What hooks may use: the run's config, workdir, languages, metric writer, the latest value
  of every metric (``last``, what the loop returns) and the best-copy writer."""

  name: str  # the recipe's: lm, adapt, distill
  config: Any
  workdir: str
  codes: list
  writer: Any
  last: dict
  save_best: Callable[[Any, int], None]


def run_due(hooks, tick: Tick) -> bool:
  """Run the hooks due at ``tick`` in order; True when one asks to stop."""
  stop = False
  for h in hooks:
    if h.due(tick.step, tick.is_last):
      stop = bool(h.fn(tick)) or stop
  return stop


def run_at_end(hooks, tick: Tick) -> None:
  for h in hooks:
    if not h.every:
      h.fn(tick)


# --- validation -----------------------------------------------------------------------------


def language_scalars(sums: dict, codes, prefix: str = "") -> dict:
  """Per-language means and bits per byte from the summed arrays."""
  out = {}
  w = np.asarray(sums["weight_lang"])
  b = np.asarray(sums["bytes_lang"])
  for key, v in sums.items():
    if not key.endswith("_lang") or key in ("weight_lang", "bytes_lang", "tokens_lang"):
      continue
    name = key[: -len("_lang")]
    v = np.asarray(v)
    # loss -> bpb, loss_nohint -> bpb_nohint: every cross-entropy also in bits per byte
    bpb = "bpb" + name[len("loss"):] if name.startswith("loss") else None
    for i, code in enumerate(codes):
      if w[i] > 0:
        out[f"{prefix}{name}/{code}"] = float(v[i] / w[i])
        if bpb and b[i] > 0:
          out[f"{prefix}{bpb}/{code}"] = float(v[i] / (LN2 * b[i]))
    if name != "loss" and w.sum() > 0:  # e.g. val/lid_acc over all languages
      out[f"{prefix}{name}"] = float(v.sum() / w.sum())
      if bpb and b.sum() > 0:
        out[f"{prefix}{bpb}"] = float(v.sum() / (LN2 * b.sum()))
  if w.sum() > 0 and "loss_lang" in sums:
    out[f"{prefix}loss"] = float(np.asarray(sums["loss_lang"]).sum() / w.sum())
    if b.sum() > 0:
      out[f"{prefix}bpb"] = float(np.asarray(sums["loss_lang"]).sum() / (LN2 * b.sum()))
  return out


def evaluate_batches(eval_step, params, val_batches: dict, codes, batch_sh, extra) -> dict:
  """val/loss[/<lang>], val/bpb[/<lang>] and val/bytes/<lang> (the bytes scored) over fixed
  per-language validation batches.

  ``eval_step`` is the jitted ``step.make_eval_step``; ``val_batches`` maps a language to its
  host batches (``inputs.validation_set``). Each language's sums count only its own tokens (a
  batch of one language may hold a translation task's source tokens of another).
  """
  num_langs = len(codes)
  totals = None
  for lang, batches in val_batches.items():
    lang_tot = None
    for b in batches:
      r = eval_step(params, iterator.to_global(b, batch_sh), extra)
      lang_tot = r if lang_tot is None else jax.tree.map(jnp.add, lang_tot, r)
    if lang_tot is None:
      continue
    lang_tot = jax.device_get(lang_tot)
    mask = np.zeros(num_langs, bool)
    mask[codes.index(lang)] = True
    masked = {k: np.where(mask, v, 0) for k, v in lang_tot.items()}
    totals = masked if totals is None else {k: totals[k] + masked[k] for k in totals}
  if totals is None:
    return {}
  out = language_scalars(totals, codes, prefix="val/")
  # the text the numbers stand for: equal across tokenizers with train.eval_max_bytes >= 0
  for i, code in enumerate(codes):
    if totals["weight_lang"][i] > 0:
      out[f"val/bytes/{code}"] = int(round(float(totals["bytes_lang"][i])))
  return out


@dataclasses.dataclass(frozen=True)
class EvalEnv:
  """Where evaluators run: the input plan (validation data), the mesh, the batch sharding, and
  the held-out split they score (``evaluate --split test``: "test")."""

  plan: Any
  mesh: Any
  batch_sharding: Any
  split: str = "validation"


def validator(objective, eval_step, val_batches: dict, codes, env: EvalEnv, extra):
  """``params -> metrics``: per-language loss and bpb (:func:`evaluate_batches`) and every
  evaluator of the objective's terms. The loop and ``xlingo.evaluate`` both validate with it,
  so they report the same numbers."""
  evaluators = [e.prepare(env) for e in objective.evaluators()]

  def evaluate(params) -> dict:
    out = evaluate_batches(eval_step, params, val_batches, codes, env.batch_sharding, extra)
    for e in evaluators:
      out.update(e(params, extra))
    return out

  return evaluate


def val_summary(val: dict, codes) -> str:
  parts = [f"{c} {val[f'val/bpb/{c}']:.3f}" for c in codes if f"val/bpb/{c}" in val]
  head = f"val bpb {val['val/bpb']:.3f} | " if "val/bpb" in val else ""
  acc = [f"{c} {100 * val[f'val/acc/{c}']:.1f}%" for c in codes if f"val/acc/{c}" in val]
  if acc:  # a task's accuracy (xlingo.finetune)
    parts.append(("| " if parts else "") + "val acc " + " ".join(acc))
  return head + " ".join(parts)


def validation(env: Env, evaluate, window: LogWindow | None = None) -> Hook:
  """Every ``train.eval_every`` steps: validate, write, print; later hooks read ``tick.val``.
  The time it takes is kept out of the next log line's step time (``window``)."""

  def fn(tick: Tick):
    tick.val = validate(env, evaluate, tick.step, tick.state.params)
    if window is not None:
      window.restart_clock()

  return Hook(int(env.config.train.eval_every), fn)


def validate(env: Env, evaluate, step: int, params) -> dict:
  val = evaluate(params)
  env.writer.write(step, val)
  env.last.update(val)
  metrics.console(f"step {step:>6} | " + val_summary(val, env.codes))
  return val


def plot(env: Env) -> Hook:
  """At the end: the per-language training loss and validation bpb curves."""

  def fn(tick: Tick):
    png = metrics.plot_languages(env.workdir, env.codes)
    if png:
      metrics.console(f"per-language curves: {png}")

  return Hook(0, fn)


def profiler(env: Env) -> Hook:
  """``train.profile_steps=(start, count)``: a ``jax.profiler`` trace of steps start+1 ..
  start+count (as the log numbers them) in WORKDIR/profile, for TensorBoard's profile plugin
  (``*.xplane.pb``) or Perfetto (``*.trace.json.gz``). The trace starts after step ``start``'s
  state is ready, so no earlier step's work shows in it, and stops once the last traced step's
  state is; a run that ends inside the window stops it at its last step. jax.profiler writes
  only local files: with a remote workdir the trace goes to a local temporary directory first
  and is copied through the path layer."""
  start, count = (int(v) for v in env.config.train.profile_steps)
  out = paths.join(env.workdir, layout.PROFILE)
  local = {}  # the directory being traced into, while a trace runs

  def fn(tick: Tick):
    if not local and tick.step == start:
      jax.block_until_ready(tick.state)
      local["dir"] = tempfile.mkdtemp(prefix="xlingo-profile-") if paths.is_remote(out) else out
      jax.profiler.start_trace(local["dir"], create_perfetto_trace=True)
    elif local and (tick.step == start + count or tick.is_last):
      jax.block_until_ready(tick.state)
      jax.profiler.stop_trace()
      if local["dir"] != out:
        paths.copy_tree(local["dir"], out)
        shutil.rmtree(local["dir"], ignore_errors=True)
      local.clear()
      metrics.console(f"profile of steps {start + 1}-{tick.step}: {out} (tensorboard --logdir "
                      f"{out}, or the .trace.json.gz in ui.perfetto.dev)")

  return Hook(1 if count else 0, fn)


# --- the log line ---------------------------------------------------------------------------


class TokenCounter:
  """Cumulative tokens and bytes per language of the batches trained on (``tokens/<lang>``:
  padding excluded, a pair's source counted for the source's language; ``bytes/<lang>``: the
  raw text bytes of the tokens the loss scored, the ``bytes_lang`` that bits per byte divide
  by), kept in the training iterator's saved state (``counters``). Runs with different
  tokenizers compare at equal text by ``bytes/<lang>``, not at equal steps or tokens."""

  KEYS = {"tokens": ("tokens_per_language", "tokens_lang"),
          "bytes": ("bytes_per_language", "bytes_lang")}

  def __init__(self, codes, train_it):
    self.codes, self.it = list(codes), train_it
    self.total = {name: np.zeros(len(self.codes), np.int64) for name in self.KEYS}

  def restored(self) -> None:
    """Take up the counts of a restored iterator state (a state saved before bytes were
    counted counts its bytes from 0)."""
    for name, (key, _) in self.KEYS.items():
      saved = self.it.counters.get(key, {})
      self.total[name] = np.array([int(saved.get(c, 0)) for c in self.codes], np.int64)

  def add(self, sums) -> dict:
    """Add a log window's per-language sums (``tokens_lang``, ``bytes_lang``); returns the
    metrics."""
    out = {}
    for name, (_, field) in self.KEYS.items():
      self.total[name] += np.rint(np.asarray(sums[field], np.float64)).astype(np.int64)
      out.update({f"{name}/{c}": int(n) for c, n in zip(self.codes, self.total[name],
                                                         strict=True)})
    return out

  def keep(self, pending) -> None:
    """Put the counts (plus ``pending``, the unlogged steps' device sums) in the iterator's
    state before it is saved."""
    pending = None if pending is None else jax.device_get(pending)
    for name, (key, field) in self.KEYS.items():
      total = self.total[name] + (0 if pending is None else
                                  np.rint(np.asarray(pending[field], np.float64)).astype(np.int64))
      self.it.counters[key] = {c: int(n) for c, n in zip(self.codes, total, strict=True)}


class LogWindow:
  """The steps since the last log line: their summed metrics, the time they took and the time
  spent waiting for input; every ``train.log_every`` steps one line of means, throughput and
  MFU (``flops_per_token`` against ``peak`` FLOP/s per device; ``peak_measured``: a matmul
  rate measured at start-up, not the hardware's peak, and the line says so)."""

  def __init__(self, env: Env, delivered: TokenCounter, start: int, flops_per_token: float,
               peak: float, peak_measured: bool = False):
    self.env, self.delivered = env, delivered
    t = env.config.train
    self.tokens_per_step = t.batch_size * env.config.data.seq_len
    self.progress = metrics.Progress(t.steps, start, mfu_measured=peak_measured)
    self.lr_fn = _lr_fn(t)
    self.flops_per_token, self.peak = flops_per_token, peak
    self.acc, self.flags = None, []
    self.restart()

  def restart(self) -> None:
    """A new window (after a log line)."""
    self.wait_s, self.steps = 0.0, 0
    self.restart_clock()

  def restart_clock(self) -> None:
    """Time from now: work that is not a step (validation) stays out of the step time."""
    self.t0 = time.perf_counter()

  def next_batch(self, it):
    t = time.perf_counter()
    batch = next(it)
    self.wait_s += time.perf_counter() - t
    return batch

  def add(self, step: int, m: dict) -> None:
    self.steps += 1
    self.flags.append((step, m["nonfinite"]))
    self.acc = m if self.acc is None else jax.tree.map(jnp.add, self.acc, m)

  def first_nonfinite(self) -> int | None:
    """The first step since the last check whose loss or gradient was not finite."""
    flags, self.flags = self.flags, []
    for step, f in flags:
      if int(jax.device_get(f)):
        return step
    return None

  def pending_tokens(self):
    """The unlogged steps' tokens and bytes per language (device sums), for the saved
    counters."""
    return None if self.acc is None else {k: self.acc[k] for k in ("tokens_lang", "bytes_lang")}

  def hook(self) -> Hook:
    return Hook(int(self.env.config.train.log_every), self.log)

  def log(self, tick: Tick) -> None:
    host = jax.device_get(self.acc)
    elapsed, n = time.perf_counter() - self.t0, self.steps
    tokens = self.tokens_per_step * n
    scalars = language_scalars(host, self.env.codes)
    scalars.update(self.delivered.add(host))
    scalars["loss"] = float(host["loss"] / n)
    scalars["grad_norm"] = float(host["grad_norm"] / n)
    terms = []  # the objective's own terms (lid_loss, contrastive_acc, kl, ce, l2_init, ...)
    for k, v in host.items():
      if k.endswith("_sum") and np.ndim(v) == 0:
        scalars[k[:-4]] = float(v / max(float(host["total_weight"]), 1.0))
        terms.append(k[:-4])
    scalars["learning_rate"] = float(self.lr_fn(tick.step))
    scalars["step_time_s"] = elapsed / n
    scalars["tokens_per_s"] = tokens / elapsed
    scalars["mfu"] = self.flops_per_token * tokens / elapsed / (self.peak * jax.device_count())
    scalars["input_wait_s"] = self.wait_s / n
    scalars["input_wait_frac"] = self.wait_s / elapsed
    self.env.writer.write(tick.step, scalars)
    # Each term's loss before its accuracy: "lid_loss 0.69 lid_acc 51.0%".
    terms.sort(key=lambda k: (k.removesuffix("_acc").removesuffix("_loss"), k.endswith("_acc")))
    metrics.console(self.progress.line(tick.step, scalars, terms=terms))
    self.env.last.update(scalars)
    self.acc = None
    self.restart()


def _lr_fn(t):
  from xlingo.training import state as state_lib

  return state_lib.learning_rate_schedule(t)


# --- the best copy and early stopping --------------------------------------------------------


class EarlyStopping:
  """A hook factory: after each validation, keep the best state (lowest ``key``) in
  WORKDIR/best and stop after ``patience`` validations without a better one (0: never)."""

  def __init__(self, key: str, patience: int):
    self.key = key
    self.patience = patience
    self.best = float("inf")
    self.best_step = None
    self.bad = 0

  def on_eval(self, step, val) -> bool:
    """True when ``val`` is the best so far (a new best copy is due)."""
    v = val.get(self.key)
    if v is None:
      return False
    if v < self.best:
      self.best, self.best_step, self.bad = v, step, 0
      return True
    self.bad += 1
    return False

  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad >= self.patience

  def replay(self, workdir: str) -> None:
    """A resumed run's best so far and its evaluations since: the validation rows of
    WORKDIR/metrics.jsonl, which the loop has cut back to the resumed checkpoint's step (a fresh
    start keeps no row past step 0, and step 0's validation is not a candidate)."""
    self.best, self.best_step, self.bad = float("inf"), None, 0
    for row in metrics.read_jsonl(paths.join(workdir, layout.METRICS)):
      if isinstance(row.get("step"), int) and row["step"] > 0:
        self.on_eval(row["step"], row)

  def __call__(self, env: Env) -> Hook:
    self.replay(env.workdir)
    if self.best_step is not None:
      metrics.console(f"xlingo: best so far {self.key}={self.best:.4f} at step "
                      f"{self.best_step} ({self.bad} evaluation(s) since)")

    def fn(tick: Tick) -> bool:
      if tick.val is None:
        return False
      if self.on_eval(tick.step, tick.val):
        env.save_best(tick.state, tick.step)
      if self.should_stop() and not tick.is_last:
        metrics.console(f"xlingo: {env.name} stops early at step {tick.step}")
        return True
      return False

    return Hook(int(env.config.train.eval_every), fn)
