"""Losses: token cross-entropy (with optional z-loss), the language-identification loss, the
distillation KL, each also chunked over the sequence, and InfoNCE for contrastive alignment.

All return sums plus the weight sum rather than a mean, so that microbatches, hosts and
per-language breakdowns can be added up before one final division.

The chunked forms take the model's final hidden states [B, T, D] and a function that projects
a slice of them onto the vocabulary, instead of the [B, T, V] float32 logits: at a 32k
vocabulary and 2048-token rows the full logits and their gradient are 4 GiB each per 16 rows.
The sequence is cut into chunks of ``chunk_size`` positions and a ``lax.scan`` runs over them
with a rematerialised body (``jax.checkpoint``): the forward pass keeps only per-token values
and the backward pass recomputes one chunk's logits at a time, pulls its gradient back to the
hidden states and the output weights, and drops it. So at most one chunk's [B, C, V] logits
(and their gradient) exist at any time, at the price of recomputing the output projection
(one extra [B*T, D] x [D, V] matmul per step). The batch axis is kept whole inside a chunk, so
a batch sharded over data-parallel devices stays sharded.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from xlingo.errors import ConfigError

# hidden [B, C, D] -> float32 logits [B, C, V]
LogitsFn = Callable[[jax.Array], jax.Array]


def cross_entropy_loss(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    z_loss: float = 0.0,
    scale_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax cross-entropy in float32.

  Args:
    logits_btv: [..., V] logits (any float dtype; computed in float32).
    targets_bt: [...] int target ids.
    weights_bt: [...] loss weights (0 on padding and on tokens that do not count).
    z_loss: coefficient of log(Z)^2 (PaLM), which keeps the softmax normaliser near 1.
    scale_bt: [...] factors of each token's term in ``loss_sum`` only (per-language loss
      weights), so that ``per_token_loss_bt`` stays the plain, unweighted cross-entropy.

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
  objective_w = weights if scale_bt is None else weights * scale_bt.astype(jnp.float32)
  loss_sum = jnp.sum(per_token_bt if scale_bt is None else
                     (log_z_bt - target_logit_bt) * objective_w)
  if z_loss:
    loss_sum = loss_sum + z_loss * jnp.sum(jnp.square(log_z_bt) * objective_w)
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
  t = jax.lax.stop_gradient(teacher_logits_btv.astype(jnp.float32))
  if top_k is not None and 0 < top_k < t.shape[-1]:
    t_btk, idx_btk = jax.lax.top_k(t, top_k)
    return kl_divergence_top_k(t_btk, idx_btk, student_logits_btv, weights_bt, temperature)
  weights = weights_bt.astype(jnp.float32)
  t = t / temperature
  log_q_btv = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / temperature, axis=-1)
  log_p_btk = jax.nn.log_softmax(t, axis=-1)
  log_q_btk = log_q_btv
  return _kl_sums(log_p_btk, log_q_btk, weights)


def kl_divergence_top_k(
    teacher_btk: jax.Array,
    idx_btk: jax.Array,
    student_logits_btv: jax.Array,
    weights_bt: jax.Array,
    temperature: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """:func:`kl_divergence`'s top-k form from the teacher's k values (logits, or log-probs: a
  shift per token changes nothing) at token ids ``idx_btk``: what stored teacher logits give."""
  weights = weights_bt.astype(jnp.float32)
  t_btk = jax.lax.stop_gradient(teacher_btk.astype(jnp.float32)) / temperature
  log_p_btk = jax.nn.log_softmax(t_btk, axis=-1)
  log_q_btv = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / temperature, axis=-1)
  log_q_btk = jnp.take_along_axis(log_q_btv, idx_btk, axis=-1)
  return _kl_sums(log_p_btk, log_q_btk, weights)


def _kl_sums(log_p_btk, log_q_btk, weights):
  # Finite logits give finite log-probs, so a teacher probability that underflows adds 0.
  kl_bt = jnp.sum(jnp.exp(log_p_btk) * (log_p_btk - log_q_btk), axis=-1)
  per_token_bt = kl_bt * weights
  return jnp.sum(per_token_bt), per_token_bt


def _num_chunks(length: int, chunk_size: int) -> int:
  """How many chunks of ``chunk_size`` positions cover ``length``; 1 means unchunked."""
  if chunk_size <= 0 or chunk_size >= length:
    return 1
  if length % chunk_size:
    raise ConfigError(f"train.loss_chunk_size={chunk_size} does not divide the sequence length "
                      f"{length}; use a divisor of it (or 0 for no chunking)")
  return length // chunk_size


def chunked_over_length(fn, chunk_size: int, *arrays_bt):
  """``fn(*chunks) -> (sums, per_token)`` over chunks of the sequence axis, added up.

  ``arrays_bt`` are [B, T, ...] arrays cut along T; ``fn`` returns a tuple of scalars (summed
  over the chunks) and a tuple of [B, C] per-token arrays (put back together into [B, T]).
  Each chunk's body is rematerialised in the backward pass, so nothing [B, C, V]-sized is kept
  between chunks.
  """
  b, length = arrays_bt[0].shape[:2]
  n = _num_chunks(length, chunk_size)
  if n == 1:
    return fn(*arrays_bt)
  c = length // n

  def split(x):  # [B, T, ...] -> [n, B, C, ...]
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  # Inside scan the recomputation cannot be merged with the forward pass, so CSE prevention
  # is not needed.
  body_fn = jax.checkpoint(fn, prevent_cse=False)

  def body(acc, xs):
    sums, per_token = body_fn(*xs)
    return tuple(a + s for a, s in zip(acc, sums)), per_token

  zero_sums, _ = jax.eval_shape(fn, *(x[:, :c] for x in arrays_bt))
  init = tuple(jnp.zeros(s.shape, s.dtype) for s in zero_sums)
  sums, per_token_nbc = jax.lax.scan(body, init, tuple(split(x) for x in arrays_bt))
  per_token = tuple(jnp.moveaxis(p, 0, 1).reshape(b, length) for p in per_token_nbc)
  return sums, per_token


def chunked_cross_entropy(
    logits_fn: LogitsFn,
    hidden_btd: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    z_loss: float = 0.0,
    chunk_size: int = 0,
    scale_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`cross_entropy_loss` of ``logits_fn(hidden_btd)``, ``chunk_size`` positions at a
  time (0: all at once). Same returns: ``(loss_sum, weight_sum, per_token_loss_bt)``."""

  def chunk(h, tgt, w, *scale):
    loss_sum, weight_sum, per_token = cross_entropy_loss(
        logits_fn(h), tgt, w, z_loss=z_loss, scale_bt=scale[0] if scale else None)
    return (loss_sum, weight_sum), (per_token,)

  scale = () if scale_bt is None else (scale_bt,)
  (loss_sum, weight_sum), (per_token,) = chunked_over_length(
      chunk, chunk_size, hidden_btd, targets_bt, weights_bt, *scale)
  return loss_sum, weight_sum, per_token


def chunked_distillation(
    student_logits_fn: LogitsFn,
    student_hidden_btd: jax.Array,
    teacher_logits_fn: LogitsFn,
    teacher_hidden_btd: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    *,
    z_loss: float = 0.0,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The student's cross-entropy and KL(teacher || student), one chunk of positions at a time.

  Each chunk projects both models' hidden states onto the vocabulary and computes
  :func:`cross_entropy_loss` and :func:`kl_divergence` (full or top-k) from them, so neither
  model's full [B, T, V] logits exist. The teacher side carries no gradient.

  Returns:
    ``(ce_sum, ce_per_token_bt, kl_sum, kl_per_token_bt)``.
  """
  teacher_hidden_btd = jax.lax.stop_gradient(teacher_hidden_btd)

  def chunk(s_h, t_h, tgt, w):
    s_logits = student_logits_fn(s_h)
    ce_sum, _, ce_pt = cross_entropy_loss(s_logits, tgt, w, z_loss=z_loss)
    t_logits = jax.lax.stop_gradient(teacher_logits_fn(t_h))
    kl_sum, kl_pt = kl_divergence(t_logits, s_logits, w, temperature=temperature, top_k=top_k)
    return (ce_sum, kl_sum), (ce_pt, kl_pt)

  (ce_sum, kl_sum), (ce_pt, kl_pt) = chunked_over_length(
      chunk, chunk_size, student_hidden_btd, teacher_hidden_btd, targets_bt, weights_bt)
  return ce_sum, ce_pt, kl_sum, kl_pt


def chunked_stored_distillation(
    student_logits_fn: LogitsFn,
    student_hidden_btd: jax.Array,
    teacher_logp_btk: jax.Array,
    teacher_ids_btk: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    *,
    z_loss: float = 0.0,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """:func:`chunked_distillation` with the teacher's top-k read from storage (ids and
  log-probabilities per token) instead of computed. Same returns."""

  def chunk(s_h, t_logp, t_ids, tgt, w):
    s_logits = student_logits_fn(s_h)
    ce_sum, _, ce_pt = cross_entropy_loss(s_logits, tgt, w, z_loss=z_loss)
    kl_sum, kl_pt = kl_divergence_top_k(t_logp, t_ids, s_logits, w, temperature)
    return (ce_sum, kl_sum), (ce_pt, kl_pt)

  (ce_sum, kl_sum), (ce_pt, kl_pt) = chunked_over_length(
      chunk, chunk_size, student_hidden_btd, teacher_logp_btk, teacher_ids_btk, targets_bt,
      weights_bt)
  return ce_sum, ce_pt, kl_sum, kl_pt


def info_nce(
    src_pd: jax.Array,
    tgt_pd: jax.Array,
    temperature: float,
    src_keys_p: jax.Array | None = None,
    tgt_keys_p: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE between paired rows: ``(loss, accuracy)``, means over the P pairs.

  Rows are L2-normalised (cosine similarity); ``logits[i, j] = cos(src_i, tgt_j) / temperature``
  and the loss is the mean of the cross-entropies of every row (source -> target) and every
  column (target -> source) against the diagonal. Every other pair is a negative, except one
  whose source or target text is the same as the anchor pair's (``*_keys_p``: a hash of each
  text): that one is another translation of the same sentence, not a negative, and is left out
  of the softmax. ``accuracy`` is the mean top-1 retrieval of both directions. Computed on the
  global [P, D] arrays inside the compiled step, the [P, P] similarities span the whole batch
  across the mesh (XLA gathers what it needs).
  """
  def unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))

  logits_pp = jnp.einsum("pd,qd->pq", unit(src_pd), unit(tgt_pd)) / temperature
  p = logits_pp.shape[0]
  diag_pp = jnp.eye(p, dtype=bool)
  if src_keys_p is not None and tgt_keys_p is not None:
    same_pp = ((src_keys_p[:, None] == src_keys_p[None, :])
               | (tgt_keys_p[:, None] == tgt_keys_p[None, :]))
    logits_pp = jnp.where(same_pp & ~diag_pp, -jnp.inf, logits_pp)
  pos_p = jnp.diagonal(logits_pp)
  row = jax.nn.logsumexp(logits_pp, axis=1) - pos_p
  col = jax.nn.logsumexp(logits_pp, axis=0) - pos_p
  loss = 0.5 * (jnp.mean(row) + jnp.mean(col))
  hits = (jnp.argmax(logits_pp, axis=1) == jnp.arange(p)).astype(jnp.float32)
  hits_t = (jnp.argmax(logits_pp, axis=0) == jnp.arange(p)).astype(jnp.float32)
  return loss, 0.5 * (jnp.mean(hits) + jnp.mean(hits_t))
