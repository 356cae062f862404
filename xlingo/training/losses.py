"""Losses: token cross-entropy (with optional z-loss), the language-identification loss and
the distillation KL.

All return sums plus the weight sum rather than a mean, so that microbatches, hosts and
per-language breakdowns can be added up before one final division.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax cross-entropy in float32.

  Args:
    logits_btv: [..., V] logits (any float dtype; computed in float32).
    targets_bt: [...] int target ids.
    weights_bt: [...] loss weights (0 on padding and on tokens that do not count).
    z_loss: coefficient of log(Z)^2 (PaLM), which keeps the softmax normaliser near 1.

  Returns:
    ``(loss_sum, weight_sum, per_token_loss_bt)``: ``loss_sum`` includes the z-loss;
    ``per_token_loss_bt`` is the plain cross-entropy in nats times the weight (so it is 0
    where the weight is 0), which is what per-language bits-per-byte need.
  """
  logits = logits_btv.astype(jnp.float32)
  weights = weights_bt.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product rather than a gather: it stays elementwise when the vocabulary axis
  # is sharded over 'tensor'.
  onehot_btv = jax.nn.one_hot(targets_bt, logits.shape[-1], dtype=jnp.float32)
  target_logit_bt = jnp.sum(logits * onehot_btv, axis=-1)
  per_token_bt = (log_z_bt - target_logit_bt) * weights
  loss_sum = jnp.sum(per_token_bt)
  if z_loss:
    loss_sum = loss_sum + z_loss * jnp.sum(jnp.square(log_z_bt) * weights)
  return loss_sum, jnp.sum(weights), per_token_bt


def lid_loss(
    lid_logits_btl: jax.Array, lang_ids_bt: jax.Array, weights_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Language-identification cross-entropy per token: ``(loss_sum, weight_sum)``."""
  loss_sum, weight_sum, _ = cross_entropy_loss(lid_logits_btl, lang_ids_bt, weights_bt)
  return loss_sum, weight_sum


def kl_divergence(
    teacher_logits_btv: jax.Array,
    student_logits_btv: jax.Array,
    weights_bt: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """KL(p_teacher^tau || p_student^tau) per token, in nats, in float32.

  ``p^tau = softmax(logits / tau)``. With ``top_k`` (an int < V) only the teacher's k largest
  logits are used, with the exact definition

      K = top-k indices of the teacher's logits at this token
      p_i = softmax over K of (t_i / tau)                    (the teacher renormalised on K)
      log q_i = s_i / tau - logsumexp over all V of (s / tau) (the student's full normaliser)
      KL_k = sum over i in K of p_i * (log p_i - log q_i)

  KL_k >= 0, and it is 0 only when the student puts all its mass on K in the teacher's
  proportions; it equals the full KL when k = V. Only [..., k] teacher values and indices are
  kept for the loss instead of the teacher's [..., V] distribution. The teacher side carries
  no gradient (``stop_gradient``).

  Returns:
    ``(kl_sum, per_token_bt)``: ``per_token_bt`` is the KL times the weight (0 on padding).
  """
  weights = weights_bt.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits_btv.astype(jnp.float32)) / temperature
  s = student_logits_btv.astype(jnp.float32) / temperature
  log_q_btv = jax.nn.log_softmax(s, axis=-1)
  if top_k is not None and 0 < top_k < t.shape[-1]:
    t_btk, idx_btk = jax.lax.top_k(t, top_k)
    log_p_btk = jax.nn.log_softmax(t_btk, axis=-1)
    log_q_btk = jnp.take_along_axis(log_q_btv, idx_btk, axis=-1)
  else:
    log_p_btk = jax.nn.log_softmax(t, axis=-1)
    log_q_btk = log_q_btv
  # Finite logits give finite log-probs, so a teacher probability that underflows adds 0.
  kl_bt = jnp.sum(jnp.exp(log_p_btk) * (log_p_btk - log_q_btk), axis=-1)
  per_token_bt = kl_bt * weights
  return jnp.sum(per_token_bt), per_token_bt
