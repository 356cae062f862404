"""Language adaptation of a pretrained LM: continued LM and/or translation pairs, from init_from.

  python -m xlingo.adapt --config configs/adapt_tiny.py --workdir workdirs/adapt \
      --config.checkpoint.init_from=workdirs/lm [--config.adapt.mode=lora] [--config.KEY=VALUE]

Parameters come from ``checkpoint.init_from`` (the optimizer starts fresh); languages may be
appended to the checkpoint's (new language-embedding rows start fresh). ``adapt.mode`` says what
trains: ``full``, ``freeze`` (``train.trainable`` regex), ``lora`` (low-rank adapters on
``adapt.lora.targets``; xlingo.model.lora), ``lang_emb`` (only the language embeddings).
Against forgetting: ``adapt.l2_init_weight`` (L2 towards the initial weights),
``adapt.replay_ratio`` (that share of the mixture goes to the other languages) and
``adapt.early_stop_patience`` (evaluations without a better target bpb; WORKDIR/best keeps the
best). At the end: a before/after table of validation bpb for every language, and BLEU/chrF on
greedy translations of a few validation pairs for ``data.translation_pairs``; both are also in
WORKDIR/adapt_report.json. ``adapt.export_merged=DIR`` writes plain (LoRA-merged) parameters
that ``checkpoint.init_from=DIR`` or any tool loads. Resume, SIGTERM and metrics are the loop's.
"""

from __future__ import annotations

import json
import sys

import ml_collections

from xlingo import cli
from xlingo.errors import ConfigError

MODES = ("full", "freeze", "lora", "lang_emb")


def add_adapt_section(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``adapt`` config section with its defaults (configs/adapt_*.py call this)."""
  from xlingo.model import lora

  c.adapt = ml_collections.ConfigDict()
  c.adapt.mode = "full"  # full | freeze | lora | lang_emb
  c.adapt.target_language = ""  # early stopping and reports; empty: the first target
  c.adapt.l2_init_weight = 0.0  # lambda * ||theta - theta_0||^2 added to the mean loss
  c.adapt.replay_ratio = 0.0  # share of the mixture for the languages not adapted to
  c.adapt.early_stop_patience = 0  # evaluations without improvement; 0: never stop early
  c.adapt.bleu_examples = 8  # validation pairs translated greedily for BLEU/chrF
  c.adapt.max_decode_len = 32
  c.adapt.export_merged = ""  # directory for plain (LoRA-merged) params after training
  c.adapt.lora = ml_collections.ConfigDict()
  c.adapt.lora.rank = 8
  c.adapt.lora.alpha = 16.0
  c.adapt.lora.targets = lora.DEFAULT_TARGETS
  return c


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
                      "call xlingo.adapt.add_adapt_section(c) in get_config")
  a = config.adapt
  if not config.checkpoint.init_from:
    raise ConfigError("adaptation starts from a pretrained model: set "
                      "--config.checkpoint.init_from=WORKDIR_OF_AN_LM_RUN (or a step directory)")
  if a.mode not in MODES:
    raise ConfigError(f"adapt.mode={a.mode!r} is unknown; use one of {', '.join(MODES)}")
  if a.mode == "lang_emb" and not config.model.use_lang_emb:
    raise ConfigError("adapt.mode='lang_emb' needs model.use_lang_emb=True")
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

  ``adapt.mode`` becomes ``train.trainable``. (``adapt.replay_ratio`` is applied where the
  rates are made: xlingo.data.mixing.with_replay, from the data plan.)
  """
  check_config(config)
  a = config.adapt
  if a.mode == "full":
    config.train.trainable = ".*"
  elif a.mode == "lora":
    config.train.trainable = r"^lora/"
  elif a.mode == "lang_emb":
    config.train.trainable = r"^lang_embedding$"
  elif config.train.trainable in (".*", ""):
    raise ConfigError("adapt.mode='freeze' needs train.trainable, a regex over parameter paths "
                      "(e.g. 'blocks/layers/mlp/' or 'lang_embedding|final_norm')")


# --- objective ------------------------------------------------------------------------------


def _lora_extension(config):
  from xlingo.model import lora
  from xlingo.training import state as state_lib

  lora_cfg = config.adapt.lora

  class LoraExtension(state_lib.ParamExtension):
    def abstract(self, boxed_params):
      return {lora.KEY: lora.abstract_factors(boxed_params, lora_cfg)}

    def init(self, rng, abstract):
      return {lora.KEY: lora.init_factors(rng, abstract[lora.KEY])}

  return LoraExtension()


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
  import jax
  import jax.numpy as jnp

  from xlingo.model import lora
  from xlingo.training import step

  a = config.adapt
  use_lora = a.mode == "lora"
  l2 = float(a.l2_init_weight)

  def model_params(params):
    return lora.merge(params, a.lora) if use_lora else params

  def loss_fn(ctx, params, batch, rng, extra):
    p = model_params(params)
    # Targets-only loss on translation pairs comes from the batch: its loss_weights are 0 on
    # the source tokens, so the shared LM loss is already the conditional loss.
    total, aux = step.lm_loss(ctx, p, batch, rng, None)
    if l2 and extra:
      sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32) - x0.astype(jnp.float32)))
               for x, x0 in zip(jax.tree.leaves(p), jax.tree.leaves(extra["init"])))
      # The step divides the loss sum by the batch's weight: scale so that the mean loss
      # gains exactly l2 * ||theta - theta_0||^2 (also across microbatches).
      pen = l2 * sq * jnp.sum(batch["loss_weights"].astype(jnp.float32))
      total = total + pen
      aux["l2_init_sum"] = pen
    return total, aux

  def prepare_extra(cfg, mesh, rules):
    if not l2:
      return {}
    return {"init": load_init_params(cfg, mesh, rules)}

  stopper = EarlyStopping(f"val/bpb/{target_language(config)}", int(a.early_stop_patience))
  return step.Objective(
      name="adapt", loss_fn=loss_fn, prepare_extra=prepare_extra, check_config=check_config,
      on_eval=stopper.on_eval, should_stop=stopper.should_stop,
      param_extension=_lora_extension(config) if use_lora else None), stopper


def load_init_params(config, mesh, rules):
  """The init_from parameters as the run starts from them (new language rows included)."""
  from xlingo.load import load_model

  return load_model(config, config.checkpoint.init_from, what="checkpoint.init_from", mesh=mesh,
                    rules=rules, model_from="config").params


# --- reports --------------------------------------------------------------------------------


def bpb_table(workdir: str, languages, target: str) -> tuple[str, dict]:
  """Before (step 0) / after (last evaluation) validation bpb per language, from metrics.jsonl."""
  from xlingo import paths
  from xlingo.training import metrics

  rows = [r for r in metrics.read_jsonl(paths.join(workdir, "metrics.jsonl"))
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


def greedy_translate(model, params, sources, src_id: int, tgt_id: int, seq_len: int,
                     max_new: int, eos_id: int, mesh=None, rules=None) -> list[list[int]]:
  """Greedy decoding over the full forward pass (no KV cache: a few short examples).

  A row holds the packed prefix-LM layout of training: inputs = [0, source..., output...],
  and a position predicts the next token in the language of that token, so positions from the
  end of the source on carry the target language's id (which steers the output language).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from xlingo import sharding

  n = len(sources)
  b = -(-n // 8) * 8  # a multiple of the data-parallel sizes we run with
  inputs = np.zeros((b, seq_len), np.int32)
  langs = np.full((b, seq_len), tgt_id, np.int32)
  cur = np.zeros(b, np.int32)
  for i, src in enumerate(sources):
    src = list(src)[: max(seq_len - max_new - 1, 1)]
    inputs[i, 1:1 + len(src)] = src
    langs[i, :len(src)] = src_id
    cur[i] = len(src)

  @jax.jit
  def next_tokens(p, x, lang_ids, at):
    logits, _ = model.apply({"params": p}, x, None, None, lang_ids)
    return jnp.argmax(jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0], axis=-1)

  outs = [[] for _ in range(n)]
  done = np.zeros(b, bool)
  done[n:] = True
  ctx = sharding.mesh_context(mesh, rules) if mesh is not None else _nullcontext()
  with ctx:
    for _ in range(max_new):
      if done.all():
        break
      nxt = np.asarray(next_tokens(params, inputs, langs, cur))
      for i in range(n):
        if done[i]:
          continue
        tok = int(nxt[i])
        if tok == eos_id or cur[i] + 1 >= seq_len:
          done[i] = True
          continue
        outs[i].append(tok)
        inputs[i, cur[i] + 1] = tok
        cur[i] += 1
  return outs


def _nullcontext():
  import contextlib

  return contextlib.nullcontext()


def translation_scores(config, lm, params_by_name: dict, num: int) -> dict:
  """{pair: {name: {bleu, chrf}, 'examples': [...]}} on the first ``num`` validation pairs of
  ``data.translation_pairs``, decoded with ``lm``'s model (a ``load.LoadedModel``)."""
  import sacrebleu
  import seqio

  from xlingo.data import inputs

  out = {}
  vocab = lm.vocab
  table = lm.table
  registered = inputs.register_tasks(lm.config.data, vocab, lm.vocab_path).mt
  for pair in config.data.translation_pairs or ():
    task_name = registered[pair]
    src_lang, tgt_lang = pair.split("-")
    task = seqio.get_mixture_or_task(task_name)
    if "validation" not in task.splits:
      continue
    sources, refs = [], []
    for ex in inputs.task_examples(task_name, "validation", num, table, vocab):
      k = ex["prefix_len"]
      sources.append(ex["targets"][:k].tolist())
      refs.append(vocab.decode(ex["targets"][k:-1].tolist()))
    if not sources:
      continue
    tok = {"ja": "char", "zh": "zh"}.get(tgt_lang, "13a")
    res = {"examples": []}
    for name, params in params_by_name.items():
      ids = greedy_translate(lm.model, params, sources, table.id(src_lang),
                             table.id(tgt_lang), config.data.seq_len,
                             int(config.adapt.max_decode_len), vocab.eos_id,
                             lm.mesh, lm.rules)
      hyps = [vocab.decode(x) for x in ids]
      res[name] = {"bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=tok).score,
                   "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}
      res["examples"].append({"params": name, "source": vocab.decode(sources[0]),
                              "reference": refs[0], "output": hyps[0]})
    out[pair] = res
  return out


def export_merged(config, params, out_dir: str, step: int | None = None) -> str:
  """Writes plain params as a step directory that ``checkpoint.init_from`` and the tools load."""
  import orbax.checkpoint as ocp

  from xlingo import paths
  from xlingo.training import restore as restore_lib

  out_dir = paths.resolve(out_dir)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(paths.as_path(out_dir), args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}),
      meta=ocp.args.JsonSave(restore_lib.export_meta(config, step))), force=True)
  return out_dir


def run(config, workdir: str) -> dict:
  """Adapt, then report; returns {'metrics', 'bpb', 'translation', 'best_step'}."""
  import jax

  from xlingo import paths
  from xlingo.load import load_model
  from xlingo.training import loop, metrics

  resolve_config(config)
  objective, stopper = make_objective(config)
  last = loop.run(config, workdir, objective)
  target = target_language(config)
  text, bpb = bpb_table(workdir, config.data.languages, target)
  if text:
    metrics.console(text)
  report = {"metrics": last, "bpb": bpb, "target": target, "mode": config.adapt.mode,
            "best_step": stopper.best_step, "translation": {}}
  needs_params = bool(config.data.translation_pairs) or bool(config.adapt.export_merged)
  if needs_params and paths.isdir(paths.join(workdir, "checkpoints")):
    # The run's last parameters (LoRA merged) and the ones it started from, loaded without a
    # training plan or an optimizer.
    after = load_model(config, workdir)
    if config.data.translation_pairs and config.adapt.bleu_examples > 0:
      before = load_model(config, config.checkpoint.init_from, what="checkpoint.init_from",
                          mesh=after.mesh, rules=after.rules, model_from="config")
      scores = translation_scores(config, after, {"before": before.params, "after": after.params},
                                  int(config.adapt.bleu_examples))
      report["translation"] = scores
      for pair, r in scores.items():
        metrics.console(
            f"{pair} greedy, {config.adapt.bleu_examples} validation pairs: BLEU "
            f"{r['before']['bleu']:.1f} -> {r['after']['bleu']:.1f}, chrF "
            f"{r['before']['chrf']:.1f} -> {r['after']['chrf']:.1f}")
    if config.adapt.export_merged:
      path = export_merged(config, after.params, config.adapt.export_merged, after.step)
      metrics.console(f"merged parameters written to {path} (usable as checkpoint.init_from)")
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "adapt_report.json"),
                     json.dumps(report, indent=1, default=float))
  return report


def main(argv=None):
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  main()
