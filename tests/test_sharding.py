"""Mesh, rules and shardings on 8 fake CPU devices; the TPU configs checked abstractly."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from configs import tiny, tpu_1b, tpu_8b
from xlingo import sharding
from xlingo.config import ConfigError, base_config
from xlingo.model.decoder import Decoder, param_count
from xlingo.training import state as state_lib
from xlingo.training.losses import cross_entropy_loss

SNAPSHOT_DIR = os.path.join(os.path.dirname(__file__), "snapshots")
# Tests compile many small programs on 2 CPU cores; LLVM optimisation would cost more than
# these programs ever run. Numerics are unchanged (the comparisons hold at tight tolerances).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
B, T = 8, 16


def _mesh_cfg(data, fsdp, tensor):
  cfg = base_config().mesh
  cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
  return cfg


def _divisible_model_cfg():
  """Every sharded dim divides by 8 (fsdp) and by 4 (tensor); f32 for exact comparisons."""
  cfg = tiny.get_config().model
  cfg.update(
      vocab_size=256, d_model=64, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=128,
      dtype="float32", lid_head=True,
  )
  return cfg


@pytest.fixture(scope="module")
def setup():
  cfg = _divisible_model_cfg()
  model = Decoder(cfg)
  abstract = sharding.abstract_params(model, cfg, T)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype), nn.unbox(abstract)
  )
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  segment_ids = jnp.array([[1] * 6 + [2] * 8 + [0] * 2] * B, jnp.int32)
  positions = jnp.array([list(range(6)) + list(range(8)) + [0, 0]] * B, jnp.int32)
  batch = dict(
      inputs=jax.random.randint(keys[0], (B, T), 1, cfg.vocab_size, dtype=jnp.int32),
      targets=jax.random.randint(keys[1], (B, T), 1, cfg.vocab_size, dtype=jnp.int32),
      segment_ids=segment_ids,
      positions=positions,
      lang_ids=jax.random.randint(keys[2], (B, 1), 0, cfg.num_languages) * (segment_ids > 0),
      loss_weights=(segment_ids > 0).astype(jnp.float32),
  )

  def loss_fn(p, batch):
    logits, _ = model.apply(
        {"params": p}, batch["inputs"], batch["segment_ids"], batch["positions"],
        batch["lang_ids"],
    )
    loss_sum, weight_sum, _ = cross_entropy_loss(logits, batch["targets"], batch["loss_weights"])
    return loss_sum / weight_sum

  reference = fast_jit(jax.value_and_grad(loss_fn))(params, batch)
  return dict(cfg=cfg, model=model, abstract=abstract, params=params, batch=batch,
              loss_fn=loss_fn, reference=reference)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_loss_and_grads_match_single_device(setup, shape):
  mesh = sharding.make_mesh(_mesh_cfg(*shape))
  rules = sharding.logical_rules(_mesh_cfg(*shape))
  p_shardings = sharding.param_shardings(setup["abstract"], mesh, rules)
  params = jax.device_put(setup["params"], p_shardings)
  batch = jax.device_put(setup["batch"], sharding.batch_sharding(mesh))
  replicated = NamedSharding(mesh, PartitionSpec())
  with sharding.mesh_context(mesh, rules):
    loss, grads = fast_jit(
        jax.value_and_grad(setup["loss_fn"]),
        out_shardings=(replicated, p_shardings),
    )(params, batch)
  want_loss, want_grads = setup["reference"]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want_grads
  )
  emb = params["token_embedding"].sharding.spec
  assert emb == PartitionSpec("tensor", "fsdp")


def test_fsdp_memory_per_device(setup):
  """The train state as production builds it (StateFactory): Adam's mu and nu take their
  parameters' shardings, and each of 8 fsdp devices holds an eighth of the state."""
  cfg = tiny.get_config()
  cfg.model = setup["cfg"]
  mesh = sharding.make_mesh(_mesh_cfg(1, 8, 1))
  rules = sharding.logical_rules(_mesh_cfg(1, 8, 1))
  factory = state_lib.StateFactory(setup["model"], cfg, mesh, rules)
  state = factory.init(jax.random.PRNGKey(0))
  assert not any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(state.params))
  specs = {sharding.path_str(p): x.sharding.spec
           for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  mirrored = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
    ps = sharding.path_str(path)
    match = [k for k in specs if ps.endswith("/" + k)]
    if x.ndim and match:  # mu and nu: sharded exactly like their parameter
      assert x.sharding.spec == specs[max(match, key=len)], ps
      mirrored += 1
    else:  # counts and scalars: replicated
      assert x.sharding.spec == PartitionSpec(), ps
  assert mirrored == 2 * len(specs)  # AdamW: mu and nu of every parameter
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  per_device = sharding.per_device_bytes(state)
  assert len(per_device) == 8
  assert max(per_device.values()) <= total / 8 * 1.05
  assert sum(x.size for x in jax.tree.leaves(state.params)) == param_count(setup["cfg"])


def _check_snapshot(name, table):
  path = os.path.join(SNAPSHOT_DIR, name)
  if not os.path.exists(path):
    if os.environ.get("XLINGO_UPDATE_SNAPSHOTS") == "1":
      os.makedirs(SNAPSHOT_DIR, exist_ok=True)
      with open(path, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    else:
      pytest.fail(f"missing snapshot {path}; create it with XLINGO_UPDATE_SNAPSHOTS=1")
  with open(path) as f:
    assert table == json.load(f), f"sharding plan changed; see {path}"


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharding_plan_snapshot(shape):
  cfg = tiny.get_config()
  mesh_cfg = _mesh_cfg(*shape)
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(mesh_cfg)
  abstract = sharding.abstract_params(Decoder(cfg.model), cfg.model, cfg.data.seq_len)
  table = sharding.partition_spec_table(abstract, mesh, rules)
  assert table["token_embedding"] == "('tensor', 'fsdp')"
  _check_snapshot("sharding_tiny_{}x{}x{}.json".format(*shape), table)


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh(base_config().mesh)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = sharding.make_mesh(_mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "shape, words",
    [
        ((3, 1, 1), ["mesh.data=3", "8 devices", "-1"]),
        ((2, 2, 1), ["multiply to 4", "8 devices"]),
        ((-1, 3, 1), ["mesh.fsdp=3", "does not divide"]),
        ((-1, -1, 1), ["at most one may be -1"]),
    ],
)
def test_bad_mesh_shape_is_a_config_error(shape, words):
  with pytest.raises(ConfigError) as err:
    sharding.make_mesh(_mesh_cfg(*shape))
  message = str(err.value)
  assert "\n" not in message
  for word in words:
    assert word in message


def test_batch_not_divisible_is_a_config_error():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  sharding.check_batch_divisible(8, mesh)
  with pytest.raises(ConfigError, match=r"train\.batch_size=6 .*data-parallel size 4"):
    sharding.check_batch_divisible(6, mesh)


def test_indivisible_param_dim_is_a_config_error():
  cfg = tiny.get_config()  # 2 kv heads cannot split over tensor=4
  mesh = sharding.make_mesh(_mesh_cfg(1, 2, 4))
  abstract = sharding.abstract_params(Decoder(cfg.model), cfg.model, 8)
  with pytest.raises(ConfigError, match=r"blocks/layers/attn/key dim 2 \(kv_heads"):
    sharding.param_shardings(abstract, mesh, sharding.logical_rules(cfg.mesh))


def test_bad_rule_axis_is_a_config_error():
  mesh_cfg = base_config().mesh
  mesh_cfg.rules = (("embed", "model"),)
  with pytest.raises(ConfigError, match="mesh.rules"):
    sharding.logical_rules(mesh_cfg)


@pytest.mark.parametrize("module, billions", [(tpu_1b, 1.0), (tpu_8b, 8.0)])
def test_tpu_configs(module, billions):
  config = module.get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  model_cfg = config.model
  assert model_cfg.scan_layers and model_cfg.remat_policy != "none"
  assert model_cfg.dtype == "bfloat16" and config.data.seq_len == 2048
  abstract = sharding.abstract_params(Decoder(model_cfg), model_cfg, 8)
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))
  assert n == param_count(model_cfg)
  assert abs(n - billions * 1e9) <= 0.15 * billions * 1e9, n

  shape = sharding.mesh_shape(config.mesh, module.NUM_DEVICES)
  assert int(np.prod(shape)) == module.NUM_DEVICES
  mesh = AbstractMesh(shape, sharding.MESH_AXES)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_param_divisibility(abstract, mesh, rules)
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  # Nothing big is left replicated: every matrix is split over fsdp (or more).
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  ):
    if "norm" not in jax.tree_util.keystr(path):
      assert "fsdp" in jax.tree.leaves(tuple(spec)), path
