"""Remat policies (model.remat_policy): each trains the same model as none, and each keeps what
it names (the backward pass recomputes fewer matmuls)."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B, T = 2, 16


def _loss_fn(policy):
  cfg = tiny.get_config().model  # float32 compute, scanned blocks
  cfg.remat_policy = policy
  model = decoder_lib.Decoder(cfg)

  def loss(params, tokens):
    logits, _ = model.apply({"params": params}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

  return model, loss


@pytest.fixture(scope="module")
def params_and_tokens():
  model, _ = _loss_fn("none")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 1, model.config.vocab_size)
  params = jax.jit(lambda r: nn.unbox(model.init(r, tokens))["params"],
                   compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0))
  return params, tokens


def _saved_names(policy, params, tokens) -> set[str]:
  """The checkpoint_name tags a policy keeps (one unscanned block, so the residuals are the
  block's own and not the scan's stacked outputs)."""
  cfg = tiny.get_config().model
  cfg.update(remat_policy=policy, scan_layers=False, num_layers=1)
  model = decoder_lib.Decoder(cfg)
  one_block = {**params, "blocks": {"layers_0": jax.tree.map(lambda x: x[0],
                                                             params["blocks"]["layers"])}}
  printed = io.StringIO()  # print_saved_residuals is the public face of the residual list
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: model.apply({"params": p}, tokens)[0].sum(), one_block)
  return set(re.findall(r" named '(\w+)'", printed.getvalue()))


def test_every_policy_gives_none_loss_and_gradients(params_and_tokens):
  params, tokens = params_and_tokens
  losses = {policy: _loss_fn(policy)[1] for policy in decoder_lib.REMAT_POLICIES}
  # One program for all policies: one compile instead of nine.
  results = jax.jit(lambda p, t: {k: jax.value_and_grad(f)(p, t) for k, f in losses.items()},
                    compiler_options=FAST_COMPILE)(params, tokens)
  ref_loss, ref_grads = results["none"]
  for policy, (value, grads) in results.items():
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6, err_msg=policy)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_each_policy_keeps_what_it_names(params_and_tokens):
  params, tokens = params_and_tokens
  for policy, names in {**decoder_lib.REMAT_SAVED, **decoder_lib.REMAT_OFFLOADED}.items():
    # On CPU the offloaded names stay on the device (one warning line): kept all the same.
    assert _saved_names(policy, params, tokens) == set(names), policy


def test_unknown_policy_is_a_config_error(params_and_tokens):
  params, tokens = params_and_tokens
  _, loss = _loss_fn("save_everything")
  with pytest.raises(ConfigError, match="model.remat_policy='save_everything'; use one of none"):
    jax.eval_shape(loss, params, tokens)
