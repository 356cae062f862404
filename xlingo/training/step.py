"""The compiled train and eval steps, and the objectives they are built from.

An :class:`Objective` says what differs between pretraining, adaptation and distillation: the
loss, any extra (frozen) tree the step needs, such as a teacher's parameters, and how the
initial parameters are obtained. ``make_train_step`` turns it into one pure function
``step(state, batch, extra) -> (state, metrics)`` and ``jit_train_step`` gives that function
the loop's shardings and donation.

This module imports the model, the losses and the train state, never the data layer
(seqio/TensorFlow): building and compiling a step (``bench/tpu_aot.py``, ``bench/bench_train.py
--synthetic``) works on a machine that has only jax, flax and optax.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xlingo import sharding
from xlingo.training import losses
from xlingo.training import state as state_lib

# The features of every batch the step reads, [B, L] each; the data layer emits exactly these
# (xlingo.data.packing.FEATURES, checked equal by a test).
BATCH_FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights")


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


def loss_chunk_size(config) -> int:
  """``train.loss_chunk_size``: sequence positions per chunk of the vocabulary projection."""
  return int(config.train.get("loss_chunk_size", 0) or 0)


def output_logits_fn(model, params):
  """hidden [B, C, D] -> float32 logits [B, C, V] with ``params``: the model's own projection."""
  return lambda hidden: model.apply({"params": params}, hidden, method="logits_from_hidden")


def lm_loss(ctx: StepContext, params, batch, rng, extra):
  """Next-token cross-entropy (+ z-loss, + lambda * language-ID loss).

  The model returns its final hidden states and the loss projects them onto the vocabulary
  ``train.loss_chunk_size`` positions at a time (``losses.chunked_cross_entropy``), so the
  [B, T, V] float32 logits and their gradient are never held at once.
  """
  del extra
  t = ctx.config.train
  hidden, lid_logits = ctx.model.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
      batch["lang_ids"], deterministic=ctx.deterministic, rngs={"dropout": rng},
      return_hidden=True)
  ce_sum, _, per_token = losses.chunked_cross_entropy(
      output_logits_fn(ctx.model, params), hidden, batch["targets"], batch["loss_weights"],
      z_loss=t.z_loss, chunk_size=loss_chunk_size(ctx.config))
  aux = {"per_token": {"loss": per_token}}
  total = ce_sum
  if lid_logits is not None and t.lid_loss_weight:
    lid_sum, _ = losses.lid_loss(lid_logits, batch["lang_ids"], batch["loss_weights"])
    total = total + t.lid_loss_weight * lid_sum
    aux["lid_loss_sum"] = lid_sum
  return total, aux


LM_OBJECTIVE = Objective(name="lm", loss_fn=lm_loss)


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
    # Only the trained parameters are differentiated: the frozen ones enter the loss as
    # constants, so the backward pass computes no weight gradient for them (it still carries
    # activation gradients through them down to the lowest trained parameter).
    trained, frozen = state_lib.split_params(
        state.params, state_lib.trainable_mask(state.params, t.trainable))

    def micro_loss(trained_params, mb, r):
      params = state_lib.join_params(trained_params, frozen)
      loss_sum, aux = objective.loss_fn(step_ctx, params, mb, r, extra)
      return loss_sum / total_weight, _sums(aux, mb, byte_table, num_langs)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    m = t.microbatches
    if m == 1:
      (loss, sums), grads = grad_fn(trained, batch, rng)
    else:
      mbs = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

      def body(carry, xs):
        mb, i = xs
        (mb_loss, mb_sums), mb_grads = grad_fn(trained, mb, jax.random.fold_in(rng, i))
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + mb_loss, jax.tree.map(jnp.add, acc_sums, mb_sums),
                jax.tree.map(jnp.add, acc_grads, mb_grads)), None

      first = jax.tree.map(lambda x: x[0], mbs)
      (l0, s0), g0 = grad_fn(trained, first, rng)
      rest = jax.tree.map(lambda x: x[1:], mbs)
      (loss, sums, grads), _ = jax.lax.scan(body, (l0, s0, g0), (rest, jnp.arange(1, m)))
    grad_norm = optax.global_norm(grads)  # the trained parameters' only
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    new_trained = optax.apply_updates(trained, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state as it was; the host stops the run on seeing it.
    new_trained, opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                                          (new_trained, opt_state), (trained, state.opt_state))
    new = state_lib.TrainState(step=state.step + 1,
                               params=state_lib.join_params(new_trained, frozen),
                               opt_state=opt_state)
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


def abstract_batch(config, batch_sharding) -> dict:
  """The global batch as sharded ShapeDtypeStructs (what the step is compiled for)."""
  shape = (config.train.batch_size, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32,
                                  sharding=batch_sharding)
          for k in BATCH_FEATURES}


def jit_train_step(step_fn, factory: state_lib.StateFactory, batch_sharding):
  """The train step jitted as the loop runs it: state sharded as the factory says and donated,
  the batch split over the data-parallel axes, ``extra`` placed as given."""
  return jax.jit(step_fn, in_shardings=(factory.shardings, batch_sharding, None),
                 out_shardings=(factory.shardings, None), donate_argnums=(0,))


def compile_train_step(step_fn, factory: state_lib.StateFactory, mesh, rules, config,
                       extra=None):
  """``jit_train_step`` lowered from abstract state and batch and compiled, under the mesh and
  rules: ``(compiled, lower_s, compile_s)``. Nothing is allocated, so this also serves for
  devices that are not there (abstract TPU topologies, bench/tpu_aot.py)."""
  batch_sh = sharding.batch_sharding(mesh)
  with sharding.mesh_context(mesh, rules):
    t0 = time.perf_counter()
    lowered = jit_train_step(step_fn, factory, batch_sh).lower(
        factory.abstract_with_shardings(), abstract_batch(config, batch_sh),
        {} if extra is None else extra)
    t1 = time.perf_counter()
    compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1
