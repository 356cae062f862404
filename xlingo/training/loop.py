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
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlingo import sharding
from xlingo.data import inputs, pipeline
from xlingo.errors import ConfigError, NonFiniteError
from xlingo.model import decoder as decoder_lib
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import metrics
from xlingo.training import state as state_lib
from xlingo.training import step as step_lib

FINISHED_MARKER = "xlingo: training finished"
LN2 = math.log(2.0)


# --- host side ------------------------------------------------------------------------------


def language_scalars(sums: dict, codes, prefix: str = "") -> dict:
  """Per-language means and bits per byte from the summed arrays."""
  out = {}
  w = np.asarray(sums["weight_lang"])
  b = np.asarray(sums["bytes_lang"])
  for key, v in sums.items():
    if not key.endswith("_lang") or key in ("weight_lang", "bytes_lang"):
      continue
    name = key[: -len("_lang")]
    v = np.asarray(v)
    for i, code in enumerate(codes):
      if w[i] > 0:
        out[f"{prefix}{name}/{code}"] = float(v[i] / w[i])
        if name == "loss" and b[i] > 0:
          out[f"{prefix}bpb/{code}"] = float(v[i] / (LN2 * b[i]))
  if w.sum() > 0 and "loss_lang" in sums:
    out[f"{prefix}loss"] = float(np.asarray(sums["loss_lang"]).sum() / w.sum())
    if b.sum() > 0:
      out[f"{prefix}bpb"] = float(np.asarray(sums["loss_lang"]).sum() / (LN2 * b.sum()))
  return out


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
      r = eval_step(params, pipeline.to_global(b, batch_sh), extra)
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
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing a workdir must not remove each other's.
    probe = os.path.join(workdir, f".xlingo_write_test.{os.getpid()}.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another "
                      "--workdir or fix its permissions") from None


def validate_config(config) -> None:
  t = config.train
  for key in ("steps", "batch_size", "microbatches", "log_every", "eval_every"):
    if int(t[key]) < 1:
      raise ConfigError(f"train.{key}={t[key]} must be >= 1")
  if config.checkpoint.every_steps < 1:
    raise ConfigError(f"checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1")
  if t.batch_size % t.microbatches:
    raise ConfigError(f"train.batch_size={t.batch_size} does not divide into "
                      f"train.microbatches={t.microbatches}; use a divisor")
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                      f"{config.model.max_len}; raise model.max_len or shorten data.seq_len")


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *a):
    signal.signal(signal.SIGTERM, self._old or signal.SIG_DFL)

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))


@dataclasses.dataclass
class Setup:
  """What the loop builds before the first step (also used by evaluate/generate tools)."""

  config: Any
  mesh: Any
  rules: Any
  model: Any
  plan: inputs.InputPlan
  factory: state_lib.StateFactory
  byte_table: jax.Array


def build(config, objective: step_lib.Objective | None = None) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_batch_divisible(config.train.batch_size // config.train.microbatches, mesh)
  model = decoder_lib.Decoder(config.model)
  plan = inputs.plan_inputs(config)
  factory = state_lib.StateFactory(model, config, mesh, rules,
                                   objective.param_extension if objective else None)
  byte_table = jnp.asarray(pipeline.vocab_byte_lengths(plan.vocab))
  return Setup(config, mesh, rules, model, plan, factory, byte_table)


def run(config, workdir: str, objective: step_lib.Objective = step_lib.LM_OBJECTIVE) -> dict:
  """Train until ``train.steps``, resuming from the workdir; returns the last metrics."""
  validate_config(config)
  if objective.check_config:
    objective.check_config(config)
  check_workdir(workdir)
  s = build(config, objective)
  t = config.train
  codes = s.plan.table.codes
  num_langs = len(codes)
  run_tokens = t.steps * t.batch_size * config.data.seq_len
  metrics.console(f"xlingo {objective.name}: mesh {dict(s.mesh.shape)} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} devices, "
                  f"{jax.process_count()} process(es)")
  metrics.console(s.plan.table_text(run_tokens))
  n_params = state_lib.param_count(s.factory.params_abstract)
  flops_tok = decoder_lib.flops_per_token(config.model, config.data.seq_len)
  metrics.console(f"model: {n_params / 1e6:.2f} M parameters, {flops_tok / 1e6:.1f} MFLOP "
                  f"per token (train)")

  ckpts = ckpt_lib.Checkpoints(workdir, config)
  train_it = inputs.train_iterator(s.plan, config)
  extra = objective.prepare_extra(config, s.mesh, s.rules) if objective.prepare_extra else {}

  # Resume order: own checkpoint -> init_from (params only) -> objective's init -> scratch.
  restored = ckpts.restore_latest(s.factory.abstract_with_shardings(), train_it)
  if restored is not None:
    state, start = restored
    metrics.console(f"resumed from {ckpts.directory} step {start}")
    metrics.truncate_jsonl_after(os.path.join(workdir, "metrics.jsonl"), start)
  elif config.checkpoint.init_from:
    rng = jax.random.PRNGKey(t.seed)
    params = ckpt_lib.restore_params(
        config.checkpoint.init_from, s.factory.model_abstract_with_shardings(), config,
        init_fresh=lambda name: s.factory.init_model_param(rng, name))
    state, start = s.factory.from_model_params(params, rng), 0
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

  def evaluate(params) -> dict:
    return evaluate_batches(eval_step, params, val_batches, codes, batch_sh, extra)

  writer = metrics.MetricWriter(workdir)
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
  with _Preemption() as preempt, sharding.mesh_context(s.mesh, s.rules):
    while step < t.steps:
      tw = time.perf_counter()
      batch = next(train_it)
      wait_s += time.perf_counter() - tw
      gbatch = pipeline.to_global(batch, batch_sh)
      state, m = train_step(state, gbatch, extra)
      step += 1
      steps_in_window += 1
      pending_flags.append((step, m["nonfinite"]))
      acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
      is_last = step == t.steps
      stop = preempt.should_stop()
      save_now = step % config.checkpoint.every_steps == 0 or is_last or stop
      if step % t.log_every == 0 or is_last or save_now:
        bad = _first_nonfinite(pending_flags)
        pending_flags = []
        if bad is not None:
          ckpts.wait()
          kept = ckpts.latest_step()
          raise NonFiniteError(
              f"non-finite loss or gradient at step {bad}; stopping. The last good checkpoint "
              f"(step {kept}) is kept; lower train.learning_rate or enable train.grad_clip")
      if step % t.log_every == 0 or is_last:
        host = jax.device_get(acc)
        elapsed = time.perf_counter() - t_window
        n = steps_in_window
        tokens = t.batch_size * config.data.seq_len * n
        scalars = language_scalars(host, codes)
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
          _save_best(workdir, config, state, step)
        if objective.should_stop is not None and objective.should_stop() and not is_last:
          metrics.console(f"xlingo: {objective.name} stops early at step {step}")
          ckpts.save(step, state, train_it, force=True)
          break
        t_window = time.perf_counter()
      if save_now:
        ckpts.save(step, state, train_it, force=True)
      if stop and not is_last:
        stopped_by_signal = True
        break
  ckpts.close()
  writer.close()
  if stopped_by_signal:
    metrics.console(f"xlingo: preempted (SIGTERM) at step {step}; checkpoint saved. Run the "
                    "same command again to resume.")
    return last
  png = metrics.plot_languages(workdir, codes)
  if png:
    metrics.console(f"per-language curves: {png}")
  metrics.console(FINISHED_MARKER)
  return last


def _first_nonfinite(flags) -> int | None:
  for step, f in flags:
    if int(jax.device_get(f)):
      return step
  return None


def _save_best(workdir, config, state, step) -> None:
  """Keep the best-so-far state (early stopping) in WORKDIR/best, replacing the previous."""
  import orbax.checkpoint as ocp

  path = os.path.join(os.path.abspath(workdir), "best")
  ckptr = ocp.StandardCheckpointer()
  tmp = path + ".tmp"
  if os.path.exists(tmp):
    import shutil

    shutil.rmtree(tmp)
  ckptr.save(os.path.join(tmp, "state"), state)
  ckptr.wait_until_finished()
  with open(os.path.join(tmp, "step"), "w") as f:
    f.write(str(step))
  if os.path.exists(path):
    import shutil

    shutil.rmtree(path)
  os.replace(tmp, path)


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
