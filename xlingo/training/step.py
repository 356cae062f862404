"""The compiled train and eval steps, and the objectives they are built from.

An :class:`Objective` is a list of loss terms (``xlingo.training.terms``), each bound once from
the config, with the model they share and, optionally, how the initial parameters are obtained.
A :class:`Recipe` says how train, adapt or distill build theirs once the mesh exists (a teacher
is restored there, once) and which config checks are theirs. ``make_train_step`` turns an
objective into one pure function ``step(state, batch, extra) -> (state, metrics)`` that sums
the terms; ``extra`` holds the terms' frozen arrays (``Objective.extra``) so that they are the
compiled step's arguments, not constants baked into it; ``jit_train_step`` gives that function
the loop's shardings and donation.

This module imports the model, the terms and the train state, never the data layer
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
from xlingo.training import contrastive, terms
from xlingo.training import state as state_lib

# The features of every batch the step reads, [B, L] each; the data layer emits exactly these
# (xlingo.data.packing.FEATURES, checked equal by a test).
BATCH_FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights",
                  "raw_bytes")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms a step sums, over one model (the hints it is given bound with it)."""

  name: str
  model: Any
  hints: terms.Hints
  terms: tuple
  # (factory) -> params, used instead of a fresh init when there is no checkpoint
  initial_params: Callable[..., Any] | None = None

  def loss(self, params, batch, rng, *, deterministic: bool, step=None,
           evaluating: bool = False) -> tuple[jax.Array, dict]:
    """The terms' values summed over tokens, and their aux merged (see ``terms``)."""
    run = terms.Pass(self.model, self.hints, params, batch, rng, deterministic=deterministic,
                     step=step, evaluating=evaluating)
    total, aux = None, {"per_token": {}}
    for term in self.terms:
      value, term_aux = term.loss(params, batch, rng, run)
      total = value if total is None else total + value
      aux["per_token"].update(term_aux.get("per_token", {}))
      aux.update({k: v for k, v in term_aux.items() if k != "per_token"})
    return total, aux

  def extra(self) -> dict:
    """The terms' frozen arrays (a teacher's parameters, the initial ones), by term index."""
    out = {str(i): t.frozen() for i, t in enumerate(self.terms)}
    return {k: v for k, v in out.items() if v is not None}

  def bound(self, extra) -> Objective:
    """This objective with ``extra`` (the traced :meth:`extra`) in its terms."""
    if not extra:
      return self
    return dataclasses.replace(self, terms=tuple(
        t.bind(extra[str(i)]) if str(i) in extra else t for i, t in enumerate(self.terms)))

  def features(self, batch_sharding) -> dict:
    out = {}
    for t in self.terms:
      out.update(t.features(batch_sharding))
    return out

  def evaluators(self) -> tuple:
    return tuple(e for t in self.terms for e in t.evaluators())


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How an entry point's objective is made: ``build(config, setup) -> Objective`` once the
  loop's mesh and model exist (``setup``: model, mesh, rules, factory), and ``check(config)``
  for its own settings, run before anything is built."""

  name: str
  build: Callable[..., Objective]
  check: Callable[..., None] | None = None
  # what the loop runs besides its own hooks (xlingo.training.hooks), e.g. early stopping
  hooks: tuple = ()
  # (config, train iterator) -> the iterator the loop reads, e.g. with stored teacher logits
  wrap_train_iterator: Callable[..., Any] | None = None
  # (config, setup) -> the training batches instead of the LM data plan's (a labelled task,
  # xlingo.finetune): then no LM mixture table and no per-language LM validation either; the
  # objective's evaluators are the validation
  train_iterator: Callable[..., Any] | None = None


def lm_terms(config, model) -> tuple:
  """The shared LM terms: cross-entropy, the language-ID head's loss (with the head), the
  hint-free validation, contrastive alignment (when pairs are named)."""
  out = [terms.CrossEntropy.from_config(config)]
  if config.model.lid_head:
    out.append(terms.LanguageId(float(config.train.lid_loss_weight)))
  out.append(terms.HintFreeValidation.from_config(config))
  if contrastive.Settings.from_config(config).measures:
    out.append(contrastive.Contrastive.from_config(config, model))
  return tuple(out)


def lm_objective(config, model, name: str = "lm", extra_terms: tuple = (), **kw) -> Objective:
  """The LM objective over ``model`` (plus ``extra_terms``): what train, adapt and evaluate use."""
  return Objective(name, model, terms.Hints.from_config(config),
                   lm_terms(config, model) + tuple(extra_terms), **kw)


LM = Recipe("lm", build=lambda config, setup: lm_objective(config, setup.model))


LM_TERMS = (terms.CrossEntropy, terms.LanguageId, terms.HintFreeValidation,
            contrastive.Contrastive)


def check_objective_config(config) -> None:
  """One line for a setting of the shared LM terms that cannot work (before anything runs)."""
  for term in LM_TERMS:
    term.check(config)


def check_objective_mesh(config, mesh) -> None:
  for term in LM_TERMS:
    term.check_mesh(config, mesh)


def _per_language(aux, batch, byte_table, num_langs):
  """Sums per language: every per-token quantity, the weights, the raw bytes they stand for
  (the batch's ``raw_bytes``; without it, each piece's normalised bytes from ``byte_table``)
  and the tokens (padding excluded)."""
  w = batch["loss_weights"].astype(jnp.float32)
  ids = batch["lang_ids"].reshape(-1)
  seg = lambda x: jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num_langs)
  out = {f"{k}_lang": seg(v) for k, v in aux["per_token"].items()}
  out["weight_lang"] = seg(w)
  raw = batch.get("raw_bytes")
  raw = jnp.take(byte_table, batch["targets"]) if raw is None else raw.astype(jnp.float32)
  out["bytes_lang"] = seg(raw * w)
  out["tokens_lang"] = seg((batch["segment_ids"] > 0).astype(jnp.int32))
  return out


def _sums(aux, batch, byte_table, num_langs):
  sums = {k: v for k, v in aux.items() if k != "per_token"}
  sums.update(_per_language(aux, batch, byte_table, num_langs))
  return sums


def make_train_step(objective: Objective, config, tx, byte_table, num_langs):
  """``step(state, batch, extra)``: one optimizer update on the sum of the objective's terms
  (``extra``: ``objective.extra()``), over ``train.microbatches`` microbatches."""
  t = config.train
  base_rng = jax.random.PRNGKey(t.seed)

  def step_fn(state: state_lib.TrainState, batch, extra):
    rng = jax.random.fold_in(base_rng, state.step)
    total_weight = jnp.maximum(jnp.sum(batch["loss_weights"]), 1.0)

    bound = objective.bound(extra)
    # Only the trained parameters are differentiated: the frozen ones enter the loss as
    # constants, so the backward pass computes no weight gradient for them (it still carries
    # activation gradients through them down to the lowest trained parameter).
    trained, frozen = state_lib.split_params(
        state.params, state_lib.trainable_mask(state.params, t.trainable))

    def micro_loss(trained_params, mb, r):
      params = state_lib.join_params(trained_params, frozen)
      loss_sum, aux = bound.loss(params, mb, r, deterministic=False, step=state.step)
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


def make_eval_step(objective: Objective, byte_table, num_langs):
  """``eval(params, batch, extra)``: the per-language sums of the terms' per-token values."""

  def eval_fn(params, batch, extra):
    _, aux = objective.bound(extra).loss(params, batch, jax.random.PRNGKey(0),
                                         deterministic=True, evaluating=True)
    return _per_language(aux, batch, byte_table, num_langs)

  return eval_fn


def abstract_batch(config, batch_sharding, objective: Objective | None = None) -> dict:
  """The global batch as sharded ShapeDtypeStructs (what the step is compiled for): the LM
  features and those the objective's terms add."""
  shape = (config.train.batch_size, config.data.seq_len)
  out = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32,
                                 sharding=batch_sharding)
         for k in BATCH_FEATURES}
  if objective is not None:
    out.update(objective.features(batch_sharding))
  return out


def jit_train_step(step_fn, factory: state_lib.StateFactory, batch_sharding):
  """The train step jitted as the loop runs it: state sharded as the factory says and donated,
  the batch split over the data-parallel axes, ``extra`` placed as given."""
  return jax.jit(step_fn, in_shardings=(factory.shardings, batch_sharding, None),
                 out_shardings=(factory.shardings, None), donate_argnums=(0,))


def compile_train_step(objective: Objective, step_fn, factory: state_lib.StateFactory, mesh,
                       rules, config):
  """``jit_train_step`` lowered from abstract state and batch and compiled, under the mesh and
  rules: ``(compiled, lower_s, compile_s)``. Nothing is allocated, so this also serves for
  devices that are not there (abstract TPU topologies, bench/tpu_aot.py)."""
  batch_sh = sharding.batch_sharding(mesh)
  with sharding.mesh_context(mesh, rules):
    t0 = time.perf_counter()
    lowered = jit_train_step(step_fn, factory, batch_sh).lower(
        factory.abstract_with_shardings(), abstract_batch(config, batch_sh, objective),
        objective.extra())
    t1 = time.perf_counter()
    compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1
