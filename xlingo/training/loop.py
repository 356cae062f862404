"""The one training loop shared by pretraining, adaptation and distillation.

An objective (``xlingo.training.step.Objective``) says what differs: the loss, any extra
(frozen) tree the step needs, such as a teacher's parameters, and how the initial parameters are
obtained. The compiled step is built in ``xlingo.training.step``; everything else (mesh, data,
state, logging, evaluation, checkpoints, preemption) lives here once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlingo import paths, preemption, sharding
from xlingo.data import inputs, iterator, pairs
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError, NonFiniteError, XlingoError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import contrastive, layout, load, metrics
from xlingo.training import state as state_lib
from xlingo.training import step as step_lib
from xlingo.training import workdir as workdir_lib

FINISHED_MARKER = "xlingo: training finished"
LN2 = math.log(2.0)


# --- host side ------------------------------------------------------------------------------


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


class TokenCounter:
  """Cumulative tokens per language of the batches trained on (``tokens/<lang>``: padding
  excluded, a pair's source counted for the source's language), kept in the training
  iterator's saved state (``counters``)."""

  KEY = "tokens_per_language"

  def __init__(self, codes, train_it):
    self.codes, self.it = list(codes), train_it
    self.total = np.zeros(len(self.codes), np.int64)

  def restored(self) -> None:
    """Take up the counts of a restored iterator state."""
    saved = self.it.counters.get(self.KEY, {})
    self.total = np.array([int(saved.get(c, 0)) for c in self.codes], np.int64)

  def add(self, window) -> dict:
    """Add a log window's per-language tokens; returns the metrics."""
    self.total += np.asarray(window, np.int64)
    return {f"tokens/{c}": int(n) for c, n in zip(self.codes, self.total, strict=True)}

  def keep(self, pending) -> None:
    """Put the counts (plus ``pending``, the unlogged steps' device sums) in the iterator's
    state before it is saved."""
    total = self.total + (0 if pending is None else np.asarray(jax.device_get(pending), np.int64))
    self.it.counters[self.KEY] = {c: int(n) for c, n in zip(self.codes, total, strict=True)}


def evaluate_batches(eval_step, params, val_batches: dict, codes, batch_sh, extra) -> dict:
  """val/loss[/<lang>] and val/bpb[/<lang>] over fixed per-language validation batches.

  ``eval_step`` is the jitted :func:`make_eval_step`; ``val_batches`` maps a language to its
  host batches (``inputs.eval_batches``). Each language's sums count only its own tokens
  (a batch of one language may hold a translation task's source tokens of another). Shared by
  the loop's periodic evaluation and ``xlingo.evaluate``, so both report the same numbers.
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
  return {} if totals is None else language_scalars(totals, codes, prefix="val/")


def check_workdir(workdir: str) -> None:
  """Refuse an unusable ``--workdir`` before anything is written; nothing is created here (the
  workdir lock creates the directory, and removes it again if the run fails at once)."""
  wd = paths.resolve(workdir)
  probe_name = f".xlingo_write_test.{socket.gethostname()}.{os.getpid()}.{jax.process_index()}"
  if paths.is_remote(wd):
    probe = paths.join(wd, probe_name)
    try:
      paths.write_text(probe, "ok")
      paths.remove(probe)
    except Exception as e:  # noqa: BLE001 - whatever the store answers, the workdir is unusable
      msg = (str(e).strip().splitlines() or [""])[0][:200]
      raise ConfigError(f"--workdir {wd} is not writable ({type(e).__name__}: {msg}); check the "
                        "bucket's name and this machine's access to it") from None
    return
  if paths.exists(wd) and not paths.isdir(wd):
    raise ConfigError(f"--workdir {wd} is a file, not a directory; choose another --workdir or "
                      "move the file away")
  parent = wd
  while not paths.exists(parent):
    parent = paths.dirname(parent)
  if not paths.isdir(parent):
    raise ConfigError(f"--workdir {wd} is not writable: {parent} is a file, not a directory; "
                      "choose another --workdir")
  # One probe per process: hosts sharing a workdir must not remove each other's.
  probe = paths.join(parent, probe_name)
  try:
    paths.write_text(probe, "ok")
    paths.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {wd} is not writable ({e.strerror} in {parent}); choose "
                      "another --workdir or fix its permissions") from None


def validate_config(config) -> None:
  t = config.train
  for key in ("steps", "batch_size", "microbatches", "log_every", "eval_every"):
    if int(t[key]) < 1:
      raise ConfigError(f"train.{key}={t[key]} must be >= 1")
  c = config.checkpoint
  if c.every_steps < 1:
    raise ConfigError(f"checkpoint.every_steps={c.every_steps} must be >= 1")
  if c.keep < 1:
    raise ConfigError(f"checkpoint.keep={c.keep} must be >= 1 (the checkpoints kept; the newest "
                      "is always among them)")
  if c.restore_step < 0:
    raise ConfigError(f"checkpoint.restore_step={c.restore_step} must be >= 0 (0: the latest)")
  if t.batch_size % t.microbatches:
    raise ConfigError(f"train.batch_size={t.batch_size} does not divide into "
                      f"train.microbatches={t.microbatches}; use a divisor")
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                      f"{config.model.max_len}; raise model.max_len or shorten data.seq_len")
  step_lib.check_objective_config(config)


@dataclasses.dataclass
class Setup:
  """What the loop builds before the first step (tools load models with training/load.py)."""

  config: Any
  mesh: Any
  rules: Any
  model: Any
  plan: inputs.InputPlan
  factory: state_lib.StateFactory
  byte_table: jax.Array


def build(config) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_batch_divisible(config.train.batch_size // config.train.microbatches, mesh)
  contrastive.check_mesh(config, mesh)
  spec = peft.spec_from_config(config)
  model = decoder_lib.Decoder(config.model, spec)
  plan = inputs.plan_inputs(config)
  factory = state_lib.StateFactory(model, config, mesh, rules)
  peft.check_lora_targets([sharding.path_str(p) for p, _ in
                           jax.tree_util.tree_leaves_with_path(factory.params_abstract)], spec)
  byte_table = jnp.asarray(xvocab.vocab_byte_lengths(plan.vocab))
  return Setup(config, mesh, rules, model, plan, factory, byte_table)


def run(config, workdir: str, objective: step_lib.Objective = step_lib.LM_OBJECTIVE) -> dict:
  """Train until ``train.steps``, resuming from the workdir; returns the last metrics.

  One trainer per workdir (``workdir.WorkdirLock``); SIGTERM or SIGINT, even during start-up,
  stops cleanly (``preemption``); a full disk is one line naming the workdir and the space.
  """
  check_workdir(workdir)
  adopt_init_from_model(config)
  lock = workdir_lib.WorkdirLock(workdir, is_leader=jax.process_index() == 0)
  try:
    with preemption.handling() as preempt, lock:
      return _run_locked(config, workdir, objective, lock, preempt)
  except XlingoError:
    raise
  except Exception as e:
    if paths.is_disk_full(e):  # metrics, plots, best/: one line too, not a traceback
      raise ckpt_lib.disk_full_error(workdir) from None
    raise


def adopt_init_from_model(config) -> None:
  """``load.adopt_init_from_model``, saying which keys it took."""
  taken = load.adopt_init_from_model(config)
  if taken:
    metrics.console("model from checkpoint.init_from: " + ", ".join(
        f"model.{k}={config.model[k]}" for k in taken))


def _run_locked(config, workdir, objective, lock, preempt) -> dict:
  validate_config(config)
  if objective.check_config:
    objective.check_config(config)
  s = build(config)
  t = config.train
  codes = s.plan.table.codes
  num_langs = len(codes)
  run_tokens = t.steps * t.batch_size * config.data.seq_len
  metrics.console(f"xlingo {objective.name}: mesh {dict(s.mesh.shape)} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} devices, "
                  f"{jax.process_count()} process(es)")
  metrics.console(s.plan.table_text(run_tokens))
  if step_lib.loss_weights_line(config):
    metrics.console(step_lib.loss_weights_line(config))
  n_params = state_lib.param_count(s.factory.params_abstract)
  n_trained = state_lib.param_count(state_lib.trained_params(s.factory.params_abstract,
                                                             t.trainable))
  flops_tok = decoder_lib.flops_per_token(config.model, config.data.seq_len)
  trained = "" if n_trained == n_params else f" ({n_trained / 1e6:.3f} M trained)"
  metrics.console(f"model: {n_params / 1e6:.2f} M parameters{trained}, {flops_tok / 1e6:.1f} "
                  f"MFLOP per token (train)")

  ckpts = ckpt_lib.Checkpoints(workdir, config)
  train_it = inputs.train_iterator(s.plan, config)
  if getattr(train_it, "summary", ""):
    metrics.console(train_it.summary)
  extra = objective.prepare_extra(config, s.mesh, s.rules) if objective.prepare_extra else {}

  # Resume order: own checkpoint (the latest readable one, or checkpoint.restore_step) ->
  # init_from (params only) -> objective's init -> scratch. A checkpoint that does not fit the
  # config stops the run here with one line, before anything is written.
  restored = ckpts.restore_latest(s.factory.abstract_with_shardings(), train_it)
  # Cumulative training tokens per language (metrics tokens/<lang>), carried in the data
  # iterator's state so that a resumed run counts on from its checkpoint.
  delivered = TokenCounter(codes, train_it)
  if restored is not None:
    state, start = restored
    delivered.restored()
    metrics.console(f"resumed from {ckpts.directory} step {start}")
    metrics.truncate_jsonl_after(paths.join(workdir, layout.METRICS), start)
  elif config.checkpoint.init_from:
    params = load.load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                             mesh=s.mesh, rules=s.rules, model_from="config").params
    state, start = s.factory.from_params(params), 0
    metrics.console(f"initialised parameters from {config.checkpoint.init_from}")
  elif objective.initial_params is not None:
    state, start = s.factory.from_params(objective.initial_params(s.factory, config)), 0
  else:
    state, start = s.factory.init(jax.random.PRNGKey(t.seed)), 0

  batch_sh = sharding.batch_sharding(s.mesh)
  step_fn = step_lib.make_train_step(objective, s.model, config, s.factory.tx, s.byte_table,
                                    num_langs)
  eval_fn = step_lib.make_eval_step(objective, s.model, config, s.byte_table, num_langs)
  train_step, lower_s, compile_s = step_lib.compile_train_step(
      step_fn, s.factory, s.mesh, s.rules, config, extra)
  compile_s += lower_s
  eval_step = jax.jit(eval_fn)
  mem = _memory_line(train_step)
  metrics.console(f"train step compiled in {compile_s:.1f} s{mem}")
  peak, peak_src = metrics.peak_flops_per_device(t.peak_flops_per_device, config.model.dtype)
  metrics.console(f"peak {peak / 1e9:,.1f} GFLOP/s per device ({peak_src})")

  val_batches = {lang: inputs.eval_batches(s.plan, config, lang, t.eval_batches)
                 for lang in s.plan.eval_tasks}

  retrieval = _retrieval_eval(s, config, objective, batch_sh, extra)

  def evaluate(params) -> dict:
    return {**evaluate_batches(eval_step, params, val_batches, codes, batch_sh, extra),
            **retrieval(params)}

  if preempt.requested_locally():  # a signal during start-up: nothing trained, nothing to save
    ckpts.close()
    metrics.console(f"xlingo: stopped by {preempt.label} before training step {start + 1}; "
                    f"nothing new to save. Run the same command again to "
                    f"{'resume' if start else 'start'}.")
    return {}
  preemption.check_multi_process_ready()
  writer = metrics.MetricWriter(workdir, start)
  progress = metrics.Progress(t.steps, start)
  lr_fn = state_lib.learning_rate_schedule(t)
  step = start
  last: dict = {}
  if start == 0 and val_batches:
    with sharding.mesh_context(s.mesh, s.rules):
      initial = evaluate(state.params)
    writer.write(0, initial)
    last.update(initial)
    metrics.console("step      0 | " + _val_summary(initial, codes))

  acc = None
  pending_flags: list = []
  wait_s = 0.0
  t_window = time.perf_counter()
  steps_in_window = 0
  stopped_by_signal = False
  with sharding.mesh_context(s.mesh, s.rules):
    while step < t.steps:
      tw = time.perf_counter()
      batch = next(train_it)
      wait_s += time.perf_counter() - tw
      gbatch = iterator.to_global(batch, batch_sh)
      state, m = train_step(state, gbatch, extra)
      step += 1
      steps_in_window += 1
      pending_flags.append((step, m["nonfinite"]))
      acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
      is_last = step == t.steps
      stop = preempt.should_stop(step)
      save_now = step % config.checkpoint.every_steps == 0 or is_last or stop
      if step % t.log_every == 0 or is_last or save_now:
        bad = _first_nonfinite(pending_flags)
        pending_flags = []
        if bad is not None:
          ckpts.wait()
          raise NonFiniteError(_nonfinite_message(bad, ckpts.all_steps(), config, state.params))
      if step % t.log_every == 0 or is_last:
        host = jax.device_get(acc)
        elapsed = time.perf_counter() - t_window
        n = steps_in_window
        tokens = t.batch_size * config.data.seq_len * n
        scalars = language_scalars(host, codes)
        scalars.update(delivered.add(host["tokens_lang"]))
        scalars["loss"] = float(host["loss"] / n)
        scalars["grad_norm"] = float(host["grad_norm"] / n)
        for k, v in host.items():
          if k.endswith("_sum") and np.ndim(v) == 0:
            scalars[k[:-4]] = float(v / max(float(host["total_weight"]), 1.0))
        scalars["learning_rate"] = float(lr_fn(step))
        scalars["step_time_s"] = elapsed / n
        scalars["tokens_per_s"] = tokens / elapsed
        scalars["mfu"] = flops_tok * tokens / elapsed / (peak * jax.device_count())
        scalars["input_wait_s"] = wait_s / n
        scalars["input_wait_frac"] = wait_s / elapsed
        writer.write(step, scalars)
        metrics.console(progress.line(step, scalars))
        last.update(scalars)
        acc, wait_s, steps_in_window = None, 0.0, 0
        t_window = time.perf_counter()
      if step % t.eval_every == 0 or is_last:
        val = evaluate(state.params)
        writer.write(step, val)
        last.update(val)
        metrics.console(f"step {step:>6} | " + _val_summary(val, codes))
        if objective.on_eval is not None and objective.on_eval(step, val):
          ckpt_lib.save_best(workdir, config, state, step)
        if objective.should_stop is not None and objective.should_stop() and not is_last:
          metrics.console(f"xlingo: {objective.name} stops early at step {step}")
          writer.flush()
          lock.check()
          delivered.keep(None if acc is None else acc["tokens_lang"])
          ckpts.save(step, state, train_it, force=True)
          break
        t_window = time.perf_counter()
      if save_now:
        writer.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint
        lock.check()
        delivered.keep(None if acc is None else acc["tokens_lang"])
        ckpts.save(step, state, train_it, force=True)
      if stop and not is_last:
        stopped_by_signal = True
        break
  ckpts.close()
  writer.close()
  if stopped_by_signal:
    how = "preempted" if preempt.label == "SIGTERM" else "interrupted"
    metrics.console(f"xlingo: {how} ({preempt.label}) at step {step}; checkpoint saved. Run the "
                    "same command again to resume.")
    return last
  png = metrics.plot_languages(workdir, codes)
  if png:
    metrics.console(f"per-language curves: {png}")
  metrics.console(FINISHED_MARKER)
  return last


def _retrieval_eval(s: Setup, config, objective, batch_sh, extra):
  """params -> val/retrieval/* on the held-out pairs of train.contrastive.pairs (none: {})."""
  if not contrastive.measures(config):
    return lambda params: {}
  sets = pairs.validation_sets(s.plan, config)
  embed = step_lib.make_embed_step(objective, s.model, config, s.mesh)
  return lambda params: contrastive.retrieval_metrics(
      lambda p, b: embed(p, b, extra), params, sets, lambda b: iterator.to_global(b, batch_sh))


def _nonfinite_message(bad: int, kept: list[int], config, params) -> str:
  """The NaN stop's one line, with a way out that works: the newest checkpoints may already
  hold diverging (finite but huge) parameters, so it names the oldest kept step to restore."""
  t = config.train
  fix = f"--config.train.learning_rate=<lower than {t.learning_rate:g}>"
  if not t.grad_clip:
    fix += " (or --config.train.grad_clip=1.0)"
  head = f"non-finite loss or gradient at step {bad}; stopping."
  if not kept:
    return f"{head} No checkpoint was saved before it; run again with {fix}"
  top = float(jax.jit(lambda p: jnp.max(jnp.stack(
      [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(p)])))(params))
  return (f"{head} Checkpoints kept: steps {', '.join(map(str, kept))} (the newest may already "
          f"hold diverging parameters: max |param| is now {top:.3g}); resume from the oldest "
          f"with --config.checkpoint.restore_step={kept[0]} {fix}")


def _first_nonfinite(flags) -> int | None:
  for step, f in flags:
    if int(jax.device_get(f)):
      return step
  return None


def _val_summary(val: dict, codes) -> str:
  parts = [f"{c} {val[f'val/bpb/{c}']:.3f}" for c in codes if f"val/bpb/{c}" in val]
  head = f"val bpb {val['val/bpb']:.3f} | " if "val/bpb" in val else ""
  return head + " ".join(parts)


def _memory_line(compiled) -> str:
  try:
    ma = compiled.memory_analysis()
    if ma is None:
      return ""
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    return f"; per-device memory {total / 2**20:.1f} MiB (temp {ma.temp_size_in_bytes / 2**20:.1f})"
  except Exception:  # noqa: BLE001 - not every backend reports it
    return ""
