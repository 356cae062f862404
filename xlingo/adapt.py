"""Language adaptation of a pretrained LM: continued LM and/or translation pairs, from init_from.

  python -m xlingo.adapt --config configs/adapt_tiny.py --workdir workdirs/adapt \
      --config.checkpoint.init_from=workdirs/lm [--config.adapt.mode=lora] [--config.KEY=VALUE]

Parameters come from ``checkpoint.init_from`` (the optimizer starts fresh); languages may be
appended to the checkpoint's (new language-embedding rows start fresh), and the vocabulary may be
extended (``data.vocab_path`` from ``python -m xlingo.data.vocab extend``: new token rows start
at the mean of the old pieces each new piece decodes to). ``adapt.mode`` says what trains:
``full``, ``freeze`` (``train.trainable`` regex), ``lora`` (low-rank side paths on
``adapt.lora.targets``), ``adapter`` (a bottleneck per block, ``adapt.adapter.per_language``
for one per language), ``prefix`` (learned key/value prefixes per layer), ``lang_emb`` (only
the language embeddings); the frozen parameters get no gradient and no optimizer state
(xlingo.model.peft, xlingo.training.state). Against forgetting: ``adapt.l2_init_weight`` (L2
of the trained parameters towards their initial values), ``adapt.replay_ratio`` (that share of
the mixture goes to the other languages) and ``adapt.early_stop_patience`` (evaluations without
a better target bpb; WORKDIR/best keeps the best). At the end: a before/after table of
validation bpb for every language, and BLEU/chrF (``evaluate``'s scorer) on greedy translations
(``generate``'s decoder) of a few validation pairs for ``data.translation_pairs``; both are
also in WORKDIR/adapt_report.json. The workdir loads in ``evaluate`` and ``generate`` as it is;
``adapt.export_merged=DIR`` also writes plain (LoRA-merged) parameters. Resume, SIGTERM and
metrics are the loop's.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from flax import linen as nn

from xlingo import cli, paths, scoring, sharding
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import layout, load, metrics, step
from xlingo.training import state as state_lib

MODES = ("full", "freeze", "lora", "adapter", "prefix", "lang_emb")


# --- config ---------------------------------------------------------------------------------


def targets_of(config) -> list[str]:
  """The languages adapted to: data.train_languages, then the targets of translation pairs."""
  out = list(config.data.train_languages or ())
  for pair in config.data.translation_pairs or ():
    tgt = pair.split("-")[-1]
    if tgt not in out:
      out.append(tgt)
  return out


def target_language(config) -> str:
  return config.adapt.target_language or targets_of(config)[0]


def check_config(config) -> None:
  if "adapt" not in config:
    raise ConfigError("the config has no 'adapt' section; start from configs/adapt_tiny.py or "
                      "set c.adapt = xlingo.config.adapt_section() in get_config")
  a = config.adapt
  if not config.checkpoint.init_from:
    raise ConfigError("adaptation starts from a pretrained model: set "
                      "--config.checkpoint.init_from=WORKDIR_OF_AN_LM_RUN (or a step directory)")
  if a.mode not in MODES:
    raise ConfigError(f"adapt.mode={a.mode!r} is unknown; use one of {', '.join(MODES)}")
  if a.mode == "lang_emb" and not config.model.use_lang_emb:
    raise ConfigError("adapt.mode='lang_emb' needs model.use_lang_emb=True")
  if a.export_merged and a.mode in ("adapter", "prefix"):
    raise ConfigError(f"adapt.export_merged with adapt.mode={a.mode!r}: adapters and prefixes "
                      "are not weights to merge into; evaluate and generate load the workdir "
                      "itself, so leave adapt.export_merged empty")
  peft.spec_from_config(config)  # its own checks (rank, bottleneck, prefix length, targets)
  if not targets_of(config):
    raise ConfigError("nothing to adapt to: set data.train_languages (e.g. ('de',)) and/or "
                      "data.translation_pairs (e.g. ('en-de',))")
  for pair in config.data.translation_pairs or ():
    if len(pair.split("-")) != 2:
      raise ConfigError(f"data.translation_pairs entry {pair!r} must look like 'en-de'")
  langs = list(config.data.languages)
  for lang in targets_of(config) + [p.split("-")[0] for p in config.data.translation_pairs]:
    if lang not in langs:
      raise ConfigError(f"language {lang!r} is not in data.languages={tuple(langs)}; append it "
                        "there (and raise model.num_languages if needed)")
  if a.target_language and a.target_language not in targets_of(config):
    raise ConfigError(f"adapt.target_language={a.target_language!r} is not among the targets "
                      f"{targets_of(config)}")
  if not 0.0 <= a.replay_ratio < 1.0:
    raise ConfigError(f"adapt.replay_ratio={a.replay_ratio} must be in [0, 1)")
  if a.l2_init_weight < 0 or a.early_stop_patience < 0:
    raise ConfigError("adapt.l2_init_weight and adapt.early_stop_patience must be >= 0")


def resolve_config(config) -> None:
  """Turns the adapt section into the settings the loop reads (in place, before the run).

  ``adapt.mode`` becomes ``train.trainable`` (the one freezing mechanism: what it does not
  match gets no gradient). ``adapt.replay_ratio`` is applied where the rates are made
  (xlingo.data.mixing.with_replay, from the data plan).
  """
  check_config(config)
  a = config.adapt
  if a.mode == "full":
    config.train.trainable = ".*"
  elif a.mode in peft.TRAINABLE:
    config.train.trainable = peft.TRAINABLE[a.mode]
  elif a.mode == "lang_emb":
    config.train.trainable = r"^lang_embedding$"
  elif config.train.trainable in (".*", ""):
    raise ConfigError("adapt.mode='freeze' needs train.trainable, a regex over parameter paths "
                      "(e.g. 'blocks/layers/mlp/' or 'lang_embedding|final_norm')")


# --- objective ------------------------------------------------------------------------------


class EarlyStopping:
  """Tracks the target's validation bpb: 'save best' on improvement, 'stop' after patience."""

  def __init__(self, key: str, patience: int):
    self.key = key
    self.patience = patience
    self.best = float("inf")
    self.best_step = None
    self.bad = 0

  def on_eval(self, step, val) -> bool:
    v = val.get(self.key)
    if v is None:
      return False
    if v < self.best:
      self.best, self.best_step, self.bad = v, step, 0
      return True
    self.bad += 1
    return False

  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad >= self.patience


def make_objective(config):
  """The adaptation objective: the shared LM loss (+ L2 towards the initial values of the
  trained parameters), with early stopping on the target's validation bpb."""
  a = config.adapt
  l2 = float(a.l2_init_weight)

  def loss_fn(ctx, params, batch, rng, extra):
    # Targets-only loss on translation pairs comes from the batch: its loss_weights are 0 on
    # the source tokens, so the shared LM loss is already the conditional loss.
    total, aux = step.lm_loss(ctx, params, batch, rng, None)
    if l2 and extra:
      trained = state_lib.trained_params(params, ctx.config.train.trainable)
      sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32) - x0.astype(jnp.float32)))
               for x, x0 in zip(jax.tree.leaves(trained), jax.tree.leaves(extra["init"])))
      # The step divides the loss sum by the batch's weight: scale so that the mean loss
      # gains exactly l2 * ||theta - theta_0||^2 (also across microbatches).
      pen = l2 * sq * jnp.sum(batch["loss_weights"].astype(jnp.float32))
      total = total + pen
      aux["l2_init_sum"] = pen
    return total, aux

  def prepare_extra(cfg, mesh, rules):
    if not l2:
      return {}
    init = load.load_model(cfg, cfg.checkpoint.init_from, what="checkpoint.init_from", mesh=mesh,
                           rules=rules, model_from="config").params
    return {"init": state_lib.trained_params(init, cfg.train.trainable)}

  stopper = EarlyStopping(f"val/bpb/{target_language(config)}", int(a.early_stop_patience))
  return step.Objective(
      name="adapt", loss_fn=loss_fn, prepare_extra=prepare_extra, check_config=check_config,
      on_eval=stopper.on_eval, should_stop=stopper.should_stop), stopper


# --- reports --------------------------------------------------------------------------------


def bpb_table(workdir: str, languages, target: str) -> tuple[str, dict]:
  """Before (step 0) / after (last evaluation) validation bpb per language, from metrics.jsonl."""
  rows = [r for r in metrics.read_jsonl(paths.join(workdir, layout.METRICS))
          if any(k.startswith("val/bpb/") for k in r)]
  if not rows:
    return "", {}
  before = next((r for r in rows if r["step"] == 0), rows[0])
  after = rows[-1]
  out = {"before_step": before["step"], "after_step": after["step"], "languages": {}}
  lines = [f"{'language':<10} {'before':>8} {'after':>8} {'change':>8}", "-" * 37]
  for lang in languages:
    k = f"val/bpb/{lang}"
    if k in before and k in after:
      b, x = before[k], after[k]
      out["languages"][lang] = {"before": b, "after": x, "change": x - b}
      mark = "  (target)" if lang == target else ""
      lines.append(f"{lang:<10} {b:>8.3f} {x:>8.3f} {x - b:>+8.3f}{mark}")
  head = f"validation bits per byte, step {before['step']} -> step {after['step']}"
  return head + "\n" + "\n".join(lines), out


def translation_report(config, models: dict) -> dict:
  """{pair: {name: scoring.translate_scores(...)}} on the first ``adapt.bleu_examples``
  validation pairs of each of ``data.translation_pairs`` that has some, for each loaded model
  in ``models`` (name -> ``load.LoadedModel``)."""
  out = {}
  for pair in config.data.translation_pairs or ():
    examples = scoring.validation_pairs(config, pair)
    if not examples:
      metrics.console(f"{pair}: no validation pairs here (the embedded corpus has en-X and "
                      "X-en), so no BLEU/chrF")
      continue
    src, tgt = pair.split("-")
    out[pair] = {name: scoring.translate_scores(
        lm, examples, src, tgt, max_examples=int(config.adapt.bleu_examples),
        max_new=int(config.adapt.max_decode_len)) for name, lm in models.items()}
  return out


def parameter_counts(config) -> dict:
  """{'params', 'trained_params'} of the adapted model (from shapes alone)."""
  model = decoder_lib.Decoder(config.model, peft.spec_from_config(config))
  abstract = nn.unbox(sharding.abstract_params(model, config.model, 8))
  return {"params": state_lib.param_count(abstract),
          "trained_params": state_lib.param_count(
              state_lib.trained_params(abstract, config.train.trainable))}


def run(config, workdir: str) -> dict:
  """Adapt, then report; returns {'metrics', 'bpb', 'translation', 'best_step', ...}."""
  # After the flags: the loop imports the data layer (seqio, TensorFlow), so a config error
  # is reported before that import.
  from xlingo.training import loop

  loop.adopt_init_from_model(config)  # before the objective is built from the config
  resolve_config(config)
  objective, stopper = make_objective(config)
  last = loop.run(config, workdir, objective)
  target = target_language(config)
  text, bpb = bpb_table(workdir, config.data.languages, target)
  if text:
    metrics.console(text)
  report = {"metrics": last, "bpb": bpb, "target": target, "mode": config.adapt.mode,
            "best_step": stopper.best_step, "translation": {}, **parameter_counts(config)}
  want_bleu = bool(config.data.translation_pairs) and config.adapt.bleu_examples > 0
  if (want_bleu or config.adapt.export_merged) and paths.isdir(
      paths.join(workdir, layout.CHECKPOINTS)):
    # The run's last parameters, loaded as every tool loads them (no training plan, no
    # optimizer), and those it started from.
    after = load.load_model(config, workdir)
    if want_bleu:
      before = load.load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                               mesh=after.mesh, rules=after.rules, model_from="config")
      report["translation"] = translation_report(config, {"before": before, "after": after})
      for pair, r in report["translation"].items():
        metrics.console(
            f"{pair} greedy, {r['after']['examples']} validation pairs: BLEU "
            f"{r['before']['bleu']:.1f} -> {r['after']['bleu']:.1f}, chrF "
            f"{r['before']['chrf']:.1f} -> {r['after']['chrf']:.1f} "
            f"({r['after']['bleu_signature']})")
    if config.adapt.export_merged:
      path = load.export_merged(after, config.adapt.export_merged)
      metrics.console(f"merged parameters written to {path} (usable as checkpoint.init_from)")
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, layout.report_name("adapt")),
                     json.dumps(report, indent=1, default=float))
  return report


def main(argv=None):
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  main()
