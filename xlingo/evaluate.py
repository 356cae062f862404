"""Evaluate checkpoints: per-language validation loss and bits per byte, translation BLEU/chrF,
and a zero-shot transfer matrix over several checkpoints.

  python -m xlingo.evaluate --config configs/tiny.py --workdir /tmp/xlingo_tiny \
      [--checkpoint STEP_DIR] [--output results.json] [--translate en-de,en-fr] \
      [--max_examples 50] [--checkpoints de=DIR1,ja=DIR2]
  python -m xlingo.evaluate --config configs/finetune_tiny.py --workdir FINETUNED \
      --task chapter [--split test] [--checkpoints en=DIR1,en_lora=DIR2]
  python -m xlingo.evaluate --config configs/tiny.py --workdir /tmp/xlingo_tiny \
      --multiple_choice chapter|translation [--lang de,fr] [--split test] [--limit N]

Validation uses exactly the loop's evaluation (``hooks.validator``: per-language bpb over
``inputs.validation_set``: ``train.eval_max_bytes`` bytes of whole lines per language, or with
-1 the first ``train.eval_batches`` batches; ``val/bytes/<lang>`` the bytes scored; then the evaluators of
the LM objective's terms, e.g. retrieval), so the numbers equal what training logged as val/* at
the same step. Translation greedily continues each source
sentence of the validation pairs in the target language (the source tokens carry the source
language id, as in the conditional training tasks) and scores the outputs with
``xlingo.scoring`` (sacrebleu BLEU and chrF, the one scorer adaptation's report uses too).
Checkpoints are loaded with ``xlingo.training.load.load_model`` (no training plan, no optimizer: the
model, language table and vocabulary come from the checkpoint); a workdir whose latest
checkpoint is unreadable falls back to the previous one. ``--output`` is checked before the
evaluation and the table is printed before it is written (and the JSON, if writing fails).
With ``--checkpoints LABEL=PATH,...`` every checkpoint is evaluated, and ``transfer`` holds the
matrix of val/bpb: one row per checkpoint (the language it was trained or adapted on), one
column per evaluated language.

``--split test`` scores the test split instead, which no training or model selection reads:
the same per-language bpb over each language's test lines (``test/loss``, ``test/bpb/<lang>``,
``test/bytes/<lang>``, and ``test/retrieval/*`` on the test pairs), and translation on the test
pairs. The embedded corpus has a test split for every language and pair
(``xlingo/data/corpus/SOURCES.md``); a user's files get one from ``data.file_test_patterns``
and ``data.file_pair_test_patterns``.

With ``--task`` (workdirs of ``python -m xlingo.finetune``), the zero-shot transfer table of
task accuracy on ``--split`` instead: one row per workdir, its best checkpoint read as its
metadata's ``finetune`` settings say; with ``--split test`` the numbers its run reported
(``task_transfer``).
``--multiple_choice chapter|translation`` scores the multiple-choice items of the embedded data
(``xlingo.multiple_choice``: the chapter of a paragraph, the right translation among 4) by
continuation log-likelihood and prints acc / acc_norm per language: the same items, prompt and
scorer as the lm-evaluation-harness tasks ``xlingo_chapter_<lang>`` and
``xlingo_translation_en-<x>`` (``python -m xlingo.lm_eval``), so the numbers are equal.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from xlingo import scoring
from xlingo.errors import ConfigError

# --- pieces ---------------------------------------------------------------------------------


def validation_batches(lm, split: str = "validation") -> tuple[dict[str, list], object]:
  """Each language's fixed validation (or ``split``) batches, as the training loop evaluates
  them, for the languages of the loaded model's table, and the input plan they come from. Only the validation data is read (no training plan);
  when the config's data source cannot be registered here (its files are not on this machine),
  validation is skipped with a note."""
  from xlingo.data import inputs, pairs
  from xlingo.errors import DataError

  cfg = lm.config
  try:
    reg = inputs.register_tasks(cfg.data, lm.vocab, lm.vocab_path)
  except DataError as e:
    print(f"xlingo: no validation data here ({str(e).splitlines()[0]}); validation metrics "
          "skipped", flush=True)
    return {}, None
  plan = inputs.InputPlan(
      table=lm.table, vocab=lm.vocab, vocab_path=lm.vocab_path, lm_tasks={}, mt_tasks={},
      stats=[], rates={}, mixture="", seq_len=cfg.data.seq_len,
      eval_tasks={lang: reg.lm[lang] for lang in lm.table.codes if lang in reg.lm},
      pair_tasks=pairs.pair_tasks(cfg, reg.mt, lm.table), source=cfg.data.source)
  batches = {lang: inputs.validation_set(plan, cfg, lang, split) for lang in plan.eval_tasks}
  missing = [lang for lang, b in batches.items() if not b]
  if split != "validation" and missing:
    print(f"xlingo: no {split} text for {', '.join(missing)}, so no {split}/bpb for "
          f"{'it' if len(missing) == 1 else 'them'}"
          + (" (data.file_test_patterns)" if cfg.data.source == "files" else ""), flush=True)
  return {lang: b for lang, b in batches.items() if b}, plan


def validation_metrics(lm, split: str = "validation") -> dict:
  """val/loss[/<lang>] and val/bpb[/<lang>] as the training loop computes them, and
  val/retrieval/* for the config's train.contrastive.pairs; with ``split="test"`` the same
  over the test split, named test/*."""
  from xlingo import sharding
  from xlingo.training import hooks, step

  val_batches, plan = validation_batches(lm, split)
  if not val_batches:
    return {}
  codes = lm.table.codes
  objective = step.lm_objective(lm.config, lm.model)
  eval_step = jax.jit(step.make_eval_step(objective, lm.byte_table, len(codes)))
  env = hooks.EvalEnv(plan, lm.mesh, sharding.batch_sharding(lm.mesh), split)
  step.check_objective_mesh(lm.config, lm.mesh)
  with sharding.mesh_context(lm.mesh, lm.rules):
    metrics = hooks.validator(objective, eval_step, val_batches, codes, env, {})(lm.params)
  prefix = metric_prefix(split)
  return {prefix + k[len("val/"):] if k.startswith("val/") else k: v for k, v in metrics.items()}


def metric_prefix(split: str) -> str:
  """"val/" for the validation split, "test/" for the test split."""
  return "val/" if split == "validation" else f"{split}/"


def translation_pairs(config, pairs: list[str], tsv: dict[str, str],
                      split: str = "validation") -> dict[str, list]:
  """{"src-tgt": [(source, reference)]} from --translate_tsv files, else ``split`` of the
  config's pair files or of the embedded corpus."""
  from xlingo.data import pairs as pairs_lib

  out = {}
  for pair in pairs:
    out[pair] = scoring.validation_pairs(config, pair, tsv, split)
    if not out[pair]:
      raise ConfigError(f"--translate {pair}: no {split} pairs; "
                        f"{pairs_lib.no_pairs_hint(config.data.source, pair, split)}, or pass "
                        f"--translate_tsv {pair}=FILE.tsv (source<TAB>target lines)")
  return out


def evaluate_checkpoint(config, path: str, *, translate: dict | None = None,
                        max_examples: int = 50, mesh=None, rules=None,
                        what: str = "--workdir", split: str = "validation") -> dict:
  """Everything for one checkpoint: {"path", "step", "languages", "metrics", "translation"}."""
  from xlingo.training.load import load_model

  lm = load_model(config, path, what=what, mesh=mesh, rules=rules)
  result = {"path": lm.step_dir, "step": lm.step, "languages": list(lm.table.codes),
            "metrics": validation_metrics(lm, split)}
  if translate:
    result["translation"] = {}
    for pair, examples in translate.items():
      src, tgt = pair.split("-")
      scores = scoring.translate_scores(lm, examples, src, tgt, max_examples=max_examples)
      result["translation"][pair] = scores
      result["metrics"][f"translate/{pair}/bleu"] = scores["bleu"]
      result["metrics"][f"translate/{pair}/chrf"] = scores["chrf"]
  return result


def transfer_matrix(results: dict, codes, metric: str = "val/bpb") -> dict:
  """Rows: the checkpoints (trained-on labels); columns: evaluated languages."""
  rows = list(results)
  cols = [c for c in codes if any(f"{metric}/{c}" in r["metrics"] for r in results.values())]
  values = [[results[r]["metrics"].get(f"{metric}/{c}", float("nan")) for c in cols]
            for r in rows]
  return {"metric": metric, "rows": rows, "cols": cols, "values": values}


def format_table(report: dict, codes) -> str:
  """Plain-text table: one row per checkpoint, val bpb per language, then translation scores."""
  results = report["results"]
  held = report.get("split", "validation")
  v = metric_prefix(held)
  langs = [c for c in codes if any(f"{v}bpb/{c}" in r["metrics"] for r in results.values())]
  pairs = sorted({k.split("/")[1] for r in results.values() for k in r["metrics"]
                  if k.startswith("translate/")})
  head = ["checkpoint", "step", "bpb"] + langs + [f"{p} BLEU/chrF" for p in pairs]
  lines = []
  for label, r in results.items():
    m = r["metrics"]
    step = "-" if r["step"] is None else str(r["step"])
    cells = [label, step, _f(m.get(f"{v}bpb"))] + [_f(m.get(f"{v}bpb/{c}")) for c in langs]
    cells += [f"{m[f'translate/{p}/bleu']:.1f}/{m[f'translate/{p}/chrf']:.1f}"
              if f"translate/{p}/bleu" in m else "-" for p in pairs]
    lines.append(cells)
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  split = report.get("translate_split", "validation")
  out = [f"{held} bits per byte" + (", translation BLEU/chrF" if pairs else "")
         + (f" ({split} pairs)" if pairs and split != held else ""),
         fmt(head)] + [fmt(c) for c in lines]
  scored = sorted({" ".join(f"{c} {r['metrics'][f'{v}bytes/{c}']:,}" for c in langs
                            if f"{v}bytes/{c}" in r["metrics"]) for r in results.values()})
  out += [f"bytes scored: {s}" for s in scored if s]
  out += sorted({f"sacrebleu: BLEU {t['bleu_signature']}; chrF {t['chrf_signature']}"
                 for r in results.values() for t in r.get("translation", {}).values()})
  if "transfer" in report:
    t = report["transfer"]
    out.append("")
    out.append(f"zero-shot transfer ({t['metric']}; rows: checkpoint, columns: evaluated on)")
    w = max(len(r) for r in t["rows"] + ["trained"])
    out.append("trained".ljust(w) + "  " + "  ".join(c.rjust(6) for c in t["cols"]))
    for r, vals in zip(t["rows"], t["values"]):
      out.append(r.ljust(w) + "  " + "  ".join(_f(v).rjust(6) for v in vals))
  return "\n".join(out)


def _f(v) -> str:
  return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def check_output(output: str) -> None:
  """ConfigError before anything is evaluated when ``output`` cannot be written."""
  from xlingo import paths

  try:
    paths.check_writable(output)
  except OSError as e:
    raise ConfigError(f"--output {output!r} cannot be written ({e.strerror or e}); choose "
                      "another path") from None


def write_report(output: str, report: dict) -> None:
  from xlingo import paths

  try:
    paths.write_text(output, json.dumps(report, indent=1, ensure_ascii=False, default=float))
  except OSError as e:
    raise ConfigError(f"--output {output!r} could not be written ({e.strerror or e}); the "
                      "results were printed above") from None


def run(config, checkpoints: dict[str, str], *, translate_pairs=(), translate_tsv=None,
        max_examples: int = 50, output: str | None = None, what: str = "--checkpoints",
        split: str = "validation") -> dict:
  """Evaluate each labelled checkpoint; write JSON to ``output`` (process 0) and return it.

  ``output`` is checked before anything is evaluated. No training plan is built: each
  checkpoint is loaded with ``xlingo.training.load.load_model``.
  """
  from xlingo import sharding

  if output:
    check_output(output)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  translate = translation_pairs(config, list(translate_pairs), translate_tsv or {}, split) \
      if translate_pairs else None
  results = {label: evaluate_checkpoint(config, path, translate=translate,
                                        max_examples=max_examples, mesh=mesh, rules=rules,
                                        what=what, split=split)
             for label, path in checkpoints.items()}
  codes = list(dict.fromkeys([*config.data.languages,
                              *(c for r in results.values() for c in r["languages"])]))
  report = {"config_languages": codes, "results": results, "split": split}
  if translate:
    report["translate_split"] = split
  if len(results) > 1:
    report["transfer"] = transfer_matrix(results, codes, f"{metric_prefix(split)}bpb")
  if output and jax.process_index() == 0:
    write_report(output, report)
  return report


# --- task transfer (python -m xlingo.finetune workdirs) --------------------------------------


def task_transfer(config, checkpoints: dict[str, str], task: str = "",
                  split: str = "test") -> dict:
  """The zero-shot transfer table of fine-tuned workdirs: one row per workdir (its training
  languages; the label given when several share them), the accuracy of its best checkpoint
  (WORKDIR/best, as ``python -m xlingo.finetune`` reports it) on ``split`` of every language of
  ``task`` (empty: the task it was fine-tuned on), read as its checkpoint's metadata says (head,
  prompt, max_len)."""
  from xlingo import paths
  from xlingo.data import task_batches
  from xlingo.training import layout, load
  from xlingo.training import task as task_lib

  rows, codes = {}, []
  for label, path in checkpoints.items():
    best = paths.join(path, layout.BEST)
    lm = load.load_model(config, best if paths.isdir(best) else path, what="--workdir")
    settings = lm.meta.get("finetune")
    if not settings:
      raise ConfigError(f"{lm.step_dir} is not a fine-tuned checkpoint (its metadata has no "
                        "finetune settings); give the workdir of a python -m xlingo.finetune run")
    data = task_batches.load_task(task or settings["task"], settings["train_languages"],
                                  order=tuple(lm.table.codes), splits=(split,))
    r = task_lib.evaluate_loaded(lm, data, (split,), settings,
                                 int(config.train.batch_size))[split]
    name = "+".join(data.train_languages)
    name = label if len(checkpoints) > 1 and label != paths.basename(path) else name
    if name in rows:
      name = f"{name} ({label})"
    rows[name] = task_lib.transfer_row(data.train_languages, r["acc"]) | {
        "examples": r["examples"], "checkpoint": lm.step_dir, "step": lm.step,
        "head": settings["head"], "task": data.task}
    codes += [c for c in data.eval_languages if c not in codes]
  return {"task": task or None, "split": split, "languages": codes, "rows": rows}


def format_task_transfer(report: dict) -> str:
  from xlingo.training import task as task_lib

  tasks = sorted({r["task"] for r in report["rows"].values()})
  return task_lib.format_transfer(
      report["rows"], report["languages"],
      f"{report['split']} accuracy (%), task {', '.join(tasks)}; rows: training languages; "
      "gap: minus the training language(s)")


def multiple_choice_report(config, path: str, name: str, langs, *, split: str, limit: int,
                           what: str = "--workdir") -> dict:
  """``--multiple_choice``: per-language acc / acc_norm and per-item log-likelihoods."""
  from xlingo import multiple_choice
  from xlingo.training.load import load_model

  multiple_choice.check_name(name)
  lm = load_model(config, path, what=what)
  results = multiple_choice.evaluate(lm, name, langs, split, limit=limit)
  return {"path": lm.step_dir, "step": lm.step, "multiple_choice": name, "split": split,
          "results": results}


# --- command line ---------------------------------------------------------------------------


def _parse_map(value: str, flag: str) -> dict[str, str]:
  out = {}
  for item in filter(None, (x.strip() for x in (value or "").split(","))):
    if "=" not in item:
      raise ConfigError(f"{flag}: {item!r} is not LABEL=PATH")
    k, v = item.split("=", 1)
    out[k.strip()] = v.strip()
  return out


def _define_flags(fl) -> None:
  from absl import flags

  flags.DEFINE_string("checkpoints", None, "LABEL=PATH,... for a transfer matrix.",
                      flag_values=fl)
  flags.DEFINE_string("output", None, "Write the results as JSON here.", flag_values=fl)
  flags.DEFINE_string("translate", "", "Pairs to translate, e.g. en-de,en-fr.", flag_values=fl)
  flags.DEFINE_string("translate_tsv", "", "PAIR=FILE.tsv,... (source<TAB>reference).",
                      flag_values=fl)
  flags.DEFINE_integer("max_examples", 50, "Translation pairs per direction.", flag_values=fl)
  flags.DEFINE_string("task", None, "With fine-tuned workdirs (python -m xlingo.finetune): "
                      "the zero-shot transfer table of accuracy on this labelled task ('' or "
                      "'auto': the one each was fine-tuned on), on --split (--split test: "
                      "the table the run reported).", flag_values=fl)
  flags.DEFINE_enum("split", "validation", ["validation", "test"],
                    "Which held-out split is scored: the per-language bpb (test: the embedded "
                    "corpus's test split, or data.file_test_patterns) and the pairs --translate "
                    "scores (data.file_pair_val_patterns or data.file_pair_test_patterns; "
                    "--translate_tsv overrides).", flag_values=fl)
  flags.DEFINE_string("multiple_choice", None, "chapter | translation: multiple-choice accuracy "
                      "per language (xlingo.multiple_choice; the lm-eval tasks' items).",
                      flag_values=fl)
  flags.DEFINE_string("lang", "", "--multiple_choice: languages (comma-separated; default: all "
                      "with items).", flag_values=fl)
  flags.DEFINE_integer("limit", 0, "--multiple_choice: the first N items per language (0: all; "
                       "lm-eval's --limit).", flag_values=fl)


def main(argv=None):
  from xlingo import cli

  def body(fl):
    from xlingo import paths

    if fl.max_examples < 1:
      raise ConfigError(f"--max_examples={fl.max_examples} must be >= 1 (translation pairs per "
                        "direction)")
    ckpts = _parse_map(fl.checkpoints, "--checkpoints")
    what = "--checkpoints"
    if not ckpts:
      path, what = cli.tool_checkpoint(fl)
      if not path:
        raise ConfigError("give --workdir DIR, --checkpoint STEP_DIR or --checkpoints L=DIR,...")
      ckpts = {paths.basename(path) or "model": path}
    if fl.task is not None:
      _task_main(fl, ckpts)
      return
    if fl.output:
      check_output(fl.output)
    if fl.multiple_choice:
      from xlingo import multiple_choice

      multiple_choice.check_name(fl.multiple_choice)
      if fl.limit < 0:
        raise ConfigError(f"--limit={fl.limit} must be >= 0 (0: every item)")
      path, what = cli.tool_checkpoint(fl)
      if not path:
        raise ConfigError("--multiple_choice needs --workdir DIR or --checkpoint STEP_DIR")
      langs = [x.strip() for x in fl.lang.split(",") if x.strip()]
      report = multiple_choice_report(fl.config, path, fl.multiple_choice, langs,
                                      split=fl.split, limit=fl.limit, what=what)
      if jax.process_index() == 0:
        print(multiple_choice.format_table(fl.multiple_choice, report["results"], fl.split),
              flush=True)
        if fl.output:
          write_report(fl.output, report)
          print(f"results: {fl.output}", flush=True)
      return
    pairs = [p.strip() for p in fl.translate.split(",") if p.strip()]
    report = run(fl.config, ckpts, translate_pairs=pairs,
                 translate_tsv=_parse_map(fl.translate_tsv, "--translate_tsv"),
                 max_examples=fl.max_examples, what=what, split=fl.split)
    if jax.process_index() == 0:
      print(format_table(report, report["config_languages"]), flush=True)
      if fl.output:
        try:
          write_report(fl.output, report)
        except ConfigError:
          # The evaluation is not lost: the whole report goes to stdout before the error.
          print(json.dumps(report, indent=1, ensure_ascii=False, default=float), flush=True)
          raise
        print(f"results: {fl.output}", flush=True)

  cli.run_tool(argv, __doc__, _define_flags, body)


def _task_main(fl, ckpts: dict[str, str]) -> None:
  """``--task``: the transfer table of fine-tuned workdirs."""
  task = "" if fl.task in ("", "auto") else fl.task
  if fl.output:
    check_output(fl.output)
  report = task_transfer(fl.config, ckpts, task, fl.split)
  if jax.process_index() == 0:
    print(format_task_transfer(report), flush=True)
    if fl.output:
      write_report(fl.output, report)
      print(f"results: {fl.output}", flush=True)


if __name__ == "__main__":
  from xlingo import cli

  cli.exit_when_done(main)
