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


def test_utf8_table_follows_the_utf8_rules():
  from xlingo.data import vocab_facts as v

  pieces = [b"", b"a", b"\xe1", b"\x83", b"\x90", b"\xe1\x83", b"\xed", b"\xa0", b"\xc0",
            "ქ".encode()]
  t = v.utf8_transitions(pieces, size=12)
  ready, reject = v.UTF8_READY, v.UTF8_REJECT
  assert t[ready].tolist() == [ready, ready, v.UTF8_NEED2, reject, reject, v.UTF8_NEED1,
                               v.UTF8_AFTER_ED, reject, reject, ready, ready, ready]
  assert t[v.UTF8_NEED2, 3] == v.UTF8_NEED1 and t[v.UTF8_NEED1, 4] == ready
  assert t[v.UTF8_NEED1, 0] == reject  # EOS inside a character
  assert t[v.UTF8_NEED1, 1] == reject  # text inside a character
  assert t[v.UTF8_AFTER_ED, 7] == reject  # ED A0: a UTF-16 surrogate


def _georgian_rows(model, params, vocab, utf8, temperature, rows=96):
  # The shipped vocabulary has no Georgian pieces: the prompt is all byte-fallback pieces.
  prompt = list(vocab.encode("ქა"))
  return gen.generate_ids(model, params, [prompt] * rows, 1, max_len=16,
                          temperature=temperature, seed=5, utf8=utf8)


def test_sampling_never_breaks_utf8_with_byte_fallback_pieces(model_params):
  from xlingo.data import vocab_facts as v
  from xlingo.data import vocabulary

  model, params = model_params
  vocab = vocabulary.load(v.embedded_path())
  high = {i for i, b in enumerate(vocab.piece_byte_strings())
          if vocab.tokenizer.is_byte(i) and b[0] >= 0x80}
  assert len(high) == 128
  table = gen.utf8_table(vocab, model.config.vocab_size)
  masked = _georgian_rows(model, params, vocab, table, temperature=100.0)
  free = _georgian_rows(model, params, vocab, None, temperature=100.0)
  # Non-ASCII byte pieces were sampled (leads and the continuations the mask then forces).
  assert sum(i in high for row in masked for i in row) > 0
  assert not any("\ufffd" in vocab.decode(row) for row in masked)
  # The same sampling without the mask does break (so the check above can fail).
  assert any("\ufffd" in vocab.decode(row) for row in free)


def test_utf8_mask_leaves_valid_greedy_output_alone(model_params):
  from xlingo.data import vocab_facts as v
  from xlingo.data import vocabulary

  model, params = model_params
  vocab = vocabulary.load(v.embedded_path())
  table = gen.utf8_table(vocab, model.config.vocab_size)
  prompts = PROMPTS + [list(vocab.encode("ქა"))]
  plain = gen.generate_ids(model, params, prompts, 1, max_len=MAX_NEW)
  masked = gen.generate_ids(model, params, prompts, 1, max_len=MAX_NEW, utf8=table)
  valid = [r for r, row in enumerate(plain) if v.UTF8_REJECT not in gen._utf8_walk(table, row)
           and "\ufffd" not in vocab.decode(row)]
  assert valid
  assert [masked[r] for r in valid] == [plain[r] for r in valid]


def test_utf8_mask_on_a_byte_heavy_sampler():
  """The mask and the state the loop carries, on logits that favour byte pieces 40:1 (a model
  sampling a script its vocabulary lacks): 128 rows of 48 samples at temperature 1."""
  from xlingo.data import vocab_facts as v
  from xlingo.data import vocabulary

  vocab = vocabulary.load(v.embedded_path())
  table = jnp.asarray(gen.utf8_table(vocab, vocab.vocab_size))
  is_byte = np.asarray([vocab.tokenizer.is_byte(i) for i in range(vocab.vocab_size)])
  logits_v = jnp.asarray(np.where(is_byte, np.log(40.0 * vocab.vocab_size / 256), 0.0),
                         jnp.float32)

  def step(state_b, key):
    logits_bv = gen.mask_broken_utf8(jnp.broadcast_to(logits_v, (128, logits_v.shape[0])),
                                     table, state_b)
    tok_b = gen.sample_logits(logits_bv, key, temperature=1.0, top_k=0, top_p=1.0)
    return gen.next_utf8_state(table, state_b, tok_b), tok_b

  state_b, toks_tb = jax.lax.scan(step, jnp.zeros((128,), jnp.int32),
                                  jax.random.split(jax.random.PRNGKey(0), 48))
  rows = np.asarray(toks_tb).T.tolist()
  assert np.mean(is_byte[np.asarray(toks_tb)]) > 0.9
  # A row cut inside a character keeps only its complete characters, as generate_ids does.
  texts = [vocab.decode(gen.whole_characters(np.asarray(table), row)) for row in rows]
  assert not any("\ufffd" in t for t in texts)
  assert sum(any(ord(c) > 0x7ff for c in t) for t in texts) > 50  # 3- and 4-byte characters


def test_lang_flag_names_several_languages_or_all():
  from xlingo import generate as generate_cli
  from xlingo.data.languages import LanguageTable
  from xlingo.errors import ConfigError

  table = LanguageTable(("en", "de", "ka"))
  assert generate_cli.lang_codes("de,ka", table) == ["de", "ka"]
  assert generate_cli.lang_codes("all", table) == ["en", "de", "ka"]
  assert generate_cli.lang_codes("none,de,de", table) == ["none", "de"]
  with pytest.raises(ConfigError, match="fr is not a language of the checkpoint"):
    generate_cli.lang_codes("de,fr", table)
