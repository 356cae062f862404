"""The task heads of ``python -m xlingo.finetune``: the loss term, its evaluator, and the scoring
that the loop's validation, the run's report and ``evaluate --task`` share.

Two heads score the C classes of an example (the rows of ``xlingo.data.task_batches``):

  classifier  a linear head (``model.task_classes``; ``Decoder.classify``) on the final-norm
              hidden states pooled over the example (``finetune.pool``): ``mean`` over its text
              tokens (positions 1..n; the BOS position, the same in every example, is left
              out), the default, since in a causal decoder every token's state then counts and
              the early ones that saw only a prefix are averaged with the late ones that saw it
              all; or ``last``, the state after the last token, the only one that has read the
              whole text (the usual choice for decoder-only classifiers, better with long
              training).
  verbalizer  the LM itself: class c's score is the log-probability of its name (labels.json
              ``names[lang]``) as the continuation of the text and ``finetune.prompt``,
              ``finetune.verbalizer_norm``: ``mean`` (default) over the name's tokens, so that
              names of different lengths compete on the same per-token scale (a sum favours
              short names), or ``sum``. No new parameters: every ``adapt.mode`` trains it.

The loss is the cross-entropy over the C scores, per example; accuracy is the argmax's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlingo.data import task_batches
from xlingo.training import terms

POOLS = ("mean", "last")
NORMS = ("mean", "sum")
# The early-stopping key: 1 - the mean validation accuracy over the training languages (only
# theirs: the other languages' accuracy is reported, never used to choose).
SELECT_KEY = "val/task_error"


@dataclasses.dataclass(frozen=True)
class Settings:
  head: str
  pool: str
  norm: str
  num_classes: int
  batch_size: int  # global rows per training batch
  max_len: int
  name_len: int  # verbalizer: N

  @classmethod
  def from_dict(cls, f: dict, encoder: task_batches.Encoder, batch_size: int) -> Settings:
    """From the ``finetune`` section (as a dict: a config's, or a checkpoint's metadata)."""
    return cls(str(f["head"]), str(f["pool"]), str(f["verbalizer_norm"]), encoder.num_classes,
               int(batch_size), encoder.max_len, encoder.name_len)


def _pooled(hidden_btd, batch, pool: str):
  if pool == "last":
    w = batch["loss_weights"].astype(jnp.float32)
  else:
    w = ((batch["segment_ids"] > 0) & (batch["positions"] > 0)).astype(jnp.float32)
  return jnp.einsum("btd,bt->bd", hidden_btd.astype(jnp.float32), w) / jnp.maximum(
      w.sum(-1, keepdims=True), 1.0)


def scores(model, params, batch, s: Settings, *, deterministic: bool = True, rng=None):
  """[B, C] float32 class scores of the batch's examples (see the module docstring)."""
  rngs = {"dropout": rng} if rng is not None and not deterministic else {}
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  if s.head == "classifier":
    hidden, _ = apply(batch["inputs"], batch["segment_ids"], batch["positions"],
                      batch["lang_ids"], deterministic=deterministic, rngs=rngs,
                      return_hidden=True)
    return apply(_pooled(hidden, batch, s.pool), method="classify")
  b, c, length = batch["choice_inputs"].shape
  flat = lambda x: x.reshape((b * c,) + x.shape[2:])
  lang = jnp.broadcast_to(batch["lang_ids"][:, :1, None], (b, c, length))
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b * c, length))
  hidden, _ = apply(flat(batch["choice_inputs"]), flat(batch["choice_segment_ids"]), pos,
                    flat(lang), deterministic=deterministic, rngs=rngs, return_hidden=True)
  picked = jnp.take_along_axis(hidden, flat(batch["name_pos"])[..., None], axis=1)  # [BC, N, D]
  logp = jax.nn.log_softmax(apply(picked, method="logits_from_hidden"), axis=-1)
  tok = jnp.take_along_axis(logp, flat(batch["name_ids"])[..., None], axis=-1)[..., 0]
  mask = flat(batch["name_mask"])
  score = (tok * mask).sum(-1)
  if s.norm == "mean":
    score = score / jnp.maximum(mask.sum(-1), 1.0)
  return score.reshape(b, c)


def _valid(batch):
  return (batch["loss_weights"].sum(-1) > 0).astype(jnp.float32)


def correct_counts(model, params, batch, s: Settings):
  """(correct, examples) of a batch, padding rows left out."""
  pred = jnp.argmax(scores(model, params, batch, s), axis=-1)
  valid = _valid(batch)
  return jnp.sum((pred == batch["task_labels"]) * valid), jnp.sum(valid)


@dataclasses.dataclass(frozen=True)
class TaskLoss(terms.Term):
  """Cross-entropy over the class scores, one per example (the step divides by the number of
  examples: each row's ``loss_weights`` is 1 at one position). Per language, logged as
  ``loss/<lang>`` and ``acc/<lang>`` (the training batches' accuracy)."""

  settings: Settings
  model: Any = dataclasses.field(default=None, compare=False)  # for the evaluator
  # lang -> list of global host batches, for validation (not compared: arrays)
  validation: dict = dataclasses.field(default_factory=dict, compare=False)
  train_languages: tuple = ()

  def loss(self, params, batch, rng, run):
    sc = scores(run.model, params, batch, self.settings, deterministic=run.deterministic,
                rng=rng)
    labels = batch["task_labels"]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(sc, axis=-1), labels[:, None], axis=-1)[:, 0]
    acc = (jnp.argmax(sc, axis=-1) == labels).astype(jnp.float32)
    w = batch["loss_weights"].astype(jnp.float32)
    return jnp.sum(ce * _valid(batch)), {"per_token": {"loss": ce[:, None] * w,
                                                       "acc": acc[:, None] * w}}

  def features(self, batch_sharding) -> dict:
    s = self.settings
    b, c, n, length = s.batch_size, s.num_classes, s.name_len, s.max_len
    shapes = {"task_labels": ((b,), jnp.int32)}
    if s.head == "verbalizer":
      shapes.update({"choice_inputs": ((b, c, length), jnp.int32),
                     "choice_segment_ids": ((b, c, length), jnp.int32),
                     "name_pos": ((b, c, n), jnp.int32), "name_ids": ((b, c, n), jnp.int32),
                     "name_mask": ((b, c, n), jnp.float32)})
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding)
            for k, (shape, dt) in shapes.items()}

  def evaluators(self) -> tuple:
    return (Accuracy(self),) if self.validation else ()


class Scorer:
  """Accuracy over sets of global host batches on a mesh: what validation, the report and
  ``evaluate --task`` run, so they give the same numbers."""

  def __init__(self, model, settings: Settings, mesh, batch_sharding):
    from jax.sharding import NamedSharding, PartitionSpec

    self.batch_sharding = batch_sharding
    self.fn = jax.jit(lambda p, b: correct_counts(model, p, b, settings),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))

  def accuracy(self, params, batches: list) -> tuple[float, int]:
    """(accuracy, examples) over ``batches`` (global host batches)."""
    from xlingo.data import iterator

    right = total = 0.0
    for b in batches:
      r, n = self.fn(params, iterator.to_global(task_batches.local_rows(b),
                                                self.batch_sharding))
      right, total = right + float(r), total + float(n)
    return (right / total if total else float("nan")), int(total)


@dataclasses.dataclass(frozen=True)
class Accuracy:
  """Validation's ``val/acc/<lang>`` for every evaluated language and ``val/task_error`` (the
  early-stopping key: 1 - the mean accuracy over the training languages)."""

  term: TaskLoss

  def prepare(self, env):
    t = self.term
    scorer = Scorer(t.model, t.settings, env.mesh, env.batch_sharding)
    return lambda params, extra: validation_metrics(scorer, params, t.validation,
                                                    t.train_languages)


def validation_metrics(scorer: Scorer, params, sets: dict, train_languages) -> dict:
  out = {}
  for lang, batches in sets.items():
    out[f"val/acc/{lang}"] = scorer.accuracy(params, batches)[0]
  accs = [out[f"val/acc/{lang}"] for lang in train_languages if f"val/acc/{lang}" in out]
  if accs:
    out[SELECT_KEY] = 1.0 - float(np.mean(accs))
  return out


# --- a loaded model's accuracy, and the transfer table ---------------------------------------


def evaluate_loaded(lm, data: task_batches.TaskData, splits, settings: dict,
                    batch_size: int) -> dict:
  """{split: {'acc': {lang: accuracy}, 'examples': {lang: n}}} of a loaded model
  (``load.LoadedModel``) on ``data``'s ``splits`` (validation, test), read as ``settings`` (a
  ``finetune`` section) says."""
  from xlingo import sharding

  sets = {split: data.test if split == "test" else data.validation for split in splits}
  langs = tuple(dict.fromkeys(lang for s in sets.values() for lang in s))
  encoder = task_batches.Encoder.build(lm.vocab, lm.table.codes, data.labels, settings, langs)
  scorer = Scorer(lm.model, Settings.from_dict(settings, encoder, batch_size), lm.mesh,
                  sharding.batch_sharding(lm.mesh))
  out = {}
  with sharding.mesh_context(lm.mesh, lm.rules):
    for split, by_lang in sets.items():
      acc, n = {}, {}
      for lang, examples in by_lang.items():
        batches = task_batches.eval_batches(encoder.encode(lm.vocab, examples, lang),
                                            batch_size)
        acc[lang], n[lang] = scorer.accuracy(lm.params, batches)
      out[split] = {"acc": acc, "examples": n}
  return out


def transfer_row(train_languages, acc: dict) -> dict:
  """One row of the zero-shot transfer table: the accuracies, the mean over the training
  languages (``train_acc``), each language's ``gap`` to it, and the mean over the others
  (``zero_shot_mean``, ``zero_shot_gap``)."""
  train = [acc[x] for x in train_languages if x in acc]
  base = float(np.mean(train)) if train else float("nan")
  others = [v for k, v in acc.items() if k not in train_languages]
  zs = float(np.mean(others)) if others else float("nan")
  return {"train_languages": list(train_languages), "acc": dict(acc),
          "gap": {k: v - base for k, v in acc.items()}, "train_acc": base,
          "zero_shot_mean": zs, "zero_shot_gap": zs - base}


def format_transfer(rows: dict, codes, title: str) -> str:
  """The table: one row per run (its label, e.g. its training languages), one column per
  language, accuracy in %, the zero-shot mean; under each row its gap to the training
  language(s)."""
  codes = [c for c in codes if any(c in r["acc"] for r in rows.values())]
  width = max([len(k) for k in rows] + [8])
  head = f"{'train':<{width}} " + " ".join(f"{c:>6}" for c in codes) + f" | {'0-shot':>6}"
  lines = [title, head, "-" * len(head)]
  cell = lambda v: f"{100 * v:>6.1f}" if v == v else f"{'-':>6}"
  for label, r in rows.items():
    lines.append(f"{label:<{width}} " + " ".join(
        cell(r["acc"][c]) if c in r["acc"] else f"{'':>6}" for c in codes)
        + f" | {cell(r['zero_shot_mean'])}")
    gap = {c: "" if c not in r["gap"] else "." if c in r["train_languages"]
           else f"{100 * r['gap'][c]:+.1f}" for c in codes}
    zs = r["zero_shot_gap"]
    lines.append(f"{'  gap':<{width}} " + " ".join(f"{gap[c]:>6}" for c in codes)
                 + f" | {(f'{100 * zs:+.1f}' if zs == zs else '-'):>6}")
  return "\n".join(lines)
