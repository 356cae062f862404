"""Decoding with the KV cache: greedy or sampled continuations of prompts in a chosen
language (``generate`` on the command line, the translation scorer, the demo).

The language id is given for every position (the model adds its language embedding to each
token), so ``--lang`` steers the continuation. ``--lang none`` gives no language hint (the
"unknown language", a zero language vector; ``decoder.UNKNOWN_LANG``): the model continues in
whatever language the prompt suggests, which it has learned to do when it was trained with
``model.lang_emb_dropout`` > 0. A row starts with the vocabulary's start id at position 0 (the
input at a segment's start in training: 0 for SentencePiece; xlingo/data/vocabulary.py) and
its prompt tokens follow (the model's inputs are the targets shifted right); generation stops
at the vocabulary's EOS or after ``--max_len`` new tokens, whichever comes first.

Sampling never writes broken UTF-8. Byte pieces (SentencePiece's ``<0xNN>`` byte fallback,
byte-level BPE's single bytes and the byte-level pieces that hold part of a character) spell a
character across several pieces; sampled freely, a model that has seen little of a script picks
a lead byte with no continuation, a lone continuation byte or EOS halfway, and the text shows
U+FFFD where the bytes break. So every row carries the state of a UTF-8 reader over its bytes
(one small int: which bytes the unfinished character still needs), and each step allows only
the ids whose bytes continue from that state (``vocab_facts.utf8_transitions``: one table of
``[state, id] -> next state`` built once from the vocabulary). Inside a character only the
fitting continuation bytes remain; between characters a lone continuation byte and invalid
lead bytes are out. The masked ids are renormalised away, which is sampling from the model
conditioned on well-formed text; greedy decoding is unchanged wherever its argmax was allowed.
A row that reaches ``max_len`` inside a character drops that character's bytes. Without a
vocabulary (``generate_ids`` without ``utf8``) nothing is masked.

Batching rows of different prompt lengths: all rows share the cache index, so nothing is
padded. The prefix every prompt has (the start id plus the shortest prompt) is prefilled in
one call;
after that the rows advance one position per step, and a row still inside its prompt is fed
its own next prompt token instead of the sample (the sample is discarded). Every row's
positions are therefore 0, 1, 2, ... without gaps, exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xlingo.data import vocab_facts
from xlingo.data.vocab_facts import EOS_ID, PAD_ID, UTF8_READY, UTF8_REJECT
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib

NO_HINT = "none"  # --lang none: no language hint (decoder.UNKNOWN_LANG)


# --- sampling -------------------------------------------------------------------------------


def sample_logits(logits_bv: jax.Array, rng: jax.Array, *, temperature, top_k, top_p
                  ) -> jax.Array:
  """One token per row: argmax at a (Python) temperature of 0, else top-k then nucleus sampling.

  ``temperature``, ``top_k`` (0: no limit) and ``top_p`` may be traced scalars, so one compiled
  decode loop serves every sampling setting.
  """
  if isinstance(temperature, (int, float)) and temperature <= 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  vocab = logits_bv.shape[-1]
  neg = jnp.finfo(jnp.float32).min
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_b1 = jax.lax.dynamic_index_in_dim(sorted_bv, k - 1, axis=1)
  sorted_bv = jnp.where(jnp.arange(vocab) < k, sorted_bv, neg)
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  # Nucleus over the top-k: keep the smallest prefix whose mass reaches top_p (the most likely
  # token always stays).
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  cutoff_b1 = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1, keepdims=True)
  logits_bv = jnp.where(logits_bv < jnp.maximum(kth_b1, cutoff_b1), neg, logits_bv)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


def mask_broken_utf8(logits_bv: jax.Array, utf8_sv: jax.Array, state_b: jax.Array) -> jax.Array:
  """``logits_bv`` with the ids whose bytes cannot follow each row's UTF-8 state (``utf8_sv``:
  ``vocab_facts.utf8_transitions``) at the lowest logit. A row with no allowed id (a table
  that cannot express its state) is left as it is rather than sampled from nothing."""
  allowed_bv = utf8_sv[state_b][:, :logits_bv.shape[-1]] != UTF8_REJECT
  allowed_bv = allowed_bv | ~jnp.any(allowed_bv, axis=-1, keepdims=True)
  return jnp.where(allowed_bv, logits_bv, jnp.finfo(logits_bv.dtype).min)


def next_utf8_state(utf8_sv: jax.Array, state_b: jax.Array, tok_b: jax.Array) -> jax.Array:
  """Each row's UTF-8 state after ``tok_b``; a rejected id (only a prompt can force one, or
  a finished row's filler) starts the reader afresh."""
  nxt_b = utf8_sv[state_b, jnp.minimum(tok_b, utf8_sv.shape[1] - 1)].astype(jnp.int32)
  return jnp.where(nxt_b == UTF8_REJECT, UTF8_READY, nxt_b)


_UTF8_TABLES: dict = {}


def utf8_table(vocab, size: int) -> np.ndarray:
  """The vocabulary's UTF-8 transition table (``vocab_facts.utf8_transitions``) for a model
  of ``size`` rows, built once per vocabulary."""
  key = (vocab.checksum, int(size))
  if key not in _UTF8_TABLES:
    _UTF8_TABLES[key] = vocab_facts.utf8_transitions(vocab.piece_byte_strings(), int(size))
  return _UTF8_TABLES[key]


def _utf8_walk(table: np.ndarray, ids, state: int = UTF8_READY) -> list[int]:
  """The reader's state after each of ``ids`` (rejected ids start afresh, as in the loop)."""
  out = []
  for i in ids:
    state = int(table[state, i]) if 0 <= i < table.shape[1] else UTF8_READY
    state = UTF8_READY if state == UTF8_REJECT else state
    out.append(state)
  return out


def whole_characters(table: np.ndarray, ids: list[int]) -> list[int]:
  """``ids`` less a character left unfinished at its end (a row cut at max_len)."""
  states = _utf8_walk(table, ids)
  end = len(ids)
  while end and states[end - 1] != UTF8_READY:
    end -= 1
  return list(ids[:end])


# --- the decode loop ------------------------------------------------------------------------


# Flax modules with a ConfigDict are not hashable, so compiled loops are cached by the model's
# id; the entry keeps the model alive, so the id cannot be reused by another object.
_COMPILED: dict = {}


def _decode_fn(model, prefill: int, total: int, greedy: bool):
  """Jitted (params, cache, tokens, is_prompt, lang_ids, row_end, eos, rng, sampling,
  utf8 table, utf8 states) -> tokens."""
  key = (id(model), prefill, total, greedy)
  if key not in _COMPILED:
    if len(_COMPILED) > 64:
      _COMPILED.clear()
    _COMPILED[key] = (model, _build_decode_fn(model, prefill, total, greedy))
  return _COMPILED[key][1]


def _build_decode_fn(model, prefill, total, greedy):

  def step(params, cache, tok_bt, lang_bt):
    (logits_btv, _), mut = model.apply({"params": params, "cache": cache}, tok_bt, None, None,
                                       lang_bt, decode=True, mutable=["cache"])
    return logits_btv[:, -1], mut["cache"]

  def run(params, cache, tokens_bt, is_prompt_bt, lang_bt, end_b, eos, rng, sampling,
          utf8_sv, state_b):
    temperature, top_k, top_p = sampling
    temperature = 0.0 if greedy else temperature
    batch = tokens_bt.shape[0]
    logits_bv, cache = step(params, cache, tokens_bt[:, :prefill], lang_bt[:, :prefill])

    def cond(carry):
      t, _, _, done_b = carry[:4]
      return (t < total) & ~jnp.all(done_b)

    def body(carry):
      t, tokens_bt, cache, done_b, rng, logits_bv, state_b = carry
      rng, sub = jax.random.split(rng)
      logits_bv = mask_broken_utf8(logits_bv, utf8_sv, state_b)
      tok_b = sample_logits(logits_bv, sub, temperature=temperature, top_k=top_k, top_p=top_p)
      prompt_b = is_prompt_bt[:, t]
      tok_b = jnp.where(prompt_b, tokens_bt[:, t], tok_b)
      tok_b = jnp.where(done_b, PAD_ID, tok_b)  # a finished row's filler, never returned
      tokens_bt = tokens_bt.at[:, t].set(tok_b)
      state_b = next_utf8_state(utf8_sv, state_b, tok_b)
      done_b = done_b | (~prompt_b & (tok_b == eos)) | (t + 1 >= end_b)
      # Feeding position t also on the last step keeps the loop body uniform; the cache has
      # room for it (total <= model.max_len) and its logits are simply not used.
      lang_b1 = jax.lax.dynamic_slice_in_dim(lang_bt, t, 1, axis=1)
      logits_bv, cache = step(params, cache, tok_b[:, None], lang_b1)
      return t + 1, tokens_bt, cache, done_b, rng, logits_bv, state_b

    init = (jnp.int32(prefill), tokens_bt, cache, jnp.zeros((batch,), bool), rng, logits_bv,
            state_b)
    return jax.lax.while_loop(cond, body, init)[1]

  return jax.jit(run)


def _per_row(value, n: int, what: str) -> list[int]:
  if isinstance(value, (int, np.integer)):
    return [int(value)] * n
  value = [int(v) for v in value]
  if len(value) != n:
    raise ConfigError(f"{what} has {len(value)} entries for {n} prompts; give one per prompt")
  return value


def generate_ids(model, params, prompt_ids: Sequence[Sequence[int]], lang_id, *, max_len: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 prompt_lang_ids=None, eos_id: int = EOS_ID, start_id: int = PAD_ID,
                 utf8: np.ndarray | None = None) -> list[list[int]]:
  """Token-level :func:`generate`: the new tokens of each row, ``eos_id`` excluded. ``eos_id``
  and ``start_id`` are the vocabulary's (``vocab.eos_id``, ``vocab.start_id``; the defaults
  are SentencePiece's); ``utf8`` is its :func:`utf8_table` (None: no UTF-8 mask)."""
  n = len(prompt_ids)
  if n == 0:
    return []
  if int(max_len) < 1:
    raise ConfigError(f"max_len={max_len} must be >= 1 (new tokens per row)")
  langs = _per_row(lang_id, n, "lang_id")
  prompt_langs = langs if prompt_lang_ids is None else _per_row(prompt_lang_ids, n,
                                                                "prompt_lang_ids")
  lengths = [len(p) for p in prompt_ids]
  cache_len = int(model.config.max_len)
  if 1 + max(lengths) >= cache_len:
    raise ConfigError(f"a prompt of {max(lengths)} tokens leaves no room to generate within "
                     f"model.max_len={cache_len}; shorten the prompt")
  # Sizes are rounded (the loop stops per row at ``ends`` anyway), so that batches of varied
  # prompts reuse a few compiled loops: the prefill to a power of two, the buffer to 32.
  total = min(-(-(1 + max(lengths) + int(max_len)) // 32) * 32, cache_len)
  prefill = 1 << (1 + min(lengths)).bit_length() - 1
  ends = np.asarray([min(1 + n_p + int(max_len), cache_len) for n_p in lengths], np.int32)
  tokens = np.zeros((n, total), np.int32)
  is_prompt = np.zeros((n, total), bool)
  lang_ids = np.zeros((n, total), np.int32)
  for r, p in enumerate(prompt_ids):
    tokens[r, 0] = start_id
    tokens[r, 1:1 + len(p)] = p
    is_prompt[r, :1 + len(p)] = True
    # lang_ids[i] is the language of the token predicted at position i (training's
    # convention: the id belongs to the target), so the prompt's own tokens take the prompt's
    # language and everything from the last prompt position on takes the target language.
    lang_ids[r, :len(p)] = prompt_langs[r]
    lang_ids[r, len(p):] = langs[r]
  if utf8 is None:  # one state that allows every id
    utf8 = np.full((1, int(model.config.vocab_size)), UTF8_READY, np.int8)
  # The loop starts after the prefill: each row's reader state over its prefilled tokens.
  state = np.asarray([(_utf8_walk(utf8, tokens[r, 1:prefill]) or [UTF8_READY])[-1]
                      for r in range(n)], np.int32)
  fn = _decode_fn(model, prefill, total, float(temperature) <= 0.0)
  sampling = (jnp.float32(max(float(temperature), 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
  cache = decoder_lib.init_cache(model, n)
  out = np.asarray(jax.device_get(fn(params, cache, jnp.asarray(tokens), jnp.asarray(is_prompt),
                                     jnp.asarray(lang_ids), jnp.asarray(ends),
                                     jnp.int32(eos_id), jax.random.PRNGKey(seed), sampling,
                                     jnp.asarray(utf8), jnp.asarray(state))))
  results = []
  for r, length in enumerate(lengths):
    new = out[r, 1 + length:ends[r]].tolist()
    if eos_id in new:
      new = new[:new.index(eos_id)]
    results.append(whole_characters(utf8, new))
  return results


def generate(model, params, vocab, prompts: list[str], lang_id: int | list[int], *,
             max_len: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, prompt_lang_ids: int | list[int] | None = None) -> list[str]:
  """Continuations of ``prompts`` (without the prompt) in language ``lang_id``.

  Args:
    model: a ``xlingo.model.decoder.Decoder``.
    params: its parameters (placed arrays; sharded ones work).
    vocab: the run's vocabulary (``xlingo.data.vocabulary``: SentencePiece or Hugging Face).
    prompts: one string per row; "" starts from the start id alone.
    lang_id: index into ``config.data.languages`` of the language to generate, one for all
      rows or one per row; ``decoder.UNKNOWN_LANG`` (-1) for no language hint.
    max_len: at most this many new tokens per row (less if ``model.max_len`` is reached).
    temperature: 0 is greedy; otherwise sample from softmax(logits / temperature), restricted
      to the ``top_k`` most likely tokens (0: all) and the nucleus of mass ``top_p``.
    seed: the sampling key.
    prompt_lang_ids: language of the prompt tokens (default ``lang_id``); for translation give
      the source language, as the conditional training tasks do.
  """
  ids = [list(vocab.encode(p)) if p else [] for p in prompts]
  out = generate_ids(model, params, ids, lang_id, max_len=max_len, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed, prompt_lang_ids=prompt_lang_ids,
                     eos_id=vocab.eos_id, start_id=vocab.start_id,
                     utf8=utf8_table(vocab, model.config.vocab_size))
  return [vocab.decode(o) if o else "" for o in out]
