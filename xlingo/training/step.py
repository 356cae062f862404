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
import numpy as np
import optax

from xlingo import sharding
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import contrastive, losses
from xlingo.training import state as state_lib

# The features of every batch the step reads, [B, L] each; the data layer emits exactly these
# (xlingo.data.packing.FEATURES, checked equal by a test).
BATCH_FEATURES = ("inputs", "targets", "segment_ids", "positions", "lang_ids", "loss_weights",
                  "raw_bytes")


@dataclasses.dataclass
class StepContext:
  """What a loss function may use besides params and batch."""

  model: Any
  config: Any
  deterministic: bool
  # The state's step (a traced int32) inside the train step, for loss schedules; None in eval.
  step: Any = None
  # True in the eval step: the loss also reports what validation measures without a
  # language hint (val/lid_acc, val/bpb_nohint).
  evaluating: bool = False


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
  """Next-token cross-entropy (+ z-loss) with per-language loss weights, + lambda * the
  language-ID loss where the language hint is hidden, + beta * contrastive alignment.

  The model returns its final hidden states and the loss projects them onto the vocabulary
  ``train.loss_chunk_size`` positions at a time (``losses.chunked_cross_entropy``), so the
  [B, T, V] float32 logits and their gradient are never held at once. The per-token values
  reported (``per_token``: per-language loss and bpb) are unweighted cross-entropies.

  The language-ID and contrastive terms are means (over the hint-free tokens, over the pairs)
  added to the mean loss: their sums here are scaled by the batch's token count, which the
  step divides by again.
  """
  del extra
  t = ctx.config.train
  lang_ids = batch["lang_ids"]
  hint_ids, hidden_bt = hide_language_hints(ctx, batch, jax.random.fold_in(rng, 1))
  hidden, lid_logits = ctx.model.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
      hint_ids, deterministic=ctx.deterministic, rngs={"dropout": rng},
      return_hidden=True)
  ce_sum, _, per_token = losses.chunked_cross_entropy(
      output_logits_fn(ctx.model, params), hidden, batch["targets"], batch["loss_weights"],
      z_loss=t.z_loss, chunk_size=loss_chunk_size(ctx.config),
      scale_bt=loss_weight_per_token(ctx.config, lang_ids))
  aux = {"per_token": {"loss": per_token}}
  lid_total, lid_aux = language_id_term(ctx.config, lid_logits, batch, hidden_bt)
  total = ce_sum + lid_total
  aux.update(lid_aux)
  n_tok = jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)
  if ctx.evaluating:
    aux["per_token"].update(_hint_free_eval(ctx, params, batch, lid_logits))
    if "pair_inputs" in batch:  # make_embed_step: the pooled states, for retrieval
      aux["pair_embeddings"] = contrastive.pair_embeddings(ctx.model, params, batch, ctx.config)
  elif contrastive.trains(ctx.config) and "pair_inputs" in batch:
    c_loss, c_acc = contrastive.pair_loss(ctx, params, batch, jax.random.fold_in(rng, 2))
    total = total + t.contrastive.weight * c_loss * n_tok
    aux["contrastive_loss_sum"] = c_loss * n_tok
    aux["contrastive_acc_sum"] = c_acc * n_tok
  return total, aux


def language_id_term(config, lid_logits, batch, hidden_bt) -> tuple[jax.Array, dict]:
  """``(lambda * mean LID cross-entropy * token count, aux)``: the language-ID loss over the
  tokens whose hint is hidden (``hidden_bt`` from :func:`hide_language_hints`; none: 0), and
  its mean and accuracy as ``lid_loss_sum`` / ``lid_acc_sum`` (logged as lid_loss, lid_acc)."""
  if lid_logits is None or hidden_bt is None:
    return jnp.float32(0.0), {}
  weights = batch["loss_weights"].astype(jnp.float32)
  n_tok = jnp.maximum(jnp.sum(weights), 1.0)
  lid_w = weights * hidden_bt
  lid_sum, lid_count = losses.lid_loss(lid_logits, batch["lang_ids"], lid_w)
  count = jnp.maximum(lid_count, 1.0)
  lid_mean = lid_sum / count
  acc = jnp.sum(_lid_correct(lid_logits, batch["lang_ids"]) * lid_w) / count
  total = config.train.lid_loss_weight * lid_mean * n_tok
  return total, {"lid_loss_sum": lid_mean * n_tok, "lid_acc_sum": acc * n_tok}


def _lid_correct(lid_logits_btl, lang_ids_bt):
  return (jnp.argmax(lid_logits_btl, axis=-1) == lang_ids_bt).astype(jnp.float32)


def hide_language_hints(ctx: StepContext, batch, rng):
  """The language ids the model is given, and where the hint is hidden ([B, T] float, or None
  when the language-ID loss has nowhere to be taken).

  Without ``model.use_lang_emb`` there is no hint anywhere (every token counts for the
  language-ID loss). With it, training hides the hint of each packed example (segment) at the
  rate ``model.lang_emb_dropout`` by giving the model ``UNKNOWN_LANG`` there (a zero language
  vector); the batch's own ``lang_ids`` (the language-ID targets, the per-language metrics)
  are unchanged. Segment masks keep attention inside an example, so nothing of another
  example's hint reaches a hidden one.
  """
  lang_ids = batch["lang_ids"]
  m = ctx.config.model
  if not m.use_lang_emb:
    return lang_ids, jnp.ones(lang_ids.shape, jnp.float32)
  rate = float(m.get("lang_emb_dropout", 0.0))
  if ctx.deterministic or not rate:
    return lang_ids, None
  seg_bt = batch["segment_ids"]
  u_bs = jax.random.uniform(rng, (seg_bt.shape[0], seg_bt.shape[1] + 1))
  hidden = jnp.take_along_axis(u_bs, seg_bt, axis=1) < rate
  return jnp.where(hidden, decoder_lib.UNKNOWN_LANG, lang_ids), hidden.astype(jnp.float32)


def _hint_free_eval(ctx: StepContext, params, batch, lid_logits) -> dict:
  """Validation without any language hint: per-token ``lid_acc`` (with the LID head) and, with
  language embeddings, ``loss_nohint`` (reported as val/bpb_nohint/<lang>)."""
  m = ctx.config.model
  w = batch["loss_weights"].astype(jnp.float32)
  out = {}
  if not m.use_lang_emb:
    if lid_logits is not None:
      out["lid_acc"] = _lid_correct(lid_logits, batch["lang_ids"]) * w
    return out
  if not (m.lid_head or m.get("lang_emb_dropout", 0.0)):
    return out
  unknown = jnp.full_like(batch["lang_ids"], decoder_lib.UNKNOWN_LANG)
  hidden, lid_nohint = ctx.model.apply(
      {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], unknown,
      deterministic=True, return_hidden=True)
  _, _, out["loss_nohint"] = losses.chunked_cross_entropy(
      output_logits_fn(ctx.model, params), hidden, batch["targets"], batch["loss_weights"],
      chunk_size=loss_chunk_size(ctx.config))
  if lid_nohint is not None:
    out["lid_acc"] = _lid_correct(lid_nohint, batch["lang_ids"]) * w
  return out


# --- per-language loss weights --------------------------------------------------------------


def language_loss_weights(config) -> np.ndarray | None:
  """The LM loss weight of each language id (``data.languages`` order), or None when every
  weight is 1. ``train.loss_weights`` (1.0 where not listed), then ``train.main_language``
  weighs ``train.main_language_weight``. Languages the table lacks are ignored here
  (:func:`check_objective_config` refuses them before training)."""
  t = config.train
  given = dict(t.get("loss_weights", {}) or {})
  main = t.get("main_language", "") or ""
  codes = list(config.data.languages)
  w = [float(given.get(c, 1.0)) for c in codes]
  if main in codes:
    w[codes.index(main)] = float(t.get("main_language_weight", 1.0))
  if all(x == 1.0 for x in w):
    return None
  return np.asarray(w, np.float32)


def loss_weight_per_token(config, lang_ids_bt):
  """Each token's LM loss weight from its language, or None when all weights are 1."""
  w = language_loss_weights(config)
  if w is None:
    return None
  w = np.concatenate([w, np.ones(max(0, config.model.num_languages - len(w)), np.float32)])
  return jnp.take(jnp.asarray(w), lang_ids_bt)


def loss_weights_line(config) -> str:
  """The start-of-run line that shows the per-language loss weights ("" when all are 1)."""
  w = language_loss_weights(config)
  if w is None:
    return ""
  main = config.train.get("main_language", "")
  parts = [f"{c} {x:g}{' (main)' if c == main else ''}"
           for c, x in zip(config.data.languages, w.tolist())]
  return ("LM loss weights per language (train.loss_weights, train.main_language; sampling "
          "is unchanged; metrics unweighted): " + ", ".join(parts))


# --- config checks --------------------------------------------------------------------------


def check_objective_config(config) -> None:
  """One line for a setting of the shared LM loss that cannot work (before anything runs)."""
  m, t = config.model, config.train
  rate = float(m.get("lang_emb_dropout", 0.0))
  if not 0.0 <= rate <= 1.0:
    raise ConfigError(f"model.lang_emb_dropout={rate} must be in [0, 1] (the share of examples "
                      "trained without a language hint)")
  if rate and not m.use_lang_emb:
    raise ConfigError(f"model.lang_emb_dropout={rate} has no hint to hide with "
                      "model.use_lang_emb=False; set it to 0 or turn the language embedding on")
  if t.lid_loss_weight < 0:
    raise ConfigError(f"train.lid_loss_weight={t.lid_loss_weight} must be >= 0")
  if t.lid_loss_weight and not m.lid_head:
    raise ConfigError(f"train.lid_loss_weight={t.lid_loss_weight} needs the language-ID head: "
                      "set --config.model.lid_head=True")
  if t.lid_loss_weight and m.use_lang_emb and not rate:
    raise ConfigError(
        f"train.lid_loss_weight={t.lid_loss_weight} with model.use_lang_emb=True and "
        "model.lang_emb_dropout=0 teaches nothing (the head reads the language embedding added "
        "at the same token, not the text); set --config.model.lang_emb_dropout=0.1 (the loss "
        "is then taken where the hint is hidden) or --config.model.use_lang_emb=False")
  codes = list(config.data.languages)
  given = dict(t.get("loss_weights", {}) or {})
  main = t.get("main_language", "") or ""
  for lang, w in given.items():
    if lang not in codes:
      raise ConfigError(f"train.loss_weights names {lang!r}, which is not in data.languages="
                        f"{tuple(codes)}; fix the language code")
    if not (isinstance(w, int | float) and np.isfinite(w) and w >= 0):
      raise ConfigError(f"train.loss_weights.{lang}={w!r} must be a number >= 0")
  if main and main not in codes:
    raise ConfigError(f"train.main_language={main!r} is not in data.languages={tuple(codes)}")
  if main and main in given:
    raise ConfigError(f"train.main_language={main!r} is also in train.loss_weights; give its "
                      "weight once, as train.main_language_weight")
  mw = t.get("main_language_weight", 1.0)
  if not (np.isfinite(mw) and mw >= 0):
    raise ConfigError(f"train.main_language_weight={mw} must be a number >= 0")
  w = language_loss_weights(config)
  if w is not None and not w.any():
    raise ConfigError("every language has LM loss weight 0 (train.loss_weights, "
                      "train.main_language_weight); give at least one a weight > 0")
  contrastive.check_config(config)


LM_OBJECTIVE = Objective(name="lm", loss_fn=lm_loss)


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
  ctx = StepContext(model=model, config=config, deterministic=True, evaluating=True)

  def eval_fn(params, batch, extra):
    _, aux = objective.loss_fn(ctx, params, batch, jax.random.PRNGKey(0), extra)
    return _per_language(aux, batch, byte_table, num_langs)

  return eval_fn


def make_embed_step(objective: Objective, model, config, mesh):
  """Jitted (params, pair batch, extra) -> pooled states [P, 2, D] of both sides of each pair,
  replicated on every process (retrieval in validation, ``contrastive.retrieval_metrics``).

  The pairs go through the objective's own loss function (with an empty one-token LM batch
  beside them), so they see the parameters exactly as its loss does (adapters, merged
  factors, whatever the objective applies)."""
  from jax.sharding import NamedSharding, PartitionSpec

  ctx = StepContext(model=model, config=config, deterministic=True, evaluating=True)

  def embed(params, pair_batch, extra):
    rows = pair_batch["pair_inputs"].shape[0]
    empty = {k: jnp.zeros((rows, 1), jnp.float32 if k == "loss_weights" else jnp.int32)
             for k in BATCH_FEATURES}
    _, aux = objective.loss_fn(ctx, params, {**empty, **pair_batch}, jax.random.PRNGKey(0),
                               extra)
    return aux["pair_embeddings"]

  return jax.jit(embed, out_shardings=NamedSharding(mesh, PartitionSpec()))


def abstract_batch(config, batch_sharding) -> dict:
  """The global batch as sharded ShapeDtypeStructs (what the step is compiled for)."""
  shape = (config.train.batch_size, config.data.seq_len)
  out = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32,
                                 sharding=batch_sharding)
         for k in BATCH_FEATURES}
  if contrastive.trains(config):
    out.update(contrastive.abstract_pair_batch(config, batch_sharding))
  return out


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
