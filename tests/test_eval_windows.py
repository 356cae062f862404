"""Fair measurements: validation lines longer than a row are scored in sliding windows that keep
``train.eval_context`` tokens of context, and the loop counts the bytes it trains on per
language (``bytes/<lang>``) next to the tokens."""

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from configs import tiny
from xlingo.data import packing
from xlingo.data.languages import LanguageTable
from xlingo.model import decoder as decoder_lib
from xlingo.training import hooks, step

L, C, START = 16, 6, 0  # row length, context, the inputs' start id (SentencePiece: 0)


def _piece(examples):
  """One short and one long example, as a reader hands them to the packer."""
  lens = [len(x) for x in examples]
  group = {"values": np.concatenate(examples).astype(np.int32),
           "row_splits": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
           "lang_ids": np.ones(len(examples), np.int32),
           "src_lang_ids": np.zeros(len(examples), np.int32),
           "prefix_len": np.zeros(len(examples), np.int64),
           "raw_bytes": np.concatenate([np.full(n, 3) for n in lens]).astype(np.int32)}
  return packing.flatten_group(group, LanguageTable(("en", "de")), {})


def _batches(piece, context):
  stream = packing.TokenStream(START)
  stream.add(*(packing.sliding_windows(piece, L, context) if context else piece))
  return packing.first_fit_batches(stream, 4, L, final=True)


def test_sliding_window_sum_equals_running_the_model_on_each_window():
  c = tiny.get_config()
  model = decoder_lib.Decoder(c.model)
  rng = np.random.default_rng(0)
  short, long = rng.integers(2, c.model.vocab_size, 5), rng.integers(2, c.model.vocab_size, 40)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))
                    ["params"])
  objective = step.lm_objective(c, model)
  eval_step = jax.jit(step.make_eval_step(objective, jnp.ones(c.model.vocab_size), 2))
  piece = _piece([short, long])

  def windowed(context):
    sums = [jax.device_get(eval_step(params, b, {})) for b in _batches(piece, context)]
    return {k: sum(s[k] for s in sums) for k in sums[0]}

  def nll(window, first_scored):
    """-sum log p of the window's tokens from position ``first_scored`` on, the model run on
    the window alone (inputs: the start id, then the window shifted right)."""
    x = jnp.asarray(np.concatenate([[START], window[:-1]])[None], jnp.int32)
    logits, _ = model.apply({"params": params}, x, None, None, jnp.ones_like(x))
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    return -float(jnp.sum(logp[np.arange(len(window)), window][first_scored:]))

  # by hand: 40 tokens, rows of 16 keeping 6 of context: [0,16) all scored, then [10,26),
  # [20,36), [30,40) each scoring the tokens after their first 6
  want = nll(short, 0) + nll(long[0:16], 0) + sum(nll(long[a:b], C)
                                                  for a, b in ((10, 26), (20, 36), (30, 40)))
  got = windowed(C)
  np.testing.assert_allclose(float(got["loss_lang"][1]), want, rtol=2e-5)
  assert float(got["weight_lang"][1]) == 45  # every token scored once
  assert float(got["bytes_lang"][1]) == 3 * 45
  # context 0 is the plain cut: chunks of 16 that restart without context
  plain = nll(short, 0) + sum(nll(long[a:a + L], 0) for a in (0, 16, 32))
  np.testing.assert_allclose(float(windowed(0)["loss_lang"][1]), plain, rtol=2e-5)
  assert abs(want - plain) > 1e-3  # the context changes the numbers: the test can tell


def test_token_counter_counts_bytes_and_keeps_them_in_the_saved_state():
  it = types.SimpleNamespace(counters={})  # the training iterator's saved counters
  counter = hooks.TokenCounter(("en", "de"), it)
  out = counter.add({"tokens_lang": np.array([3, 4]), "bytes_lang": np.array([10.0, 7.0])})
  assert out == {"tokens/en": 3, "tokens/de": 4, "bytes/en": 10, "bytes/de": 7}
  counter.keep({"tokens_lang": jnp.array([1, 0]), "bytes_lang": jnp.array([2.0, 0.0])})
  assert it.counters == {"tokens_per_language": {"en": 4, "de": 4},
                         "bytes_per_language": {"en": 12, "de": 7}}
  again = hooks.TokenCounter(("en", "de"), it)
  again.restored()
  out = again.add({"tokens_lang": np.array([0, 1]), "bytes_lang": np.array([0.0, 5.0])})
  assert out["bytes/en"] == 12 and out["bytes/de"] == 12 and out["tokens/de"] == 5
