"""The one training loop shared by pretraining, adaptation and distillation.

A recipe (``xlingo.training.step.Recipe``) says what differs: the objective's loss terms (with
what they bind, such as a teacher), how the initial parameters are obtained, its config checks,
and hooks of its own (early stopping, a report at the end). The compiled step is built in
``xlingo.training.step``, what runs every N steps in ``xlingo.training.hooks``; the start-up
(mesh, data, state, resume, compile), the step loop, checkpoints and preemption live here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any

import jax
import jax.numpy as jnp

from xlingo import paths, preemption, sharding
from xlingo.data import inputs, iterator
from xlingo.data import vocab as xvocab
from xlingo.errors import ConfigError, NonFiniteError, XlingoError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import hooks, layout, load, metrics, storage_faults, terms
from xlingo.training import restore as restore_lib
from xlingo.training import state as state_lib
from xlingo.training import step as step_lib
from xlingo.training import workdir as workdir_lib

FINISHED_MARKER = "xlingo: training finished"


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
  if c.storage_retry_s <= 0:
    raise ConfigError(f"checkpoint.storage_retry_s={c.storage_retry_s} must be > 0 (seconds a "
                      "failing or stalled storage call is retried)")
  if c.restore_step < 0:
    raise ConfigError(f"checkpoint.restore_step={c.restore_step} must be >= 0 (0: the latest)")
  prof = tuple(t.profile_steps)
  if len(prof) != 2 or (prof[1] and prof[0] < 1) or prof[1] < 0:
    raise ConfigError(f"train.profile_steps={prof} is not (start >= 1, count >= 0); e.g. "
                      "--config.train.profile_steps='(5, 3)' traces steps 6-8")
  if t.batch_size % t.microbatches:
    raise ConfigError(f"train.batch_size={t.batch_size} does not divide into "
                      f"train.microbatches={t.microbatches}; use a divisor")
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                      f"{config.model.max_len}; raise model.max_len or shorten data.seq_len")
  inputs.check_validation(config)
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
  step_lib.check_objective_mesh(config, mesh)
  spec = peft.spec_from_config(config)
  model = decoder_lib.Decoder(config.model, spec)
  plan = inputs.plan_inputs(config)
  factory = state_lib.StateFactory(model, config, mesh, rules)
  peft.check_lora_targets([sharding.path_str(p) for p, _ in
                           jax.tree_util.tree_leaves_with_path(factory.params_abstract)], spec)
  byte_table = jnp.asarray(xvocab.vocab_byte_lengths(plan.vocab))
  return Setup(config, mesh, rules, model, plan, factory, byte_table)


def run(config, workdir: str, recipe: step_lib.Recipe = step_lib.LM) -> dict:
  """Train until ``train.steps``, resuming from the workdir; returns the last metrics.

  One trainer per workdir (``workdir.WorkdirLock``); SIGTERM or SIGINT, even during start-up,
  stops cleanly (``preemption``); a full disk is one line naming the workdir and the space.
  """
  check_workdir(workdir)
  workdir_lib.check_layout(workdir, layout.KINDS)
  adopt_init_from_model(config)
  lock = workdir_lib.WorkdirLock(workdir, is_leader=jax.process_index() == 0)
  try:
    with preemption.handling() as preempt, lock:
      return _run_locked(config, workdir, recipe, lock, preempt)
  except XlingoError:
    raise
  except Exception as e:
    if paths.is_disk_full(e):  # metrics, plots, best/: one line too, not a traceback
      raise storage_faults.disk_full_error(workdir) from None
    raise


def adopt_init_from_model(config) -> None:
  """``load.adopt_init_from_model``, saying which keys it took."""
  taken = load.adopt_init_from_model(config)
  if taken:
    metrics.console("model from checkpoint.init_from: " + ", ".join(
        f"model.{k}={config.model[k]}" for k in taken))


def _run_locked(config, workdir, recipe, lock, preempt) -> dict:
  validate_config(config)
  if recipe.check:
    recipe.check(config)
  s = build(config)
  flops_tok = _start_lines(config, s, recipe.name, recipe.train_iterator is None)
  ckpts = ckpt_lib.Checkpoints(workdir, config)
  lock.storage = ckpts.storage
  lm_data = recipe.train_iterator is None
  train_it = (inputs.train_iterator(s.plan, config) if lm_data
              else recipe.train_iterator(config, s))
  if recipe.wrap_train_iterator is not None:
    train_it = recipe.wrap_train_iterator(config, train_it)
  if getattr(train_it, "summary", ""):
    metrics.console(train_it.summary)
  objective = recipe.build(config, s)
  extra = objective.extra()
  codes = s.plan.table.codes
  # Cumulative training tokens and bytes per language (tokens/<lang>, bytes/<lang>), in the data
  # iterator's state so that a resumed run counts on from its checkpoint.
  delivered = hooks.TokenCounter(codes, train_it)
  state, start = _initial_state(config, workdir, s, objective, ckpts, train_it, delivered)
  train_step, evaluate, has_val = _compile(config, s, objective, extra, lm_data)
  peak, peak_src = metrics.peak_flops_per_device(config.train.peak_flops_per_device,
                                                 config.model.dtype)
  metrics.console(f"peak {peak / 1e9:,.1f} GFLOP/s per device ({peak_src})")
  if preempt.requested_locally():  # a signal during start-up: nothing trained, nothing to save
    ckpts.close()
    metrics.console(f"xlingo: stopped by {preempt.label} before training step {start + 1}; "
                    f"nothing new to save. Run the same command again to "
                    f"{'resume' if start else 'start'}.")
    return {}
  preemption.check_multi_process_ready()
  writer = metrics.MetricWriter(workdir, start, storage=ckpts.storage)
  env = hooks.Env(recipe.name, config, workdir, codes, writer, {},
                  lambda state, step: ckpt_lib.save_best(workdir, config, state, step))
  window = hooks.LogWindow(env, delivered, start, flops_tok, peak,
                           peak_measured=peak_src.startswith(metrics.MEASURED))
  every = [hooks.profiler(env), window.hook(), hooks.validation(env, evaluate, window),
           *(make(env) for make in recipe.hooks), hooks.plot(env)]
  if start == 0 and has_val:
    with sharding.mesh_context(s.mesh, s.rules):
      hooks.validate(env, evaluate, 0, state.params)

  def save(step, state):
    writer.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint
    lock.check()
    delivered.keep(window.pending_tokens())
    ckpts.save(step, state, train_it, force=True)

  batch_sh = sharding.batch_sharding(s.mesh)
  step, signalled = start, False
  with sharding.mesh_context(s.mesh, s.rules):
    while step < config.train.steps:
      batch = iterator.to_global(window.next_batch(train_it), batch_sh)
      state, m = train_step(state, batch, extra)
      step += 1
      window.add(step, m)
      tick = hooks.Tick(step, state, is_last=step == config.train.steps)
      signalled = preempt.should_stop(step)
      save_now = step % config.checkpoint.every_steps == 0 or tick.is_last or signalled
      if save_now or step % config.train.log_every == 0 or tick.is_last:
        _stop_if_nonfinite(window, ckpts, config, state)
      stop = hooks.run_due(every, tick)
      if save_now or stop:
        save(step, state)
      if (signalled or stop) and not tick.is_last:
        break
  ckpts.close()
  if signalled and step < config.train.steps:
    writer.close()
    how = "preempted" if preempt.label == "SIGTERM" else "interrupted"
    metrics.console(f"xlingo: {how} ({preempt.label}) at step {step}; checkpoint saved. Run the "
                    "same command again to resume.")
    return env.last
  writer.flush()  # the end hooks read metrics.jsonl (plots) and may add rows (a test score)
  hooks.run_at_end(every, hooks.Tick(step, state, is_last=True))
  writer.close()
  metrics.console(FINISHED_MARKER)
  return env.last


def _start_lines(config, s: Setup, name: str, lm_data: bool = True) -> float:
  """The start-of-run lines (mesh, mixture table, loss weights, model size); returns the
  model's FLOPs per trained token."""
  t = config.train
  metrics.console(f"xlingo {name}: mesh {dict(s.mesh.shape)} on {jax.device_count()} "
                  f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)")
  if lm_data:
    metrics.console(s.plan.table_text(t.steps * t.batch_size * config.data.seq_len))
  if terms.loss_weights_line(config):
    metrics.console(terms.loss_weights_line(config))
  n_params = state_lib.param_count(s.factory.params_abstract)
  n_trained = state_lib.param_count(state_lib.trained_params(s.factory.params_abstract,
                                                             t.trainable))
  flops_tok = decoder_lib.flops_per_token(config.model, config.data.seq_len)
  trained = "" if n_trained == n_params else f" ({n_trained / 1e6:.3f} M trained)"
  metrics.console(f"model: {n_params / 1e6:.2f} M parameters{trained}, {flops_tok / 1e6:.1f} "
                  f"MFLOP per token (train)")
  return flops_tok


def _initial_state(config, workdir, s: Setup, objective, ckpts, train_it, delivered):
  """``(state, start step)``. Resume order: own checkpoint (the latest readable one, or
  checkpoint.restore_step) -> init_from (params only) -> the objective's initial parameters ->
  scratch. A checkpoint that does not fit the config stops the run here with one line, before
  anything is written."""
  restored = ckpts.restore_latest(s.factory.abstract_with_shardings(), train_it)
  if restored is not None:
    state, start = restored
    delivered.restored()
    metrics.console(f"resumed from {ckpts.directory} step {start}")
    metrics.truncate_jsonl_after(paths.join(workdir, layout.METRICS), start)
    return state, start
  if config.checkpoint.init_from:
    lm = load.load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                         mesh=s.mesh, rules=s.rules, model_from="config")
    params = lm.params
    metrics.console(f"initialised parameters from {config.checkpoint.init_from}")
    for line in restore_lib.structural_changes(lm.meta, config):
      metrics.console(line)
    return s.factory.from_params(params), 0
  if objective.initial_params is not None:
    return s.factory.from_params(objective.initial_params(s.factory)), 0
  return s.factory.init(jax.random.PRNGKey(config.train.seed)), 0


def _compile(config, s: Setup, objective, extra, lm_data: bool = True):
  """The compiled train step, ``evaluate(params) -> val metrics`` (per-language bpb and the
  terms' evaluators, ``hooks.validator``), and whether there is validation data."""
  num_langs = len(s.plan.table.codes)
  step_fn = step_lib.make_train_step(objective, config, s.factory.tx, s.byte_table, num_langs)
  train_step, lower_s, compile_s = step_lib.compile_train_step(
      objective, step_fn, s.factory, s.mesh, s.rules, config)
  metrics.console(f"train step compiled in {compile_s + lower_s:.1f} s{_memory_line(train_step)}")
  eval_step = jax.jit(step_lib.make_eval_step(objective, s.byte_table, num_langs))
  val_batches = {lang: inputs.validation_set(s.plan, config, lang)
                 for lang in (s.plan.eval_tasks if lm_data else ())}
  env = hooks.EvalEnv(s.plan, s.mesh, sharding.batch_sharding(s.mesh))
  evaluate = hooks.validator(objective, eval_step, val_batches, s.plan.table.codes, env, extra)
  return train_step, evaluate, bool(val_batches) or not lm_data


def _stop_if_nonfinite(window, ckpts, config, state) -> None:
  bad = window.first_nonfinite()
  if bad is not None:
    ckpts.wait()
    raise NonFiniteError(_nonfinite_message(bad, ckpts.all_steps(), config, state.params))


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
