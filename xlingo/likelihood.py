"""Log-likelihoods of continuations given contexts: the one scorer that ``evaluate
--multiple_choice`` and the lm-evaluation-harness adaptor (``xlingo.lm_eval_adapter``) share,
so that the two give the same numbers for the same items.

A request is a context and a continuation (token ids) and the language of each. It is scored
in one row laid out as in training: the vocabulary's start id at position 0, then the context,
then the continuation (the inputs are the tokens shifted right by the start id); the language
id at a position is the language of the token predicted there (the context's tokens carry the
context's language, the continuation's tokens the continuation's, as in the conditional
training tasks and ``xlingo.decode``; ``decoder.UNKNOWN_LANG`` gives no hint). The result is
the sum of the continuation tokens' log-probabilities (log-softmax of float32 logits) and
whether every continuation token is the argmax at its position (``is_greedy``).

Text is encoded with :func:`encode_pair`: context and continuation separately (no special
token added), so a continuation's tokens are the same whatever precedes it.

**Longer than the context.** A row holds ``model.max_len`` tokens to predict (the start id
plus ``max_len - 1`` inputs). A request that does not fit keeps its continuation whole and the
*last* tokens of its context (left truncation: the start id stays at position 0, the earliest
context tokens are dropped); :func:`score` counts these in ``Scored.truncated``. A continuation
that alone exceeds ``max_len`` tokens is a one-line ``ConfigError`` raised before anything runs.

**Rolling log-likelihood** (:func:`rolling_requests`, perplexity of a whole text): the text's
tokens are cut into windows, each token predicted exactly once: the first window predicts the
first ``max_len`` tokens from the start id alone; every later window predicts the next
``max_len // 2`` tokens (the last one, what remains) with as many preceding tokens as context
as the row has room for, so every token after the first window sees at least half a window of
context.

**Batching.** Rows are grouped by length into buckets (powers of two from 16, capped at
``max_len``) and batches of ``batch_size`` rows (rounded up to the mesh's data-parallel size;
short batches are filled with empty rows), so a run compiles one program per bucket. Rows are
split over the mesh's data axes, the parameters stay as ``load_model`` placed them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xlingo import sharding
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib

UNKNOWN_LANG = decoder_lib.UNKNOWN_LANG
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Request:
  """Token ids of a context and its continuation, and the language id of each."""

  context: tuple[int, ...]
  continuation: tuple[int, ...]
  context_lang: int = UNKNOWN_LANG
  continuation_lang: int = UNKNOWN_LANG


@dataclasses.dataclass
class Scored:
  """Per request: summed log-probability and is_greedy; how many contexts were truncated."""

  logprobs: list[float]
  greedy: list[bool]
  truncated: int = 0


def encode_pair(vocab, context: str, continuation: str, context_lang: int = UNKNOWN_LANG,
                continuation_lang: int = UNKNOWN_LANG) -> Request:
  """The request of a (context, continuation) text pair: each encoded on its own."""
  ctx = tuple(vocab.encode(context)) if context else ()
  cont = tuple(vocab.encode(continuation)) if continuation else ()
  return Request(ctx, cont, int(context_lang), int(continuation_lang))


def fit(request: Request, max_len: int, where: str = "a request") -> tuple[Request, bool]:
  """``request`` cut to ``max_len`` tokens by dropping its context's first tokens, and
  whether it was cut; ConfigError when the continuation alone does not fit."""
  n_cont = len(request.continuation)
  if n_cont > max_len:
    raise ConfigError(f"{where}: its continuation is {n_cont} tokens, longer than the model's "
                      f"context of {max_len} (model.max_len); shorten it or evaluate with a "
                      "larger max_length")
  room = max_len - n_cont
  if len(request.context) <= room:
    return request, False
  ctx = request.context[len(request.context) - room:] if room else ()
  return dataclasses.replace(request, context=ctx), True


def rolling_requests(ids: Sequence[int], max_len: int, lang: int = UNKNOWN_LANG
                     ) -> list[Request]:
  """The windows (module docstring) whose continuations cover ``ids`` exactly once."""
  ids = tuple(int(i) for i in ids)
  out, start = [], 0
  while start < len(ids):
    size = max_len if start == 0 else max(1, max_len // 2)
    end = min(start + size, len(ids))
    ctx = ids[max(0, end - max_len):start]
    out.append(Request(ctx, ids[start:end], lang, lang))
    start = end
  return out


# --- the compiled scorer --------------------------------------------------------------------

# Flax modules with a ConfigDict are not hashable: scorers are cached by the model's id, the
# entry keeping the model alive (as xlingo.decode does for its loops).
_COMPILED: dict = {}


def _score_fn(model):
  key = id(model)
  if key not in _COMPILED:
    if len(_COMPILED) > 16:
      _COMPILED.clear()

    def run(params, inputs_bt, targets_bt, lang_bt):
      logits_btv, _ = model.apply({"params": params}, inputs_bt, None, None, lang_bt)
      logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
      logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
      greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
      return logp_bt, greedy_bt

    _COMPILED[key] = (model, jax.jit(run))
  return _COMPILED[key][1]


def bucket(length: int, max_len: int) -> int:
  """The padded row length of a row of ``length`` tokens."""
  b = MIN_BUCKET
  while b < length:
    b *= 2
  return min(b, max_len)


def score(lm, requests: Sequence[Request], *, batch_size: int = 16) -> Scored:
  """Summed continuation log-probabilities and is_greedy of ``requests`` (in their order)
  for a ``load.LoadedModel`` ``lm`` (module docstring: layout, truncation, batching)."""
  max_len = int(lm.model.config.max_len)
  fitted, truncated = [], 0
  for i, r in enumerate(requests):
    f, cut = fit(r, max_len, f"request {i}")
    fitted.append(f)
    truncated += cut
  logprobs = [0.0] * len(fitted)
  greedy = [True] * len(fitted)
  dp = sharding.data_parallel_size(lm.mesh)
  rows = max(1, -(-int(batch_size) // dp)) * dp
  # Longest first within each bucket, so that batches hold rows of similar length.
  order = sorted((i for i, r in enumerate(fitted) if r.continuation),
                 key=lambda i: (bucket(len(fitted[i].context) + len(fitted[i].continuation),
                                       max_len), -len(fitted[i].context)
                                - len(fitted[i].continuation), i))
  fn = _score_fn(lm.model)
  start_id = int(lm.vocab.start_id)
  batch_sh = sharding.batch_sharding(lm.mesh)
  groups: dict[int, list[int]] = {}
  for i in order:
    r = fitted[i]
    groups.setdefault(bucket(len(r.context) + len(r.continuation), max_len), []).append(i)
  with sharding.mesh_context(lm.mesh, lm.rules):
    for length, members in sorted(groups.items()):
      for s in range(0, len(members), rows):
        chunk = members[s:s + rows]
        inputs = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        langs = np.full((rows, length), UNKNOWN_LANG, np.int32)
        for row, i in enumerate(chunk):
          r = fitted[i]
          toks = r.context + r.continuation
          n = len(toks)
          inputs[row, 0] = start_id
          inputs[row, 1:n] = toks[:-1]
          targets[row, :n] = toks
          langs[row, :len(r.context)] = r.context_lang
          langs[row, len(r.context):n] = r.continuation_lang
        put = lambda a: jax.device_put(a, batch_sh)
        logp_bt, greedy_bt = jax.device_get(fn(lm.params, put(inputs), put(targets),
                                               put(langs)))
        for row, i in enumerate(chunk):
          r = fitted[i]
          a, b = len(r.context), len(r.context) + len(r.continuation)
          logprobs[i] = float(np.sum(logp_bt[row, a:b], dtype=np.float64))
          greedy[i] = bool(np.all(greedy_bt[row, a:b]))
  return Scored(logprobs, greedy, truncated)
