"""Offline teacher logits: the stored top-k KL equals the online one, a dump trains a student
that resumes exactly, and a dump that does not fit or is damaged stops with one line."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import checkpoint_params, metrics_rows

from configs import distill_tiny, tiny
from xlingo import distill, paths
from xlingo.errors import ConfigError, DataError
from xlingo.model import decoder as decoder_lib
from xlingo.training import teacher_logits as tl


def _init(model, seed):
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed),
                                      jnp.zeros((1, 8), jnp.int32))["params"])


def test_stored_top_k_loss_equals_online_top_k_loss():
  cfg = distill_tiny.get_config()
  cfg.distill.teacher_model.dtype = "float32"
  cfg.distill.top_k, cfg.distill.temperature = 5, 2.5
  teacher, student = decoder_lib.Decoder(cfg.distill.teacher_model), decoder_lib.Decoder(cfg.model)
  tp, sp = _init(teacher, 0), _init(student, 1)
  rng = np.random.default_rng(0)
  b, n = 4, 16
  toks = rng.integers(1, cfg.model.vocab_size, (b, n + 1)).astype(np.int32)
  w = np.ones((b, n), np.float32)
  w[:, -3:] = 0
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_weights": w,
           "segment_ids": np.ones((b, n), np.int32),
           "positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)),
           "lang_ids": rng.integers(0, 9, (b, n)).astype(np.int32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  online = distill.distill_objective(cfg, student, teacher, tp)
  key = jax.random.PRNGKey(0)
  want, want_aux = online.loss(sp, batch, key, deterministic=True, step=jnp.int32(0))
  ids, logp = distill.teacher_top_k(teacher, tp, batch, 5)
  offline = distill.stored_objective(cfg, student, 5)
  stored = dict(batch, **{tl.IDS: ids, tl.LOGP: logp})
  got, got_aux = offline.loss(sp, stored, key, deterministic=True, step=jnp.int32(0))
  np.testing.assert_allclose(got_aux["kl_sum"], want_aux["kl_sum"], rtol=1e-5)
  np.testing.assert_allclose(got_aux["per_token"]["kl"], want_aux["per_token"]["kl"], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got_aux["kl_sum"]) > 0


def _fake_dump(out, cfg, k=3, per=2):
  """A dump of random top-k for cfg's plan (no teacher): what the checks read."""
  b, n = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  paths.makedirs(out)
  for first in range(0, cfg.train.steps, per):
    s = min(per, cfg.train.steps - first)
    tl.write_shard(out, first, {"inputs": np.zeros((s, b, n), np.int32),
                                tl.IDS: rng.integers(0, 9, (s, b, n, k)).astype(np.int32),
                                tl.LOGP: -rng.random((s, b, n, k)).astype(np.float32)})
  man = tl.manifest(cfg, k, per, {"workdir": "t"})
  paths.write_text(paths.join(out, tl.MANIFEST), __import__("json").dumps(man))
  return man


def test_a_dump_for_another_plan_or_a_damaged_shard_is_one_line(tmp_path):
  cfg = distill_tiny.get_config()
  cfg.train.steps = 4
  out = str(tmp_path / "dump")
  man = _fake_dump(out, cfg)
  tl.check_matches(cfg, tl.read_manifest(out), out)
  other = distill_tiny.get_config()
  other.train.steps = 4
  other.data.seed += 1
  with pytest.raises(ConfigError, match="another data plan.*data.seed"):
    tl.check_matches(other, man, out)
  with pytest.raises(ConfigError, match="vocabulary"):
    tl.check_matches(cfg, dict(man, tokenizer={"vocab": "v", "sha1": "0" * 40}), out)
  other = distill_tiny.get_config()
  other.train.steps = 8
  with pytest.raises(ConfigError, match="covers 4 steps"):
    tl.check_matches(other, man, out)
  cfg.distill.top_k = 7
  with pytest.raises(ConfigError, match="top-3"):
    tl.check_matches(cfg, man, out)
  with pytest.raises(ConfigError, match="no manifest.json"):
    tl.read_manifest(str(tmp_path))
  # A shard cut short or gone stops with the file named.
  first = paths.join(out, tl.shard_name(0))
  paths.write_bytes(first, paths.read_bytes(first)[:100])
  with pytest.raises(DataError, match=f"{tl.shard_name(0)} is unreadable"):
    tl.read_shard(out, 0, 2)
  paths.remove(paths.join(out, tl.shard_name(2)))
  with pytest.raises(DataError, match=f"{tl.shard_name(2)} is missing"):
    tl.read_shard(out, 2, 2)


@pytest.mark.slow
def test_dump_then_offline_distillation_resumes_exactly(tmp_path):
  from xlingo.training import loop

  teacher = str(tmp_path / "teacher")
  c = tiny.get_config()
  c.train.steps, c.train.eval_every, c.checkpoint.every_steps = 2, 100, 2
  loop.run(c, teacher)

  def config(**distill_over):
    c = distill_tiny.get_config()
    c.distill.teacher_workdir = teacher
    c.distill.top_k = 8
    c.train.steps, c.train.log_every, c.train.eval_every = 4, 1, 100
    c.checkpoint.every_steps = 2
    c.distill.update(distill_over)
    return c

  out = str(tmp_path / "logits")
  man = distill.dump(config(), out, steps_per_shard=3)
  assert man["k"] == 8 and sorted(paths.listdir(out)) == [
      "manifest.json", tl.shard_name(0), tl.shard_name(3)]
  with pytest.raises(ConfigError, match="already holds a dump"):
    distill.dump(config(), out)
  online, full = str(tmp_path / "online"), str(tmp_path / "full")
  distill.run(config(), online)
  distill.run(config(teacher_logits=out, teacher_workdir=""), full)
  # The same batches, the same teacher top-k: the logged KL of each step agrees.
  kl = lambda d: [r["kl"] for r in metrics_rows(d) if "kl" in r]
  np.testing.assert_allclose(kl(full), kl(online), rtol=2e-3)
  # Resume from step 2 (a shard boundary is not a step boundary: shards hold 3 steps).
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  distill.run(config(teacher_logits=out, teacher_workdir=""), resumed)
  jax.tree.map(np.testing.assert_array_equal, checkpoint_params(full, 4),
               checkpoint_params(resumed, 4))
