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
from flax import linen as nn

from xlingo import cli, paths, scoring, sharding
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import layout, load, metrics, step, terms
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


def make_recipe(config) -> step.Recipe:
  """The adaptation objective: the shared LM terms (+ L2 towards the initial values of the
  trained parameters), with early stopping on the target's validation bpb. Targets-only loss on
  translation pairs comes from the batch: its loss_weights are 0 on the source tokens, so the
  shared cross-entropy is already the conditional loss."""
  l2 = float(config.adapt.l2_init_weight)

  def build(cfg, setup):
    more = ()
    if l2:
      init = load.load_model(cfg, cfg.checkpoint.init_from, what="checkpoint.init_from",
                             mesh=setup.mesh, rules=setup.rules, model_from="config").params
      trainable = cfg.train.trainable
      more = (terms.L2ToInit(l2, trainable, state_lib.trained_params(init, trainable)),)
    return step.lm_objective(cfg, setup.model, "adapt", more)

  from xlingo.training import hooks

  stopper = hooks.EarlyStopping(f"val/bpb/{target_language(config)}",
                                int(config.adapt.early_stop_patience))
  return step.Recipe("adapt", build, check_config, hooks=(stopper, Report(config, stopper)))


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
      from xlingo.data import pairs

      metrics.console(f"{pair}: no validation pairs, so no BLEU/chrF "
                      f"({pairs.no_pairs_hint(config.data.source, pair)})")
      continue
    src, tgt = pair.split("-")
    out[pair] = {name: scoring.translate_scores(
        lm, examples, src, tgt, max_examples=int(config.adapt.bleu_examples),
        max_new=int(config.adapt.max_decode_len)) for name, lm in models.items()}
  return out


def _abstract_params(config):
  model = decoder_lib.Decoder(config.model, peft.spec_from_config(config))
  return nn.unbox(sharding.abstract_params(model, config.model, 8))


def parameter_counts(config) -> dict:
  """{'params', 'trained_params'} of the adapted model (from shapes alone)."""
  abstract = _abstract_params(config)
  return {"params": state_lib.param_count(abstract),
          "trained_params": state_lib.param_count(
              state_lib.trained_params(abstract, config.train.trainable))}


def trained_line(config) -> str:
  """The start-up line saying what adapt.mode trains: the trained parameters' names (the last
  part of their paths), how many of the model's, and the train.trainable regex behind them."""
  abstract = _abstract_params(config)
  trained = state_lib.trained_params(abstract, config.train.trainable)
  names = sorted({str(getattr(path[-1], "key", path[-1]))
                  for path, _ in jax.tree_util.tree_flatten_with_path(trained)[0]})
  n, total = state_lib.param_count(trained), state_lib.param_count(abstract)
  if n == total:
    return f"adapt.mode={config.adapt.mode}: trains every parameter ({total:,})"
  shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
  return (f"adapt.mode={config.adapt.mode}: trains {shown} ({n:,} of {total:,} parameters, "
          f"{100 * n / max(total, 1):.2f}%; train.trainable={config.train.trainable!r}); the "
          "rest is frozen")


class Report:
  """A hook factory: at the end of a finished run, the before/after bpb table, BLEU/chrF of
  greedy translations before and after, the merged export, and WORKDIR/adapt_report.json;
  ``result`` holds the report."""

  def __init__(self, config, stopper):
    self.config, self.stopper, self.result = config, stopper, None

  def __call__(self, env):
    from xlingo.training import hooks

    return hooks.Hook(0, lambda tick: self.write(env.workdir, env.last))

  def write(self, workdir: str, last: dict) -> None:
    config = self.config
    target = target_language(config)
    text, bpb = bpb_table(workdir, config.data.languages, target)
    if text:
      metrics.console(text)
    report = {"metrics": last, "bpb": bpb, "target": target, "mode": config.adapt.mode,
              "best_step": self.stopper.best_step, "translation": {},
              **parameter_counts(config)}
    want_bleu = bool(config.data.translation_pairs) and config.adapt.bleu_examples > 0
    if (want_bleu or config.adapt.export_merged) and paths.isdir(
        paths.join(workdir, layout.CHECKPOINTS)):
      # The run's last parameters, loaded as every tool loads them (no training plan, no
      # optimizer), and those it started from.
      after = load.load_model(config, workdir)
      if want_bleu:
        report["translation"] = self._translation(after)
      if config.adapt.export_merged:
        path = load.export_merged(after, config.adapt.export_merged)
        metrics.console(f"merged parameters written to {path} (usable as checkpoint.init_from)")
    if jax.process_index() == 0:
      paths.write_text(paths.join(workdir, layout.report_name("adapt")),
                       json.dumps(report, indent=1, default=float))
    self.result = report

  def _translation(self, after) -> dict:
    config = self.config
    before = load.load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                             mesh=after.mesh, rules=after.rules, model_from="config")
    out = translation_report(config, {"before": before, "after": after})
    for pair, r in out.items():
      metrics.console(
          f"{pair} greedy, {r['after']['examples']} validation pairs: BLEU "
          f"{r['before']['bleu']:.1f} -> {r['after']['bleu']:.1f}, chrF "
          f"{r['before']['chrf']:.1f} -> {r['after']['chrf']:.1f} "
          f"({r['after']['bleu_signature']})")
    return out


def run(config, workdir: str) -> dict:
  """Adapt, then report; returns {'metrics', 'bpb', 'translation', 'best_step', ...} (a run
  stopped by a signal: {'metrics'} only; the report comes when it finishes)."""
  # After the flags: the loop imports the data layer (seqio, TensorFlow), so a config error
  # is reported before that import.
  from xlingo.training import loop

  loop.adopt_init_from_model(config)  # before the objective is built from the config
  resolve_config(config)
  metrics.console(trained_line(config))
  recipe = make_recipe(config)
  last = loop.run(config, workdir, recipe)
  report = recipe.hooks[-1].result
  return report if report is not None else {"metrics": last}


def main(argv=None):
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  cli.exit_when_done(main)
