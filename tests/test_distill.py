"""Distillation: the KL term, the frozen teacher, layer init, config checks, end to end, resume."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import checkpoint_params, metrics_rows

from configs import distill_tiny, tiny
from xlingo import distill
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import load, losses, terms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(t, s, w, tau, k):
  t, s = t.astype(np.float64) / tau, s.astype(np.float64) / tau
  log_q = _np_log_softmax(s)
  if k:
    idx = np.argsort(-t, axis=-1)[..., :k]
    log_p = _np_log_softmax(np.take_along_axis(t, idx, -1))
    log_q = np.take_along_axis(log_q, idx, -1)
  else:
    log_p = _np_log_softmax(t)
  per = (np.exp(log_p) * (log_p - log_q)).sum(-1) * w
  return per.sum(), per


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("k", [None, 5])
def test_kl_matches_numpy(tau, k):
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 7, 33)).astype(np.float32) * 3
  s = rng.normal(size=(2, 7, 33)).astype(np.float32) * 3
  w = (rng.random((2, 7)) > 0.3).astype(np.float32)
  kl_sum, per = losses.kl_divergence(jnp.asarray(t), jnp.asarray(s), jnp.asarray(w), tau, k)
  ref_sum, ref_per = _np_kl(t, s, w, tau, k)
  np.testing.assert_allclose(per, ref_per, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl_sum, ref_sum, rtol=1e-5)
  assert np.all(np.asarray(per) >= -1e-6)
  assert np.all(np.asarray(per)[w == 0] == 0)


def test_kl_zero_when_student_is_teacher():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 40)) * 4
  w = jnp.ones((3, 5))
  for tau in (1.0, 3.0):
    kl_sum, per = losses.kl_divergence(x, x, w, tau)
    np.testing.assert_allclose(per, 0.0, atol=1e-5)
    assert abs(float(kl_sum)) < 1e-4
  # top-k with k = V is the full KL; with k < V it is > 0 unless the student's mass is all on K.
  np.testing.assert_allclose(losses.kl_divergence(x, x, w, 1.0, 40)[1], 0.0, atol=1e-5)
  assert float(losses.kl_divergence(x, x, w, 1.0, 4)[0]) > 0


def _tiny_models():
  cfg = distill_tiny.get_config()
  cfg.distill.teacher_model.dtype = "float32"
  tm = cfg.distill.teacher_model
  teacher, student = decoder_lib.Decoder(tm), decoder_lib.Decoder(cfg.model)
  tp, sp = _init(teacher, 0), _init(student, 1)
  return cfg, teacher, student, tp, sp


def _init(model, seed):
  x = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"])


def _batch(vocab, b=8, length=16):
  rng = np.random.default_rng(0)
  toks = rng.integers(1, vocab, (b, length + 1)).astype(np.int32)
  w = np.ones((b, length), np.float32)
  w[:, -3:] = 0
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "segment_ids": jnp.ones((b, length), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)),
          "lang_ids": jnp.asarray(rng.integers(0, 9, (b, length)).astype(np.int32)),
          "loss_weights": jnp.asarray(w)}


def test_no_gradient_reaches_the_teacher():
  cfg, teacher, student, tp, sp = _tiny_models()
  objective = distill.distill_objective(cfg, student, teacher, tp)
  batch = _batch(cfg.model.vocab_size)
  rng = jax.random.PRNGKey(0)

  def loss(tparams, sparams):
    bound = objective.bound({"0": tparams})  # the teacher as the step receives it
    return bound.loss(sparams, batch, rng, deterministic=True, step=jnp.int32(0))[0]

  g_teacher, g_student = jax.jit(jax.grad(loss, argnums=(0, 1)))(tp, sp)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(g_student))
  # The loss is alpha * tau^2 * KL + (1 - alpha) * CE, and aux 'loss' is the plain CE.
  total, aux = objective.loss(sp, batch, rng, deterministic=True, step=jnp.int32(0))
  d = cfg.distill
  want = d.alpha * d.temperature**2 * aux["kl_sum"] + (1 - d.alpha) * aux["ce_sum"]
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose(aux["per_token"]["loss"].sum(), aux["ce_sum"], rtol=1e-6)


def test_linear_schedule():
  assert float(terms.scheduled(0.8, 0.2, "linear", jnp.int32(0), 10)) == pytest.approx(0.8)
  assert float(terms.scheduled(0.8, 0.2, "linear", jnp.int32(5), 10)) == pytest.approx(0.5)
  assert float(terms.scheduled(0.8, 0.2, "linear", jnp.int32(20), 10)) == pytest.approx(0.2)
  assert float(terms.scheduled(0.8, 0.2, "constant", jnp.int32(5), 10)) == pytest.approx(0.8)


@pytest.mark.parametrize("student_scan", [True, False])
def test_student_from_teacher_layers(student_scan):
  cfg, _, student, tp, sp = _tiny_models()
  if not student_scan:
    cfg.model.scan_layers = False
    sp = _init(decoder_lib.Decoder(cfg.model), 1)
  new = distill.student_from_teacher_layers(sp, tp, cfg.model, cfg.distill.teacher_model, (1,))
  got = new["blocks"]["layers"] if student_scan else new["blocks"]["layers_0"]
  t_layer1 = jax.tree.map(lambda x: x[1], tp["blocks"]["layers"])
  if student_scan:
    got = jax.tree.map(lambda x: x[0], got)
  jax.tree.map(np.testing.assert_array_equal, got, t_layer1)
  np.testing.assert_array_equal(new["token_embedding"], tp["token_embedding"])


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  from xlingo.training import loop

  d = str(tmp_path_factory.mktemp("teacher"))
  c = tiny.get_config()
  c.train.steps = 2
  c.train.eval_every = 100
  c.checkpoint.every_steps = 2
  loop.run(c, d)
  return d


def _distill_config(teacher_dir, **over):
  c = distill_tiny.get_config()
  c.distill.teacher_workdir = teacher_dir
  c.train.steps = 4
  c.train.log_every = 2
  c.train.eval_every = 4
  c.checkpoint.every_steps = 2
  for k, v in over.items():
    sec, key = k.split("__")
    c[sec][key] = v
  return c


def test_config_errors(teacher_dir):
  c = _distill_config(teacher_dir, model__vocab_size=4096)
  with pytest.raises(ConfigError, match="vocabulary and language"):
    distill.check_distill_config(c)
  c = _distill_config(teacher_dir)
  c.data.languages = tuple(reversed(c.data.languages))
  with pytest.raises(ConfigError, match="languages"):
    distill.check_distill_config(c)
  c = _distill_config(teacher_dir, distill__teacher_model_source="config")
  c.distill.teacher_model.d_model = 32
  with pytest.raises(ConfigError, match="d_model: checkpoint 64"):
    distill.check_distill_config(c)
  # From the checkpoint the right shape is read, whatever teacher_model says.
  c.distill.teacher_model_source = "checkpoint"
  distill.check_distill_config(c)
  assert distill.teacher_model_config(c).d_model == 64
  c = _distill_config(teacher_dir, distill__init_from_teacher_layers=(0, 1))
  with pytest.raises(ConfigError, match="num_layers=1"):
    distill.check_distill_config(c)
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    load.step_dirs(os.path.dirname(teacher_dir), distill.TEACHER)


@pytest.mark.slow
def test_distill_end_to_end_and_exact_resume(teacher_dir, tmp_path, monkeypatch):
  full = str(tmp_path / "full")
  # Through the command line, with a linear alpha schedule, top-k and layer init.
  # (ml_collections finds --config.* overrides in sys.argv, so the argv is put there.)
  argv = ["xlingo.distill", "--config", os.path.join(ROOT, "configs/distill_tiny.py"),
                "--workdir", full, f"--config.distill.teacher_workdir={teacher_dir}",
                "--config.train.steps=4", "--config.checkpoint.every_steps=2",
                "--config.train.eval_every=4", "--config.distill.schedule=linear",
                "--config.distill.alpha_end=0.1", "--config.distill.top_k=16",
                "--config.distill.init_from_teacher_layers=(1,)"]
  monkeypatch.setattr("sys.argv", argv)
  distill.main(argv)
  rows = metrics_rows(full)
  keys = set().union(*rows)
  assert {"kl", "ce", "val/bpb", "kl/en", "loss/en", "val/kl/en", "val/bpb/de"} <= keys
  assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
  # The teacher is not part of the student's checkpoint.
  params = checkpoint_params(full, 4)
  assert params["blocks"]["layers"]["mlp"]["gate"].shape[0] == 1

  # Resume: drop the last checkpoint, run again to the same step count -> bitwise equal.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  c = _distill_config(teacher_dir, distill__schedule="linear", distill__alpha_end=0.1,
                      distill__top_k=16, distill__init_from_teacher_layers=(1,))
  distill.run(c, resumed)
  again = checkpoint_params(resumed, 4)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_teacher_dtype_line_compares_with_its_training_dtypes():
  from xlingo.training import restore as restore_lib

  c = tiny.get_config()
  c.model.dtype, c.model.param_dtype = "float32", "float32"
  meta = restore_lib.checkpoint_meta(c, 1)
  assert distill.teacher_dtype_line(meta, "bfloat16", "float32") == (
      "teacher runs in bfloat16 with float32 parameters; it was trained in float32 with float32 "
      "parameters")
  assert distill.teacher_dtype_line(meta, "float32", "float32").endswith("(the same)")
  assert "not recorded" in distill.teacher_dtype_line({}, "bfloat16", "float32")
