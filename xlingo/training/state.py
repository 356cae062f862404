"""Train state, optimizer, and abstract-first sharded initialisation.

Nothing full-size is ever built on one device: shapes come from ``jax.eval_shape``, shardings
from the logical rules, and the state is created by ``jax.jit(init, out_shardings=...)``.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from xlingo import sharding
from xlingo.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(t) -> optax.Schedule:
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(t.warmup_steps, 1),
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_lr_ratio)
  if t.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)),
         optax.constant_schedule(t.learning_rate)], [max(t.warmup_steps, 1)])
  raise ConfigError(f"train.schedule={t.schedule!r} is unknown; use 'cosine' or 'constant'")


def trainable_labels(params, pattern: str):
  """'train' for parameters whose path matches ``pattern`` (re.search), else 'freeze'."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"train.trainable={pattern!r} is not a valid regex ({e})") from None
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if rx.search(sharding.path_str(p)) else "freeze", params)
  if "train" not in jax.tree.leaves(labels):
    raise ConfigError(f"train.trainable={pattern!r} matches no parameter; parameter paths "
                      f"look like {sharding.path_str(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}")
  return labels


def _decay_mask(params):
  # No weight decay on norm scales, biases and other vectors.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(t, params_abstract) -> optax.GradientTransformation:
  """AdamW (or SGD) with warmup + decay, global-norm clipping, and regex freezing."""
  lr = learning_rate_schedule(t)
  if t.optimizer == "adamw":
    inner = optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask)
  elif t.optimizer == "sgd":
    inner = optax.sgd(lr, momentum=t.b1)
  else:
    raise ConfigError(f"train.optimizer={t.optimizer!r} is unknown; use 'adamw' or 'sgd'")
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
  chain.append(inner)
  tx = optax.chain(*chain)
  labels = trainable_labels(params_abstract, t.trainable)
  if "freeze" in jax.tree.leaves(labels):
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


class ParamExtension:
  """Parameters an objective adds beside the model's (e.g. LoRA factors), as top-level keys.

  ``abstract(boxed_model_params) -> {key: boxed tree}`` gives their shapes and logical axes;
  ``init(rng, abstract_unboxed) -> {key: tree}`` their initial values. They are not in an
  ``init_from`` checkpoint: a run starting from one initialises them fresh.
  """

  def abstract(self, boxed_params) -> dict:
    raise NotImplementedError

  def init(self, rng, abstract) -> dict:
    raise NotImplementedError


class StateFactory:
  """Builds the abstract state, its shardings and the initialised state for one model."""

  def __init__(self, model: nn.Module, config, mesh, rules,
               extension: ParamExtension | None = None):
    self.model = model
    self.config = config
    self.mesh = mesh
    self.rules = rules
    self.extension = extension
    boxed = sharding.abstract_params(model, config.model, 8)
    self.model_keys = tuple(boxed)  # top-level keys that the model itself owns
    if extension is not None:
      boxed = {**boxed, **extension.abstract(boxed)}
    self.param_shardings = sharding.param_shardings(boxed, mesh, rules)
    self.params_abstract = nn.unbox(boxed)
    self.tx = make_optimizer(config.train, self.params_abstract)
    self.abstract = jax.eval_shape(self._init_from_params, self.params_abstract)
    self.shardings = TrainState(
        step=_replicated(mesh), params=self.param_shardings,
        opt_state=sharding.opt_state_shardings(self.abstract.opt_state, self.params_abstract,
                                               self.param_shardings, mesh))

  def _init_from_params(self, params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params))

  def _extension_init(self, rng) -> dict:
    if self.extension is None:
      return {}
    ext = {k: v for k, v in self.params_abstract.items() if k not in self.model_keys}
    return self.extension.init(jax.random.fold_in(rng, 1), ext)

  def init(self, rng) -> TrainState:
    def init_fn(r):
      params = nn.unbox(sharding.init_variables(self.model, r, 8)["params"])
      return self._init_from_params({**params, **self._extension_init(r)})

    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(init_fn, out_shardings=self.shardings)(rng)

  def from_params(self, params) -> TrainState:
    """A fresh optimizer state around given (already placed) params."""
    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(self._init_from_params, out_shardings=self.shardings)(params)

  def init_model_param(self, rng, name: str) -> jax.Array:
    """One top-level model parameter, freshly initialised and placed (the rest is not built)."""
    def init_fn(r):
      return nn.unbox(sharding.init_variables(self.model, r, 8)["params"])[name]

    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(init_fn, out_shardings=self.param_shardings[name])(rng)

  def from_model_params(self, params, rng) -> TrainState:
    """Like ``from_params`` for params of the model only: the extension's are initialised."""
    def fn(p, r):
      return self._init_from_params({**p, **self._extension_init(r)})

    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(fn, out_shardings=self.shardings)(params, rng)

  def model_abstract_with_shardings(self):
    """The model's own params (no extension) as sharded ShapeDtypeStructs."""
    params = self.abstract_with_shardings().params
    return {k: v for k, v in params.items() if k in self.model_keys}

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
