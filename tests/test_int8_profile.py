"""model.quantization='int8' (Qwix int8 matmuls in the blocks, xlingo/model/matmul.py) and the
train.profile_steps trace (hooks.profiler): one tiny in-process run exercises both."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import metrics_rows

from configs import tiny
from xlingo.errors import ConfigError
from xlingo.model.matmul import flat_matmul


def _rel(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_int8_dense_close_to_float():
  """Per-channel absmax int8 rounds each operand element by at most half a step, scale / 2 with
  scale = absmax / 127: for Gaussian operands (absmax ~ 3-4 sd at these sizes) that is a
  uniform error of sd ~ 3.5 / 127 / sqrt(12) ~ 0.8% of an element's sd per operand, and the
  errors of a K-term sum add incoherently like the terms themselves, so the product's relative
  error is ~ sqrt(2) * 0.8% ~ 1.1%; the gradients (an int8 gradient times the int8 operand) the
  same. 2.5% leaves room for the sample's largest values; a result within 1e-4 of the float
  one would mean nothing was quantized."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (4, 16, 128))
  w = jax.random.normal(kw, (128, 4, 24)) / np.sqrt(128)

  def loss(x, w, q):
    return jnp.sum(jnp.sin(flat_matmul(x, w, quantization=q)))

  for got, want in zip(jax.value_and_grad(loss, (0, 1))(x, w, "int8"),
                       jax.value_and_grad(loss, (0, 1))(x, w, "none")):
    for g, f in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == f.shape and 1e-4 < _rel(g, f) < 0.025, _rel(g, f)
  y = flat_matmul(x, w, quantization="int8")
  assert y.shape == (4, 16, 4, 24) and 1e-4 < _rel(y, flat_matmul(x, w)) < 0.025
  # the forward and both gradient matmuls are int8 x int8 dots
  hlo = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2).lower(x, w, "int8").as_text()
  dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
  assert len(dots) == 3 and all("xi8>, tensor<" in ln and "xi32>" in ln for ln in dots), dots
  with pytest.raises(ConfigError, match="model.quantization='int4'; use one of none, int8"):
    flat_matmul(x, w, quantization="int4")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
  from xlingo.training import loop

  wd = str(tmp_path_factory.mktemp("int8"))
  c = tiny.get_config()
  c.model.quantization = "int8"
  c.train.steps = 8
  c.train.eval_every = 100
  c.train.profile_steps = (1, 1)
  c.checkpoint.every_steps = 100
  loop.run(c, wd)
  return wd


@pytest.mark.slow
def test_int8_tiny_model_trains(int8_run):
  losses = [r["loss"] for r in metrics_rows(int8_run) if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses)), losses
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_profile_steps_leave_a_trace(int8_run):
  found = glob.glob(os.path.join(int8_run, "profile", "**", "*.xplane.pb"), recursive=True)
  assert found and all(os.path.getsize(f) > 0 for f in found), found
  assert glob.glob(os.path.join(int8_run, "profile", "**", "*.trace.json.gz"), recursive=True)


def test_profile_to_a_gs_workdir(gcs_emulator):
  """jax.profiler writes local files only: with a gs:// workdir the hook traces into a local
  temporary directory and copies the trace through the path layer."""
  import ml_collections

  from xlingo import paths
  from xlingo.training import hooks

  wd = f"gs://{gcs_emulator.bucket()}/run"
  config = ml_collections.ConfigDict({"train": {"profile_steps": (1, 1)}})
  env = hooks.Env("lm", config, wd, [], None, {}, lambda *_: None)
  hook = hooks.profiler(env)
  state = jnp.ones((64, 64))
  for step in (1, 2, 3):
    state = jax.jit(lambda s: s @ s / 64)(state)
    if hook.due(step, step == 3):
      hook.fn(hooks.Tick(step, state, is_last=step == 3))
  found = paths.glob(f"{wd}/profile/plugins/profile/*/*.xplane.pb")
  assert len(found) == 1 and paths.size(found[0]) > 0, found
