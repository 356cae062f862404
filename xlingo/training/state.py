"""Train state, optimizer, and abstract-first sharded initialisation.

Nothing full-size is ever built on one device: shapes come from ``jax.eval_shape``, shardings
from the logical rules, and the state is created by ``jax.jit(init, out_shardings=...)``.

Freezing: ``train.trainable`` (a regex over parameter paths) splits the parameters into the
trained and the frozen (:func:`split_params`). The optimizer and its state cover only the
trained ones, and the train step differentiates only them, so a frozen parameter costs no
gradient, no optimizer state and no share of ``grad_norm``. Every adaptation mode (LoRA,
adapters, prefixes, language embeddings, a user's regex) goes through this one split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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


def trainable_mask(params, pattern: str):
  """True for parameters whose path matches ``pattern`` (re.search), else False (a tree of
  Python bools: only the paths are read, so it works on abstract and traced params)."""
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"train.trainable={pattern!r} is not a valid regex ({e})") from None
  mask = jax.tree_util.tree_map_with_path(
      lambda p, _: bool(rx.search(sharding.path_str(p))), params)
  if not any(jax.tree.leaves(mask)):
    raise ConfigError(f"train.trainable={pattern!r} matches no parameter; parameter paths "
                      f"look like {sharding.path_str(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}")
  return mask


def split_params(params, mask) -> tuple[dict, dict]:
  """(trained, frozen): two nested dicts holding the leaves ``mask`` marks True / False, each
  under its own path (so optimizer state and shardings still match by path)."""

  def part(tree, m):
    if isinstance(tree, Mapping):
      a, b = {}, {}
      for k in tree:
        ta, tb = part(tree[k], m[k])
        if ta is not None:
          a[k] = ta
        if tb is not None:
          b[k] = tb
      return a or None, b or None
    return (tree, None) if m else (None, tree)

  trained, frozen = part(params, mask)
  return trained or {}, frozen or {}


def join_params(a: dict, b: dict) -> dict:
  """The union of two trees from :func:`split_params`."""
  out = dict(a)
  for k, v in b.items():
    out[k] = join_params(out[k], v) if k in out else v
  return out


def trained_params(params, pattern: str) -> dict:
  return split_params(params, trainable_mask(params, pattern))[0]


def _decay_mask(params):
  # No weight decay on norm scales, biases and other vectors.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW (or SGD) with warmup + decay and global-norm clipping, over the trained parameters
  (:func:`trained_params`) only."""
  lr = learning_rate_schedule(t)
  if t.optimizer == "adamw":
    inner = optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask)
  elif t.optimizer == "sgd":
    inner = optax.sgd(lr, momentum=t.b1)
  else:
    raise ConfigError(f"train.optimizer={t.optimizer!r} is unknown; use 'adamw' or 'sgd'")
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
  chain.append(inner)
  return optax.chain(*chain)


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


class StateFactory:
  """Builds the abstract state, its shardings and the initialised state for one model."""

  def __init__(self, model: nn.Module, config, mesh, rules):
    self.model = model
    self.config = config
    self.mesh = mesh
    self.rules = rules
    boxed = sharding.abstract_params(model, config.model, 8)
    self.param_shardings = sharding.param_shardings(boxed, mesh, rules)
    self.params_abstract = nn.unbox(boxed)
    self.tx = make_optimizer(config.train)
    self.abstract = jax.eval_shape(self._init_from_params, self.params_abstract)
    self.shardings = TrainState(
        step=_replicated(mesh), params=self.param_shardings,
        opt_state=sharding.opt_state_shardings(self.abstract.opt_state, self.params_abstract,
                                               self.param_shardings, mesh))

  def _init_from_params(self, params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(trained_params(params, self.config.train.trainable)))

  def init(self, rng) -> TrainState:
    def init_fn(r):
      return self._init_from_params(nn.unbox(sharding.init_variables(self.model, r, 8)["params"]))

    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(init_fn, out_shardings=self.shardings)(rng)

  def from_params(self, params) -> TrainState:
    """A fresh optimizer state around given (already placed) params."""
    with sharding.mesh_context(self.mesh, self.rules):
      return jax.jit(self._init_from_params, out_shardings=self.shardings)(params)

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
