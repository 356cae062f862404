"""The one training loop shared by pretraining, adaptation and distillation.

An :class:`Objective` says what differs: the loss, any extra (frozen) tree the step needs, such
as a teacher's parameters, and how the initial parameters are obtained. Everything else (mesh,
data, state, compiled step, logging, evaluation, checkpoints, preemption) lives here once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xlingo import load, paths, sharding
from xlingo.data import inputs, iterator, packing
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError, NonFiniteError, XlingoError
from xlingo.model import decoder as decoder_lib
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import losses, metrics, preemption
from xlingo.training import state as state_lib
from xlingo.training import workdir as workdir_lib

FINISHED_MARKER = "xlingo: training finished"
LN2 = math.log(2.0)


@dataclasses.dataclass
class StepContext:
  """What a loss function may use besides params and batch."""

  model: Any
  config: Any
  deterministic: bool
  # The state's step (a traced int32) inside the train step, for loss schedules; None in eval.
  step: Any = None


# loss_fn(ctx, params, batch, rng, extra) -> (loss_sum, aux). ``loss_sum`` is summed over
# tokens (the step divides by the batch's total weight); aux holds 'per_token' (name ->
# [B, L] weighted per-token values, reported per language as name/<lang>) and scalar sums.
LossFn = Callable[..., tuple[jax.Array, dict]]


@dataclasses.dataclass
class Objective:
  name: str
  loss_fn: LossFn
  # (config, mesh, rules) -> pytree that the step receives unchanged (e.g. teacher params)
  prepare_extra: Callable[..., Any] | None = None
  # (factory, config) -> params, used instead of a fresh init when there is no checkpoint
  initial_params: Callable[..., Any] | None = None
  # called with (config) before anything is built: objective-specific config checks
  check_config: Callable[..., None] | None = None
  # after each evaluation: (step, val_metrics) -> True to save a 'best' copy (early stopping)
  on_eval: Callable[..., bool] | None = None
  # after each evaluation (and on_eval): () -> True ends the run there (early stopping)
  should_stop: Callable[[], bool] | None = None
  # parameters added beside the model's (e.g. LoRA factors); see state.ParamExtension
  param_extension: state_lib.ParamExtension | None = None


def lm_loss(ctx: StepContext, params, batch, rng, extra):
  """Next-token cross-entropy (+ z-loss, + lambda * language-ID loss)."""
  del extra
  t = ctx.config.train
  logits, lid_logits = ctx.model.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
      batch["lang_ids"], deterministic=ctx.deterministic, rngs={"dropout": rng})
  ce_sum, _, per_token = losses.cross_entropy_loss(
      logits, batch["targets"], batch["loss_weights"], z_loss=t.z_loss)
  aux = {"per_token": {"loss": per_token}}
  total = ce_sum
  if lid_logits is not None and t.lid_loss_weight:
    lid_sum, _ = losses.lid_loss(lid_logits, batch["lang_ids"], batch["loss_weights"])
    total = total + t.lid_loss_weight * lid_sum
    aux["lid_loss_sum"] = lid_sum
  return total, aux


LM_OBJECTIVE = Objective(name="lm", loss_fn=lm_loss)


# --- the compiled step ----------------------------------------------------------------------


def _per_language(aux, batch, byte_table, num_langs):
  """Sums per language: every per-token quantity, the weights, and the bytes they stand for."""
  w = batch["loss_weights"].astype(jnp.float32)
  ids = batch["lang_ids"].reshape(-1)
  seg = lambda x: jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num_langs)
  out = {f"{k}_lang": seg(v) for k, v in aux["per_token"].items()}
  out["weight_lang"] = seg(w)
  out["bytes_lang"] = seg(jnp.take(byte_table, batch["targets"]) * w)
  return out


def _sums(aux, batch, byte_table, num_langs):
  sums = {k: v for k, v in aux.items() if k != "per_token"}
  sums.update(_per_language(aux, batch, byte_table, num_langs))
  return sums


def make_train_step(objective: Objective, model, config, tx, byte_table, num_langs):
  t = config.train
  ctx = StepContext(model=model, config=config, deterministic=False)
  base_rng = jax.random.PRNGKey(t.seed)

  def step_fn(state: state_lib.TrainState, batch, extra):
    rng = jax.random.fold_in(base_rng, state.step)
    total_weight = jnp.maximum(jnp.sum(batch["loss_weights"]), 1.0)

    step_ctx = dataclasses.replace(ctx, step=state.step)

    def micro_loss(params, mb, r):
      loss_sum, aux = objective.loss_fn(step_ctx, params, mb, r, extra)
      return loss_sum / total_weight, _sums(aux, mb, byte_table, num_langs)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    m = t.microbatches
    if m == 1:
      (loss, sums), grads = grad_fn(state.params, batch, rng)
    else:
      mbs = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        (mb_loss, mb_sums), mb_grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + mb_loss, jax.tree.map(jnp.add, acc_sums, mb_sums),
                jax.tree.map(jnp.add, acc_grads, mb_grads)), None

      first = jax.tree.map(lambda x: x[0], mbs)
      (l0, s0), g0 = grad_fn(state.params, first, rng)
      rest = jax.tree.map(lambda x: x[1:], mbs)
      (loss, sums, grads), _ = jax.lax.scan(body, (l0, s0, g0), (rest, jnp.arange(1, m)))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state as it was; the host stops the run on seeing it.
    new = state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    new = new.replace(step=state.step + 1)
    out = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~ok).astype(jnp.int32),
           "total_weight": total_weight, **sums}
    return new, out

  return step_fn


def make_eval_step(objective: Objective, model, config, byte_table, num_langs):
  ctx = StepContext(model=model, config=config, deterministic=True)

  def eval_fn(params, batch, extra):
    _, aux = objective.loss_fn(ctx, params, batch, jax.random.PRNGKey(0), extra)
    return _per_language(aux, batch, byte_table, num_langs)

  return eval_fn


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
  if c.get("restore_step", 0) < 0:
    raise ConfigError(f"checkpoint.restore_step={c.restore_step} must be >= 0 (0: the latest)")
  if t.batch_size % t.microbatches:
    raise ConfigError(f"train.batch_size={t.batch_size} does not divide into "
                      f"train.microbatches={t.microbatches}; use a divisor")
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                      f"{config.model.max_len}; raise model.max_len or shorten data.seq_len")


@dataclasses.dataclass
class Setup:
  """What the loop builds before the first step (the tools load models with xlingo.load)."""

  config: Any
  mesh: Any
  rules: Any
  model: Any
  plan: inputs.InputPlan
  factory: state_lib.StateFactory
  byte_table: jax.Array


def build(config, objective: Objective | None = None) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_batch_divisible(config.train.batch_size // config.train.microbatches, mesh)
  model = decoder_lib.Decoder(config.model)
  plan = inputs.plan_inputs(config)
  factory = state_lib.StateFactory(model, config, mesh, rules,
                                   objective.param_extension if objective else None)
  byte_table = jnp.asarray(xvocab.vocab_byte_lengths(plan.vocab))
  return Setup(config, mesh, rules, model, plan, factory, byte_table)


def run(config, workdir: str, objective: Objective = LM_OBJECTIVE) -> dict:
  """Train until ``train.steps``, resuming from the workdir; returns the last metrics.

  One trainer per workdir (``workdir.WorkdirLock``); SIGTERM or SIGINT, even during start-up,
  stops cleanly (``preemption``); a full disk is one line naming the workdir and the space.
  """
  check_workdir(workdir)
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


def _run_locked(config, workdir, objective, lock, preempt) -> dict:
  validate_config(config)
  if objective.check_config:
    objective.check_config(config)
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

  # Resume order: own checkpoint (the latest readable one, or checkpoint.restore_step) ->
  # init_from (params only) -> objective's init -> scratch. A checkpoint that does not fit the
  # config stops the run here with one line, before anything is written.
  restored = ckpts.restore_latest(s.factory.abstract_with_shardings(), train_it)
  if restored is not None:
    state, start = restored
    metrics.console(f"resumed from {ckpts.directory} step {start}")
    metrics.truncate_jsonl_after(paths.join(workdir, "metrics.jsonl"), start)
  elif config.checkpoint.init_from:
    params = load.load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                             mesh=s.mesh, rules=s.rules, model_from="config").params
    state, start = s.factory.from_model_params(params, jax.random.PRNGKey(t.seed)), 0
    metrics.console(f"initialised parameters from {config.checkpoint.init_from}")
  elif objective.initial_params is not None:
    state, start = s.factory.from_params(objective.initial_params(s.factory, config)), 0
  else:
    state, start = s.factory.init(jax.random.PRNGKey(t.seed)), 0

  batch_sh = sharding.batch_sharding(s.mesh)
  step_fn = make_train_step(objective, s.model, config, s.factory.tx, s.byte_table, num_langs)
  eval_fn = make_eval_step(objective, s.model, config, s.byte_table, num_langs)
  abstract_batch = {
      k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len),
                              jnp.float32 if k == "loss_weights" else jnp.int32, sharding=batch_sh)
      for k in packing.FEATURES}
  with sharding.mesh_context(s.mesh, s.rules):
    t0 = time.perf_counter()
    train_step = jax.jit(step_fn, in_shardings=(s.factory.shardings, batch_sh, None),
                         out_shardings=(s.factory.shardings, None),
                         donate_argnums=(0,)).lower(
                             s.factory.abstract_with_shardings(), abstract_batch, extra).compile()
    compile_s = time.perf_counter() - t0
    eval_step = jax.jit(eval_fn)
  mem = _memory_line(train_step)
  metrics.console(f"train step compiled in {compile_s:.1f} s{mem}")
  peak, peak_src = metrics.peak_flops_per_device(t.peak_flops_per_device, config.model.dtype)
  metrics.console(f"peak {peak / 1e9:,.1f} GFLOP/s per device ({peak_src})")

  val_batches = {lang: inputs.eval_batches(s.plan, config, lang, t.eval_batches)
                 for lang in s.plan.eval_tasks}

  def evaluate(params) -> dict:
    return evaluate_batches(eval_step, params, val_batches, codes, batch_sh, extra)

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
          writer.flush()
          lock.check()
          ckpts.save(step, state, train_it, force=True)
          break
        t_window = time.perf_counter()
      if save_now:
        writer.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint
        lock.check()
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


def _save_best(workdir, config, state, step) -> None:
  """Keep the best-so-far state (early stopping) in WORKDIR/best, replacing the previous. The
  new copy is complete in best.tmp before the old one goes, so a crash leaves one whole copy
  (under best/ or best.tmp/); on gs:// the final rename is a copy, not atomic."""
  import orbax.checkpoint as ocp

  path = paths.join(paths.resolve(workdir), "best")
  tmp = path + ".tmp"
  leader = jax.process_index() == 0
  if leader:
    paths.rmtree(tmp)
  _sync_hosts("xlingo_best_clear")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(paths.join(tmp, "state"), state)
  ckptr.wait_until_finished()
  if leader:
    paths.write_text(paths.join(tmp, "step"), str(step))
    # The same metadata as a checkpoint's, so that tools load best/ on its own.
    paths.write_text(paths.join(tmp, "meta", "metadata"),
                     json.dumps(ckpt_lib.checkpoint_meta(config, step)))
    paths.rmtree(path)
    paths.rename(tmp, path)
  _sync_hosts("xlingo_best_done")


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
