"""Generation with the KV cache against repeated full forward passes, on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from xlingo import decode as gen
from xlingo.data.vocab import EOS_ID
from xlingo.model.decoder import Decoder

MAX_NEW = 6


@pytest.fixture(scope="module")
def model_params():
  cfg = tiny.get_config().model
  cfg.max_len = 24  # a short cache keeps the decode loop cheap
  model = Decoder(cfg)
  abstract = jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))["params"]
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    # A large scale on the language table so that the language visibly steers a random model.
    scale = 1.0 if path[-1].key in ("token_embedding", "lang_embedding") else 0.3
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, abstract)


def _greedy_full_forward(model, params, prompt, lang, prompt_lang, max_new):
  """Reference: rerun the whole sequence for every new token, no cache."""
  total = model.config.max_len
  fwd = jax.jit(lambda p, x, lg: model.apply({"params": p}, x, None, None, lg)[0])
  seq = [0] + list(prompt)
  out = []
  while len(out) < max_new and len(seq) < total:
    x = np.zeros((1, total), np.int32)
    x[0, :len(seq)] = seq
    lg = np.full((1, total), lang, np.int32)
    lg[0, :len(prompt)] = prompt_lang
    logits = fwd(params, jnp.asarray(x), jnp.asarray(lg))
    tok = int(jnp.argmax(logits[0, len(seq) - 1]))
    if tok == EOS_ID:
      break
    out.append(tok)
    seq.append(tok)
  return out


PROMPTS = [[45, 300, 12, 7], [99], [5, 6, 7, 8, 9, 10, 11]]


def test_kv_cache_greedy_equals_full_forward_batched_ragged(model_params):
  model, params = model_params
  got = gen.generate_ids(model, params, PROMPTS, [1, 2, 3], max_len=MAX_NEW,
                         prompt_lang_ids=[0, 0, 4])
  for r, prompt in enumerate(PROMPTS):
    want = _greedy_full_forward(model, params, prompt, [1, 2, 3][r], [0, 0, 4][r], MAX_NEW)
    assert got[r] == want, r
  # A row's result does not depend on the other rows of the batch.
  alone = gen.generate_ids(model, params, PROMPTS[2:], 3, max_len=MAX_NEW, prompt_lang_ids=4)
  assert alone[0] == got[2]


def test_top_k_1_is_greedy_and_languages_differ(model_params):
  model, params = model_params
  prompts = [[45, 300, 12], [17, 18]]
  greedy = gen.generate_ids(model, params, prompts, 1, max_len=MAX_NEW)
  top1 = gen.generate_ids(model, params, prompts, 1, max_len=MAX_NEW, temperature=0.7,
                          top_k=1, seed=3)
  assert top1 == greedy
  other = gen.generate_ids(model, params, prompts, 7, max_len=MAX_NEW)
  assert other != greedy
  sampled = [gen.generate_ids(model, params, prompts, 1, max_len=MAX_NEW, temperature=1.0,
                              top_p=0.9, seed=s) for s in (0, 1)]
  assert sampled[0] != sampled[1]
  assert all(len(r) <= MAX_NEW for r in sampled[0])


def test_generation_stops_at_cache_end_and_rejects_long_prompts(model_params):
  model, params = model_params
  out = gen.generate_ids(model, params, [[5] * 20], 0, max_len=50)
  assert len(out[0]) <= model.config.max_len - 21
  with pytest.raises(ValueError, match="no room"):
    gen.generate_ids(model, params, [[5] * 23], 0, max_len=4)


def test_sample_logits_top_p_keeps_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  seen = set()
  for s in range(40):
    seen.add(int(gen.sample_logits(logits, jax.random.PRNGKey(s), temperature=1.0, top_k=0,
                                   top_p=0.7)[0]))
  assert seen == {0, 1}
