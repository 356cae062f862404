"""Contrastive alignment of parallel sentences (``train.contrastive``): the loss term, its batch
features, and top-1 retrieval on held-out pairs.

A batch of P parallel pairs (``xlingo.data.pairs`` streams them beside the LM batches) is run
through the model as 2P sentences; each sentence's hidden states after block
``train.contrastive.layer`` are pooled into one vector and the two sides of each pair are pulled
together with a symmetric InfoNCE (``losses.info_nce``): every other pair of the global batch is
a negative. The loss is computed on the global arrays inside the compiled step, so the [P, P]
similarities cover the whole batch however it is split over the mesh.

A sentence row is ``[0 (BOS), t_1, ..., t_n, 0, ...]`` with ``n <= max_len - 1`` (longer
sentences are cut), one packed segment of positions 0..n carrying its language's id. Pooling
(``train.contrastive.pooling``):

  mean   the mean over positions 1..n, each the state after reading t_1..t_k (the BOS position,
         the same for every sentence, is left out). The default: every token contributes, and
         in a causal decoder the early positions, which see only a prefix, are averaged with
         the late ones that see it all.
  last   the state at position n, the only one that has read the whole sentence (the one that
         predicts the end of the sentence).

The pooled residual stream is taken as it is (no final norm: an intermediate block has none)
and L2-normalised inside the loss. With ``train.microbatches`` = m, each microbatch holds P/m
pairs and those are its negatives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import losses, terms

# The pair features of a batch, [P, 2, ...] each (xlingo.data.pairs emits them): the sentence
# rows (pair_inputs [P, 2, max_len]), the number of tokens after BOS, the language id and a
# hash of the text of each side ([P, 2] each; the hash tells duplicates from negatives).
PAIR_FEATURES = ("pair_inputs", "pair_lengths", "pair_lang_ids", "pair_keys")
POOLINGS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class Settings:
  """``train.contrastive``, read once (after :func:`check_config`)."""

  weight: float
  pairs: tuple[str, ...]
  temperature: float
  layer: int
  pooling: str
  batch_size: int  # pairs per step, global (0 in the config: train.batch_size)
  max_len: int
  eval_pairs: int

  @classmethod
  def from_config(cls, config) -> Settings:
    c = config.train.contrastive
    return cls(float(c.weight), tuple(c.pairs or ()), float(c.temperature), int(c.layer),
               str(c.pooling), int(c.batch_size or config.train.batch_size), int(c.max_len),
               int(c.eval_pairs))

  @property
  def trains(self) -> bool:
    """Whether the loss has a contrastive term (and the batches carry pairs)."""
    return bool(self.weight and self.pairs)

  @property
  def measures(self) -> bool:
    """Whether validation reports retrieval (pairs are named, whatever the weight)."""
    return bool(self.pairs)


def check_config(config) -> None:
  c = config.train.contrastive
  if c.weight < 0:
    raise ConfigError(f"train.contrastive.weight={c.weight} must be >= 0")
  if c.weight and not c.pairs:
    raise ConfigError("train.contrastive.weight > 0 needs train.contrastive.pairs, the parallel "
                      "tasks to align, e.g. --config.train.contrastive.pairs=\"('en-de',)\"")
  if not c.pairs:
    return
  if isinstance(c.pairs, str):
    raise ConfigError(f"train.contrastive.pairs={c.pairs!r} must be a tuple, e.g. ('en-de',)")
  langs = tuple(config.data.languages)
  for pair in c.pairs:
    parts = str(pair).split("-")
    if len(parts) != 2 or not all(parts):
      raise ConfigError(f"train.contrastive.pairs entry {pair!r} must look like 'en-de'")
    for lang in parts:
      if lang not in langs:
        raise ConfigError(f"train.contrastive.pairs: language {lang!r} of {pair!r} is not in "
                          f"data.languages={langs}; add it there or drop the pair")
  if not c.temperature > 0:
    raise ConfigError(f"train.contrastive.temperature={c.temperature} must be > 0 (e.g. 0.05)")
  if c.pooling not in POOLINGS:
    raise ConfigError(f"train.contrastive.pooling={c.pooling!r} is unknown; use one of "
                      f"{', '.join(POOLINGS)}")
  try:
    decoder_lib.layer_index(int(c.layer), int(config.model.num_layers))
  except ConfigError as e:
    raise ConfigError(f"train.contrastive.layer={c.layer}: {e}") from None
  if not 2 <= c.max_len <= config.model.max_len:
    raise ConfigError(f"train.contrastive.max_len={c.max_len} must be in [2, model.max_len="
                      f"{config.model.max_len}] (tokens per sentence, BOS included)")
  if c.batch_size < 0 or c.eval_pairs < 0:
    raise ConfigError("train.contrastive.batch_size and train.contrastive.eval_pairs must be "
                      ">= 0 (0: train.batch_size, and all validation pairs)")
  p, m = Settings.from_config(config).batch_size, int(config.train.microbatches)
  if p < 2 or p % m:
    raise ConfigError(f"train.contrastive.batch_size={p} pairs must be >= 2 and divide into "
                      f"train.microbatches={m}; use a multiple of {m}")


def check_mesh(config, mesh) -> None:
  """The pair batch (each microbatch's share) splits over the data-parallel devices."""
  from xlingo import sharding

  c = Settings.from_config(config)
  if not c.measures:
    return
  p, m = c.batch_size, int(config.train.microbatches)
  dp = sharding.data_parallel_size(mesh)
  if (p // m) % dp:
    raise ConfigError(f"train.contrastive.batch_size={p} pairs (per microbatch {p // m}) do not "
                      f"divide over the {dp} data-parallel devices; use a multiple of {dp * m}")


def pair_embeddings(model, params, batch, layer: int, pooling: str, *,
                    deterministic: bool = True, rng=None):
  """Pooled hidden states after block ``layer`` of both sides of each pair: float32 [P, 2, D]."""
  inputs_pnl = batch["pair_inputs"]
  p, _, length = inputs_pnl.shape
  inputs_nl = inputs_pnl.reshape(2 * p, length)
  len_n = batch["pair_lengths"].reshape(2 * p)
  pos_l = jnp.arange(length, dtype=jnp.int32)
  positions_nl = jnp.broadcast_to(pos_l, (2 * p, length))
  in_sentence_nl = pos_l[None, :] <= len_n[:, None]
  segment_ids_nl = in_sentence_nl.astype(jnp.int32)  # BOS + tokens one segment, rest padding
  lang_nl = jnp.broadcast_to(batch["pair_lang_ids"].reshape(2 * p, 1), (2 * p, length))
  hidden_nld = model.apply(
      {"params": params}, inputs_nl, segment_ids_nl, positions_nl, lang_nl,
      deterministic=deterministic, rngs={} if rng is None else {"dropout": rng},
      hidden_layer=layer).astype(jnp.float32)
  if pooling == "last":
    pooled_nd = jnp.take_along_axis(hidden_nld, len_n[:, None, None], axis=1)[:, 0]
  else:
    mask_nl = (in_sentence_nl & (pos_l[None, :] >= 1)).astype(jnp.float32)
    pooled_nd = (jnp.einsum("nld,nl->nd", hidden_nld, mask_nl)
                 / jnp.maximum(len_n, 1)[:, None].astype(jnp.float32))
  return pooled_nd.reshape(p, 2, -1)


@dataclasses.dataclass(frozen=True)
class Contrastive(terms.Term):
  """``weight`` times the symmetric InfoNCE of the batch's pairs (a mean, scaled by the LM
  batch's token count), and its in-batch top-1 accuracy; validation runs :class:`Retrieval`."""

  model: Any = None
  settings: Settings = None

  @classmethod
  def from_config(cls, config, model) -> Contrastive:
    return cls(model, Settings.from_config(config))

  @staticmethod
  def check(config) -> None:
    check_config(config)

  @staticmethod
  def check_mesh(config, mesh) -> None:
    check_mesh(config, mesh)

  def embed(self, params, pair_batch, *, deterministic: bool = True, rng=None):
    """Pooled states [P, 2, D] of both sides of each pair, as the loss pools them."""
    c = self.settings
    return pair_embeddings(self.model, params, pair_batch, c.layer, c.pooling,
                           deterministic=deterministic, rng=rng)

  def loss(self, params, batch, rng, run):
    c = self.settings
    if run.evaluating or not c.trains or "pair_inputs" not in batch:
      return jnp.float32(0.0), {}
    z_p2d = self.embed(params, batch, deterministic=run.deterministic,
                       rng=jax.random.fold_in(rng, 2))
    keys = batch["pair_keys"]
    c_loss, c_acc = losses.info_nce(z_p2d[:, 0], z_p2d[:, 1], c.temperature, keys[:, 0],
                                    keys[:, 1])
    n_tok = run.token_count()
    return c.weight * c_loss * n_tok, {"contrastive_loss_sum": c_loss * n_tok,
                                       "contrastive_acc_sum": c_acc * n_tok}

  def features(self, batch_sharding) -> dict:
    """The pair features as sharded ShapeDtypeStructs (what the step is compiled for)."""
    if not self.settings.trains:
      return {}
    p, n = self.settings.batch_size, self.settings.max_len
    shapes = {"pair_inputs": (p, 2, n), "pair_lengths": (p, 2), "pair_lang_ids": (p, 2),
              "pair_keys": (p, 2)}
    return {k: jax.ShapeDtypeStruct(shapes[k], jnp.int32, sharding=batch_sharding)
            for k in PAIR_FEATURES}

  def evaluators(self) -> tuple:
    return (Retrieval(self),) if self.settings.measures else ()


@dataclasses.dataclass(frozen=True)
class Retrieval:
  """Validation's ``val/retrieval/*`` on the held-out pairs of ``train.contrastive.pairs``: the
  pairs are embedded directly with the term's own pooling (no LM batch beside them)."""

  term: Contrastive

  def prepare(self, env):
    """``(params, extra) -> metrics`` over ``env``'s plan, on its mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    from xlingo.data import iterator, pairs

    sets = pairs.validation_sets(env.plan, self.term.settings, env.split)
    # Replicated: every process reads the whole [P, 2, D] to rank all pairs.
    embed = jax.jit(self.term.embed, out_shardings=NamedSharding(env.mesh, PartitionSpec()))
    to_global = lambda b: iterator.to_global(b, env.batch_sharding)
    return lambda params, extra: retrieval_metrics(embed, params, sets, to_global)


# --- retrieval on held-out pairs ------------------------------------------------------------


def retrieval_accuracy(src_nd: np.ndarray, tgt_nd: np.ndarray, src_keys: np.ndarray,
                       tgt_keys: np.ndarray) -> tuple[float, float]:
  """Top-1 retrieval by cosine similarity over N pairs: (source -> target, target -> source).

  A hit is a retrieved sentence with the same text as the right one (a duplicate counts)."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  sim = unit(src_nd) @ unit(tgt_nd).T
  s2t = float(np.mean(tgt_keys[np.argmax(sim, axis=1)] == tgt_keys))
  t2s = float(np.mean(src_keys[np.argmax(sim, axis=0)] == src_keys))
  return s2t, t2s


def retrieval_metrics(embed_fn, params, val_sets: dict, to_global) -> dict:
  """``val/retrieval/<src>-<tgt>`` (find the target among all the task's validation targets,
  given its source) and ``val/retrieval/<tgt>-<src>`` (the other way).

  ``embed_fn(params, pair batch) -> [P, 2, D]`` (``Contrastive.embed``); ``val_sets``:
  pair -> (this process's rows of each global batch, the text hashes [N, 2] of the N real
  pairs, which come first), from ``xlingo.data.pairs.validation_sets``; ``to_global`` places a
  host batch on the mesh.
  """
  out = {}
  for pair, (batches, keys) in val_sets.items():
    n = len(keys)
    if n < 2:
      continue
    z = np.concatenate([np.asarray(jax.device_get(embed_fn(params, to_global(b))))
                        for b in batches])[:n]
    s2t, t2s = retrieval_accuracy(z[:, 0], z[:, 1], keys[:, 0], keys[:, 1])
    src, tgt = pair.split("-")
    out[f"val/retrieval/{src}-{tgt}"] = s2t
    out[f"val/retrieval/{tgt}-{src}"] = t2s
  return out
