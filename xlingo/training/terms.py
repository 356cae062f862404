"""Loss terms, each bound once from the config: an objective is a list of them.

A term is a small frozen object whose settings were read from the config when it was built;
the compiled step never reads the config. Its one duty is

  ``loss(params, batch, rng, run) -> (value, aux)``

where ``value`` is summed over the batch's tokens (the step divides by the batch's total
weight; a term that is a mean scales it by the token count first) and ``aux`` holds
``per_token`` (name -> [B, L] weighted values, reported per language as name/<lang>) and scalar
``*_sum`` entries (logged as their means). ``run`` is the one application of the objective to
this batch (:class:`Pass`): the mode (training or evaluating), the step number, and the model
runs that terms share, each computed once when a term first asks (the LM forward pass serves
the cross-entropy and the language-ID term alike). A term may also say which batch features
it needs beyond the LM batch (``features``), which evaluators validation runs for it
(``evaluators``) and which frozen arrays the step must receive as an argument rather than bake
in as constants (``frozen``/``bind``: a teacher's parameters, the initial parameters).

A new objective is a new term (or a new list of the existing ones), never a branch in another
term: see tests/test_terms.py for one added in a test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.training import losses


def output_logits_fn(model, params):
  """hidden [B, C, D] -> float32 logits [B, C, V] with ``params``: the model's own projection."""
  return lambda hidden: model.apply({"params": params}, hidden, method="logits_from_hidden")


def loss_chunk_size(config) -> int:
  """``train.loss_chunk_size``: sequence positions per chunk of the vocabulary projection."""
  return int(config.train.loss_chunk_size or 0)


# --- the language hint ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hints:
  """Which language ids the model is given (``model.use_lang_emb``, ``model.lang_emb_dropout``).

  Without language embeddings there is no hint anywhere (every token counts for the
  language-ID loss). With them, training hides the hint of each packed example (segment) at
  ``rate`` by giving the model ``UNKNOWN_LANG`` there (a zero language vector); the batch's own
  ``lang_ids`` (the language-ID targets, the per-language metrics) are unchanged. Segment masks
  keep attention inside an example, so nothing of another example's hint reaches a hidden one.
  """

  use_lang_emb: bool
  rate: float

  @classmethod
  def from_config(cls, config) -> Hints:
    return cls(bool(config.model.use_lang_emb), float(config.model.lang_emb_dropout))

  def hide(self, batch, rng, deterministic: bool):
    """The language ids the model is given, and where the hint is hidden ([B, T] float, or
    None when the language-ID loss has nowhere to be taken)."""
    lang_ids = batch["lang_ids"]
    if not self.use_lang_emb:
      return lang_ids, jnp.ones(lang_ids.shape, jnp.float32)
    if deterministic or not self.rate:
      return lang_ids, None
    seg_bt = batch["segment_ids"]
    u_bs = jax.random.uniform(rng, (seg_bt.shape[0], seg_bt.shape[1] + 1))
    hidden = jnp.take_along_axis(u_bs, seg_bt, axis=1) < self.rate
    return jnp.where(hidden, decoder_lib.UNKNOWN_LANG, lang_ids), hidden.astype(jnp.float32)


class LMOutputs(NamedTuple):
  hidden: jax.Array  # final hidden states [B, T, D]
  lid_logits: Any  # [B, T, languages] with the LID head, else None
  hint_hidden: Any  # where the hint was hidden [B, T] (Hints.hide), or None


class Pass:
  """One application of an objective to a batch: its mode and step, and the model runs its
  terms share, each computed on first use (tracing builds each once, whoever asks)."""

  def __init__(self, model, hints: Hints, params, batch, rng, *, deterministic: bool,
               step=None, evaluating: bool = False):
    self.model, self.hints, self.params, self.batch, self.rng = model, hints, params, batch, rng
    self.deterministic, self.step, self.evaluating = deterministic, step, evaluating
    self._memo: dict = {}

  def lm(self) -> LMOutputs:
    """The model over the LM batch, hints hidden as :class:`Hints` says, dropout from ``rng``."""
    if "lm" not in self._memo:
      b = self.batch
      ids, hint_hidden = self.hints.hide(b, jax.random.fold_in(self.rng, 1), self.deterministic)
      hidden, lid = self.model.apply(
          {"params": self.params}, b["inputs"], b["segment_ids"], b["positions"], ids,
          deterministic=self.deterministic, rngs={"dropout": self.rng}, return_hidden=True)
      self._memo["lm"] = LMOutputs(hidden, lid, hint_hidden)
    return self._memo["lm"]

  def lm_without_hints(self) -> LMOutputs:
    """The model over the LM batch with no language hint at all (validation)."""
    if "nohint" not in self._memo:
      b = self.batch
      unknown = jnp.full_like(b["lang_ids"], decoder_lib.UNKNOWN_LANG)
      hidden, lid = self.model.apply(
          {"params": self.params}, b["inputs"], b["segment_ids"], b["positions"], unknown,
          deterministic=True, return_hidden=True)
      self._memo["nohint"] = LMOutputs(hidden, lid, None)
    return self._memo["nohint"]

  def logits_fn(self):
    return output_logits_fn(self.model, self.params)

  def token_count(self):
    """The batch's loss weight, at least 1: a mean term times this adds the mean to the loss."""
    return jnp.maximum(jnp.sum(self.batch["loss_weights"].astype(jnp.float32)), 1.0)


@dataclasses.dataclass(frozen=True)
class Term:
  """The base of every loss term (see the module docstring for the contract)."""

  def loss(self, params, batch, rng, run: Pass) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  @staticmethod
  def check(config) -> None:
    """One line (ConfigError) for a setting of this term that cannot work, checked before
    anything is built; the term is not built yet, so this reads the config."""

  @staticmethod
  def check_mesh(config, mesh) -> None:
    """One line for a setting of this term that the mesh cannot serve (before the state)."""

  def features(self, batch_sharding) -> dict:
    """Batch features this term needs beyond the LM batch, as sharded ShapeDtypeStructs."""
    del batch_sharding
    return {}

  def evaluators(self) -> tuple:
    """What validation runs for this term (``xlingo.training.hooks.Evaluator``s)."""
    return ()

  def frozen(self):
    """Arrays the compiled step takes as an argument (not constants): None, or a pytree."""
    return None

  def bind(self, frozen) -> Term:
    """This term with ``frozen`` (the traced form of :meth:`frozen`) in place."""
    del frozen
    return self


# --- cross-entropy with per-language weights --------------------------------------------------


def language_loss_weights(config) -> np.ndarray | None:
  """The LM loss weight of each language id (``data.languages`` order), or None when every
  weight is 1. ``train.loss_weights`` (1.0 where not listed), then ``train.main_language``
  weighs ``train.main_language_weight``. Languages the table lacks are ignored here
  (:meth:`CrossEntropy.check` refuses them before training)."""
  t = config.train
  given = dict(t.loss_weights or {})
  main = t.main_language or ""
  codes = list(config.data.languages)
  w = [float(given.get(c, 1.0)) for c in codes]
  if main in codes:
    w[codes.index(main)] = float(t.main_language_weight)
  if all(x == 1.0 for x in w):
    return None
  return np.asarray(w, np.float32)


def loss_weights_line(config) -> str:
  """The start-of-run line that shows the per-language loss weights ("" when all are 1)."""
  w = language_loss_weights(config)
  if w is None:
    return ""
  main = config.train.main_language
  parts = [f"{c} {x:g}{' (main)' if c == main else ''}"
           for c, x in zip(config.data.languages, w.tolist())]
  return ("LM loss weights per language (train.loss_weights, train.main_language; sampling "
          "is unchanged; metrics unweighted): " + ", ".join(parts))


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Term):
  """Next-token cross-entropy (+ z-loss), each token weighted by its language's loss weight.

  The model returns its final hidden states and the loss projects them onto the vocabulary
  ``chunk_size`` positions at a time (``losses.chunked_cross_entropy``), so the [B, T, V]
  float32 logits and their gradient are never held at once. The per-token values reported
  (``per_token['loss']``: per-language loss and bpb) are unweighted cross-entropies.
  """

  z_loss: float = 0.0
  chunk_size: int = 0
  lang_weights: tuple[float, ...] | None = None  # per language id; None: all 1

  @classmethod
  def from_config(cls, config) -> CrossEntropy:
    w = language_loss_weights(config)
    if w is not None:
      pad = max(0, config.model.num_languages - len(w))
      w = tuple(float(x) for x in np.concatenate([w, np.ones(pad, np.float32)]))
    return cls(float(config.train.z_loss), loss_chunk_size(config), w)

  @staticmethod
  def check(config) -> None:
    check_loss_weights(config)

  def loss(self, params, batch, rng, run):
    scale = None if self.lang_weights is None else jnp.take(
        jnp.asarray(np.asarray(self.lang_weights, np.float32)), batch["lang_ids"])
    ce_sum, _, per_token = losses.chunked_cross_entropy(
        run.logits_fn(), run.lm().hidden, batch["targets"], batch["loss_weights"],
        z_loss=self.z_loss, chunk_size=self.chunk_size, scale_bt=scale)
    return ce_sum, {"per_token": {"loss": per_token}}


# --- the language-ID head -------------------------------------------------------------------


def _lid_correct(lid_logits_btl, lang_ids_bt):
  return (jnp.argmax(lid_logits_btl, axis=-1) == lang_ids_bt).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LanguageId(Term):
  """``weight`` times the mean language-ID cross-entropy over the tokens whose hint is hidden
  (none hidden: 0), and its mean and accuracy as ``lid_loss_sum`` / ``lid_acc_sum`` (logged as
  lid_loss, lid_acc), of the LM forward pass's LID head."""

  weight: float = 0.0

  @staticmethod
  def check(config) -> None:
    check_hints_and_lid(config)

  def loss(self, params, batch, rng, run):
    out = run.lm()
    return language_id_loss(self.weight, out.lid_logits, batch, out.hint_hidden, run)


def language_id_loss(weight, lid_logits, batch, hint_hidden, run):
  if lid_logits is None or hint_hidden is None:
    return jnp.float32(0.0), {}
  weights = batch["loss_weights"].astype(jnp.float32)
  n_tok = run.token_count()
  lid_w = weights * hint_hidden
  lid_sum, lid_count = losses.lid_loss(lid_logits, batch["lang_ids"], lid_w)
  count = jnp.maximum(lid_count, 1.0)
  lid_mean = lid_sum / count
  acc = jnp.sum(_lid_correct(lid_logits, batch["lang_ids"]) * lid_w) / count
  return weight * lid_mean * n_tok, {"lid_loss_sum": lid_mean * n_tok,
                                     "lid_acc_sum": acc * n_tok}


@dataclasses.dataclass(frozen=True)
class HintFreeValidation(Term):
  """Validation without any language hint, no training loss: per-token ``lid_acc`` (with the
  LID head) and, with language embeddings, ``loss_nohint`` (reported as val/bpb_nohint/<lang>).
  Without language embeddings every pass is hint-free: ``lid_acc`` of the LM pass."""

  use_lang_emb: bool = True
  lid_head: bool = False
  nohint_loss: bool = False  # the hint can be absent in use (LID head or hint dropout)
  chunk_size: int = 0

  @classmethod
  def from_config(cls, config) -> HintFreeValidation:
    m = config.model
    return cls(bool(m.use_lang_emb), bool(m.lid_head),
               bool(m.lid_head or m.lang_emb_dropout), loss_chunk_size(config))

  def loss(self, params, batch, rng, run):
    if not run.evaluating:
      return jnp.float32(0.0), {}
    w = batch["loss_weights"].astype(jnp.float32)
    out = {}
    if not self.use_lang_emb:
      lid = run.lm().lid_logits
      if lid is not None:
        out["lid_acc"] = _lid_correct(lid, batch["lang_ids"]) * w
      return jnp.float32(0.0), {"per_token": out}
    if not self.nohint_loss:
      return jnp.float32(0.0), {}
    nohint = run.lm_without_hints()
    _, _, out["loss_nohint"] = losses.chunked_cross_entropy(
        run.logits_fn(), nohint.hidden, batch["targets"], batch["loss_weights"],
        chunk_size=self.chunk_size)
    if nohint.lid_logits is not None:
      out["lid_acc"] = _lid_correct(nohint.lid_logits, batch["lang_ids"]) * w
    return jnp.float32(0.0), {"per_token": out}


# --- L2 towards the initial parameters -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class L2ToInit(Term):
  """``weight * ||theta - theta_0||^2`` over the trained parameters (``trainable`` regex),
  ``theta_0`` bound at build time and passed to the step as an argument (``frozen``)."""

  weight: float = 0.0
  trainable: str = ".*"
  init: Any = None

  def loss(self, params, batch, rng, run):
    from xlingo.training import state as state_lib

    trained = state_lib.trained_params(params, self.trainable)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32) - x0.astype(jnp.float32)))
             for x, x0 in zip(jax.tree.leaves(trained), jax.tree.leaves(self.init)))
    # The step divides the loss sum by the batch's weight: scale so that the mean loss gains
    # exactly weight * ||theta - theta_0||^2 (also across microbatches).
    pen = self.weight * sq * jnp.sum(batch["loss_weights"].astype(jnp.float32))
    return pen, {"l2_init_sum": pen}

  def frozen(self):
    return self.init

  def bind(self, frozen):
    return dataclasses.replace(self, init=frozen)


# --- distillation ---------------------------------------------------------------------------


def scheduled(start: float, end: float, kind: str, step, steps: int):
  """``start``, or linear from ``start`` at step 0 to ``end`` at ``steps`` (kind 'linear')."""
  if kind == "constant" or step is None:
    return jnp.float32(start)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return jnp.float32(start) + (end - start) * frac


@dataclasses.dataclass(frozen=True)
class Distillation(Term):
  """alpha * tau^2 * KL(p_teacher^tau || p_student^tau) + (1 - alpha) * CE(student), summed over
  tokens, alpha and tau on their schedule; the teacher bound at build time (its parameters are
  the step's argument, under ``stop_gradient``).

  Both models return hidden states; the loss projects them onto the vocabulary ``chunk_size``
  positions at a time (``losses.chunked_distillation``), so neither the teacher's nor the
  student's [B, T, V] logits are ever held whole. ``per_token['loss']`` stays the student's own
  cross-entropy: the loop turns it into bits per byte.
  """

  teacher_model: Any = None
  teacher_params: Any = None
  alpha: tuple[float, float] = (0.5, 0.5)  # start, end
  temperature: tuple[float, float] = (1.0, 1.0)
  schedule: str = "constant"
  steps: int = 1
  top_k: int = 0
  z_loss: float = 0.0
  chunk_size: int = 0

  def loss(self, params, batch, rng, run):
    feats = (batch["inputs"], batch["segment_ids"], batch["positions"])
    # Frozen teacher: no gradient, so no activations are kept for a backward pass.
    teacher_params = jax.lax.stop_gradient(self.teacher_params)
    t_hidden, _ = self.teacher_model.apply({"params": teacher_params}, *feats, batch["lang_ids"],
                                           deterministic=True, return_hidden=True)
    alpha = scheduled(*self.alpha, self.schedule, run.step, self.steps)
    tau = scheduled(*self.temperature, self.schedule, run.step, self.steps)
    ce_sum, ce_pt, kl_sum, kl_pt = losses.chunked_distillation(
        run.logits_fn(), run.lm().hidden, output_logits_fn(self.teacher_model, teacher_params),
        t_hidden, batch["targets"], batch["loss_weights"], z_loss=self.z_loss,
        temperature=tau, top_k=self.top_k or None, chunk_size=self.chunk_size)
    total = alpha * tau**2 * kl_sum + (1.0 - alpha) * ce_sum
    return total, {"per_token": {"loss": ce_pt, "kl": kl_pt}, "kl_sum": kl_sum, "ce_sum": ce_sum}

  def frozen(self):
    return self.teacher_params

  def bind(self, frozen):
    return dataclasses.replace(self, teacher_params=frozen)


@dataclasses.dataclass(frozen=True)
class StoredDistillation(Term):
  """:class:`Distillation`'s top-k loss with the teacher's top-k ids and log-probabilities read
  from the batch (``distill.teacher_logits``: xlingo.training.teacher_logits adds them) instead
  of computed by a teacher. Validation batches carry none: there the term is the student's
  cross-entropy alone (no ``kl``)."""

  k: int = 1
  batch_size: int = 1
  seq_len: int = 1
  alpha: tuple[float, float] = (0.5, 0.5)
  temperature: tuple[float, float] = (1.0, 1.0)
  schedule: str = "constant"
  steps: int = 1
  z_loss: float = 0.0
  chunk_size: int = 0

  IDS = "teacher_topk_ids"
  LOGP = "teacher_topk_logp"

  def loss(self, params, batch, rng, run):
    if self.IDS not in batch:
      ce_sum, _, ce_pt = losses.chunked_cross_entropy(
          run.logits_fn(), run.lm().hidden, batch["targets"], batch["loss_weights"],
          z_loss=self.z_loss, chunk_size=self.chunk_size)
      return ce_sum, {"per_token": {"loss": ce_pt}, "ce_sum": ce_sum}
    alpha = scheduled(*self.alpha, self.schedule, run.step, self.steps)
    tau = scheduled(*self.temperature, self.schedule, run.step, self.steps)
    ce_sum, ce_pt, kl_sum, kl_pt = losses.chunked_stored_distillation(
        run.logits_fn(), run.lm().hidden, batch[self.LOGP], batch[self.IDS], batch["targets"],
        batch["loss_weights"], z_loss=self.z_loss, temperature=tau, chunk_size=self.chunk_size)
    total = alpha * tau**2 * kl_sum + (1.0 - alpha) * ce_sum
    return total, {"per_token": {"loss": ce_pt, "kl": kl_pt}, "kl_sum": kl_sum, "ce_sum": ce_sum}

  def features(self, batch_sharding) -> dict:
    shape = (self.batch_size, self.seq_len, self.k)
    return {self.IDS: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
            self.LOGP: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding)}


# --- config checks of the LM terms ----------------------------------------------------------


def check_hints_and_lid(config) -> None:
  m, t = config.model, config.train
  rate = float(m.lang_emb_dropout)
  if not 0.0 <= rate <= 1.0:
    raise ConfigError(f"model.lang_emb_dropout={rate} must be in [0, 1] (the share of examples "
                      "trained without a language hint)")
  if rate and not m.use_lang_emb:
    raise ConfigError(f"model.lang_emb_dropout={rate} has no hint to hide with "
                      "model.use_lang_emb=False; set it to 0 or turn the language embedding on")
  if t.lid_loss_weight < 0:
    raise ConfigError(f"train.lid_loss_weight={t.lid_loss_weight} must be >= 0")
  if t.lid_loss_weight and not m.lid_head:
    raise ConfigError(f"train.lid_loss_weight={t.lid_loss_weight} needs the language-ID head: "
                      "set --config.model.lid_head=True")
  if t.lid_loss_weight and m.use_lang_emb and not rate:
    raise ConfigError(
        f"train.lid_loss_weight={t.lid_loss_weight} with model.use_lang_emb=True and "
        "model.lang_emb_dropout=0 teaches nothing (the head reads the language embedding added "
        "at the same token, not the text); set --config.model.lang_emb_dropout=0.1 (the loss "
        "is then taken where the hint is hidden) or --config.model.use_lang_emb=False")


def check_loss_weights(config) -> None:
  t = config.train
  codes = list(config.data.languages)
  given = dict(t.loss_weights or {})
  main = t.main_language or ""
  for lang, w in given.items():
    if lang not in codes:
      raise ConfigError(f"train.loss_weights names {lang!r}, which is not in data.languages="
                        f"{tuple(codes)}; fix the language code")
    if not (isinstance(w, int | float) and np.isfinite(w) and w >= 0):
      raise ConfigError(f"train.loss_weights.{lang}={w!r} must be a number >= 0")
  if main and main not in codes:
    raise ConfigError(f"train.main_language={main!r} is not in data.languages={tuple(codes)}")
  if main and main in given:
    raise ConfigError(f"train.main_language={main!r} is also in train.loss_weights; give its "
                      "weight once, as train.main_language_weight")
  mw = t.main_language_weight
  if not (np.isfinite(mw) and mw >= 0):
    raise ConfigError(f"train.main_language_weight={mw} must be a number >= 0")
  w = language_loss_weights(config)
  if w is not None and not w.any():
    raise ConfigError("every language has LM loss weight 0 (train.loss_weights, "
                      "train.main_language_weight); give at least one a weight > 0")
