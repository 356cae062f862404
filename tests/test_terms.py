"""The extension point: a new objective is one new loss term and one config section, with no edit
to the LM terms, the loop or evaluate. Here a term that is not part of xlingo (an L2 penalty on
the final hidden states, with an evaluator of its own) trains 2 steps of configs/tiny.py."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import tiny
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import loop, step, terms


@dataclasses.dataclass(frozen=True)
class HiddenL2(terms.Term):
  """``weight`` times the mean squared norm of the final hidden states (a mean over tokens,
  scaled by the token count as the step expects), from the LM pass the other terms share."""

  weight: float = 0.0

  def loss(self, params, batch, rng, run):
    w = batch["loss_weights"].astype(jnp.float32)
    sq = jnp.sum(jnp.square(run.lm().hidden.astype(jnp.float32)), axis=-1)
    mean = jnp.sum(sq * w) / run.token_count()
    return self.weight * mean * run.token_count(), {"hidden_l2_sum": mean * run.token_count()}

  def evaluators(self):
    return (ParamNorm(),)


class ParamNorm:
  """An evaluator: the global norm of the parameters, as val/param_norm."""

  def prepare(self, env):
    del env
    return lambda params, extra: {"val/param_norm": float(optax.global_norm(params))}


def _check(config):
  if config.hidden_l2.weight < 0:
    raise ConfigError(f"hidden_l2.weight={config.hidden_l2.weight} must be >= 0")


RECIPE = step.Recipe(
    "hidden_l2", check=_check,
    build=lambda config, setup: step.lm_objective(
        config, setup.model, "hidden_l2", (HiddenL2(float(config.hidden_l2.weight)),)))


def _config():
  c = tiny.get_config()
  c.hidden_l2 = ml_collections.ConfigDict({"weight": 0.01})  # the objective's one section
  c.train.steps = 2
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.checkpoint.every_steps = 2
  return c


def test_new_term_adds_exactly_its_value():
  c = _config()
  model = decoder_lib.Decoder(c.model)
  x = jnp.asarray(np.random.default_rng(0).integers(2, c.model.vocab_size, (2, 16)), jnp.int32)
  batch = {"inputs": x, "targets": jnp.roll(x, -1, 1), "segment_ids": jnp.ones_like(x),
           "positions": jnp.broadcast_to(jnp.arange(16), x.shape), "lang_ids": jnp.zeros_like(x),
           "loss_weights": jnp.ones(x.shape, jnp.float32)}
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])
  plain = step.lm_objective(c, model)
  extended = RECIPE.build(c, types.SimpleNamespace(model=model))
  rng = jax.random.PRNGKey(0)
  t0, _ = jax.jit(lambda p: plain.loss(p, batch, rng, deterministic=True))(params)
  t1, aux = jax.jit(lambda p: extended.loss(p, batch, rng, deterministic=True))(params)
  hidden, _ = model.apply({"params": params}, x, batch["segment_ids"], batch["positions"],
                          batch["lang_ids"], return_hidden=True)
  want = 0.01 * float(jnp.sum(jnp.square(hidden)))
  np.testing.assert_allclose(float(t1) - float(t0), want, rtol=1e-3)
  np.testing.assert_allclose(float(aux["hidden_l2_sum"]), want / 0.01, rtol=1e-4)


def test_new_objective_trains_two_steps_through_the_loop(tmp_path):
  c = _config()
  c.hidden_l2.weight = -1.0
  with pytest.raises(ConfigError, match="hidden_l2.weight=-1.0"):
    loop.run(c, str(tmp_path / "bad"), RECIPE)
  c.hidden_l2.weight = 0.01
  wd = str(tmp_path / "wd")
  last = loop.run(c, wd, RECIPE)
  assert np.isfinite(last["loss"]) and last["hidden_l2"] > 0  # logged from its aux sum
  assert last["val/param_norm"] > 0 and "val/bpb" in last  # its evaluator ran in validation
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "hidden_l2" in r] == [1, 2]
  assert [r["step"] for r in rows if "val/param_norm" in r] == [0, 2]
