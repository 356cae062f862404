"""Task fine-tuning of a pretrained LM on one language's labelled data, measured zero-shot in all.

  python -m xlingo.finetune --config configs/finetune_tiny.py --workdir workdirs/ft \
      --config.checkpoint.init_from=workdirs/lm [--config.finetune.head=verbalizer] \
      [--config.adapt.mode=lora] [--config.finetune.train_languages="('en','de')"]

The task (``finetune.task``: an embedded one such as ``chapter``, or a directory in the layout
of ``xlingo/data/labelled.py``) is learned from the train split of ``finetune.train_languages``
with a head (``finetune.head``; xlingo/training/task.py): ``classifier``, a linear head on the
pooled hidden states, or ``verbalizer``, the LM scoring each label's name as the continuation of
the text. Every example's tokens carry its language's id, so an example in X is read with X's
language embedding, zero-shot too. ``adapt.mode`` says what else trains, as in
``python -m xlingo.adapt`` (full, freeze, lora, adapter, prefix, lang_emb); the classifier's
head always trains.

Every ``train.eval_every`` steps: ``val/acc/<lang>`` for every evaluated language
(``finetune.eval_languages``, empty: all of the task's), and ``val/task_error``, 1 - the mean
validation accuracy of the training languages, which alone chooses WORKDIR/best and stops the
run after ``finetune.patience`` evaluations without improvement (the other languages stay
zero-shot: they are reported, never chosen on). At the end the best checkpoint is scored on
every language's test split: ``test/acc/<lang>`` in metrics.jsonl, the zero-shot transfer table
(rows: training languages, columns: every language, and the gap to the training languages) on
the console and WORKDIR/finetune_report.json (fields in README, "Cross-lingual task transfer").
``python -m xlingo.evaluate --workdir W [--workdir ...] --task chapter`` prints the same table.
Resume, SIGTERM and metrics are the loop's.
"""

from __future__ import annotations

import json
import sys

import jax

from xlingo import cli, paths
from xlingo.data import task_batches
from xlingo.errors import ConfigError
from xlingo.model import peft

MODES = ("full", "freeze", "lora", "adapter", "prefix", "lang_emb")
REPORT = "finetune_report.json"


# --- config ---------------------------------------------------------------------------------


def check_config(config) -> None:
  """One line for a setting that cannot work, before any data is read."""
  if "finetune" not in config:
    raise ConfigError("the config has no 'finetune' section; start from "
                      "configs/finetune_tiny.py or set c.finetune = "
                      "xlingo.config.finetune_section() in get_config")
  f = config.finetune
  if not config.checkpoint.init_from:
    raise ConfigError("fine-tuning starts from a pretrained model: set "
                      "--config.checkpoint.init_from=WORKDIR_OF_AN_LM_RUN (or a step directory)")
  if f.head not in task_batches.HEADS:
    raise ConfigError(f"finetune.head={f.head!r} is unknown; use one of "
                      f"{', '.join(task_batches.HEADS)}")
  from xlingo.training import task

  for key, allowed in (("pool", task.POOLS), ("verbalizer_norm", task.NORMS),
                       ("verbalizer_names", ("same", "en"))):
    if f[key] not in allowed:
      raise ConfigError(f"finetune.{key}={f[key]!r} is unknown; use one of {', '.join(allowed)}")
  if f.patience < 0:
    raise ConfigError(f"finetune.patience={f.patience} must be >= 0 (0: never stop early)")
  if not 2 <= f.max_len <= config.model.max_len:
    raise ConfigError(f"finetune.max_len={f.max_len} must be in [2, model.max_len="
                      f"{config.model.max_len}]")
  mode = config.adapt.mode if "adapt" in config else "full"
  if mode not in MODES:
    raise ConfigError(f"adapt.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
  if mode == "lang_emb" and not config.model.use_lang_emb:
    raise ConfigError("adapt.mode='lang_emb' needs model.use_lang_emb=True")
  peft.spec_from_config(config)
  for lang in tuple(f.train_languages) + tuple(f.eval_languages):
    if lang not in config.data.languages:
      raise ConfigError(f"language {lang!r} (finetune.train_languages/eval_languages) is not "
                        f"in data.languages={tuple(config.data.languages)}, the model's "
                        "language table")


def load_data(config) -> task_batches.TaskData:
  f = config.finetune
  return task_batches.load_task(f.task, f.train_languages, f.eval_languages,
                                order=tuple(config.data.languages))


def resolve_config(config, data: task_batches.TaskData) -> None:
  """The finetune and adapt sections turned into what the loop reads (in place): the head's
  classes (``model.task_classes``) and what trains (``train.trainable``)."""
  f = config.finetune
  config.model.task_classes = len(data.labels.labels) if f.head == "classifier" else 0
  config.data.seq_len = int(f.max_len)  # the rows of the task's batches
  mode = config.adapt.mode if "adapt" in config else "full"
  if mode == "full":
    config.train.trainable = ".*"
  elif mode in peft.TRAINABLE:
    config.train.trainable = peft.TRAINABLE[mode]
  elif mode == "lang_emb":
    config.train.trainable = r"^lang_embedding$"
  elif config.train.trainable in (".*", ""):
    raise ConfigError("adapt.mode='freeze' needs train.trainable, a regex over parameter paths "
                      "(e.g. 'blocks/layers/mlp/' or 'final_norm')")
  if f.head == "classifier" and config.train.trainable != ".*":
    config.train.trainable = f"(?:{config.train.trainable})|^task_(kernel|bias)$"


def check_vocabulary(config, data) -> None:
  """Label names that encode to nothing and a max_len without room: one line, before the run."""
  from xlingo.data import vocabulary

  _, vocab = vocabulary.load_configured(config.data, config.model.vocab_size)
  task_batches.Encoder.build(vocab, tuple(config.data.languages), data.labels,
                             config.finetune.to_dict(),
                             tuple(dict.fromkeys(data.train_languages + data.eval_languages)))


# --- objective ------------------------------------------------------------------------------


def make_recipe(config, data: task_batches.TaskData):
  from xlingo.training import hooks, metrics, step, task, terms

  made: dict = {}

  def encoder(setup):
    if "encoder" not in made:
      langs = tuple(dict.fromkeys(data.train_languages + data.eval_languages))
      made["encoder"] = task_batches.Encoder.build(
          setup.plan.vocab, tuple(setup.plan.table.codes), data.labels,
          config.finetune.to_dict(), langs)
    return made["encoder"]

  def train_iterator(cfg, setup):
    enc = encoder(setup)
    rows = task_batches.concat([enc.encode(setup.plan.vocab, ex, lang)
                                for lang, ex in data.train.items()])
    n = len(rows["task_labels"])
    b = int(cfg.train.batch_size)
    summary = (f"finetune: task {data.task!r}, {len(data.labels.labels)} classes, head "
               f"{cfg.finetune.head}; {n} training examples in "
               f"{', '.join(data.train_languages)} ({n // b} steps an epoch at batch {b}); "
               f"evaluated on {', '.join(data.eval_languages)}")
    return task_batches.TaskIterator(rows, b, cfg.data.seed, summary)

  def build(cfg, setup):
    enc = encoder(setup)
    b = int(cfg.train.batch_size)
    val = {lang: task_batches.eval_batches(enc.encode(setup.plan.vocab, ex, lang), b)
           for lang, ex in data.validation.items()}
    term = task.TaskLoss(task.Settings.from_dict(cfg.finetune.to_dict(), enc, b), setup.model,
                         val, tuple(data.train_languages))
    return step.Objective("finetune", setup.model, terms.Hints.from_config(cfg), (term,))

  for note in data.notes:
    metrics.console(note)
  stopper = hooks.EarlyStopping(task.SELECT_KEY, int(config.finetune.patience))
  return step.Recipe("finetune", build, None, hooks=(stopper, Report(config, data, stopper)),
                     train_iterator=train_iterator)


# --- report ---------------------------------------------------------------------------------


class Report:
  """A hook factory: at the end of a finished run, the best checkpoint (WORKDIR/best, chosen on
  the training languages' validation accuracy) scored on every language's test split:
  ``test/acc/<lang>`` in the metrics, the transfer table, WORKDIR/finetune_report.json;
  ``result`` holds the report."""

  def __init__(self, config, data, stopper):
    self.config, self.data, self.stopper, self.result = config, data, stopper, None

  def __call__(self, env):
    from xlingo.training import hooks

    return hooks.Hook(0, lambda tick: self.write(env, tick.step))

  def write(self, env, step: int) -> None:
    from xlingo.training import layout, load, metrics, task

    config, data = self.config, self.data
    best = paths.join(env.workdir, layout.BEST)
    path = best if paths.isdir(best) else env.workdir
    lm = load.load_model(config, path, what="the best checkpoint")
    settings = config.finetune.to_dict()
    b = int(config.train.batch_size)
    scored = task.evaluate_loaded(lm, data, ("validation", "test"), settings, b)
    val, test = scored["validation"], scored["test"]
    scalars = {f"test/acc/{k}": v for k, v in test["acc"].items()}
    env.writer.write(step, scalars)
    env.last.update(scalars)
    label = "+".join(data.train_languages)
    row = task.transfer_row(data.train_languages, test["acc"])
    metrics.console(task.format_transfer(
        {label: row}, data.eval_languages,
        f"test accuracy (%), task {data.task!r}, head {config.finetune.head}, best step "
        f"{lm.step} (chosen on {label} validation); gap: minus the training language(s)"))
    report = {
        "task": data.task, "head": config.finetune.head,
        "mode": config.adapt.mode if "adapt" in config else "full",
        "train_languages": list(data.train_languages),
        "eval_languages": list(data.eval_languages), "labels": list(data.labels.labels),
        "init_from": config.checkpoint.init_from, "seed": int(config.train.seed),
        "best_step": lm.step, "checkpoint": lm.step_dir,
        "val_acc": val["acc"], "test_acc": test["acc"], "test_examples": test["examples"],
        "val_examples": val["examples"], "transfer": row, "notes": list(data.notes),
        "settings": settings, "metrics": dict(env.last)}
    if jax.process_index() == 0:
      paths.write_text(paths.join(env.workdir, REPORT),
                       json.dumps(report, indent=1, default=float))
    self.result = report


def run(config, workdir: str) -> dict:
  """Fine-tune, then report; returns the report (a run stopped by a signal: {'metrics'})."""
  check_config(config)
  _check_init_from(config)
  data = load_data(config)
  from xlingo.training import loop

  loop.adopt_init_from_model(config)
  resolve_config(config, data)
  check_vocabulary(config, data)
  recipe = make_recipe(config, data)
  last = loop.run(config, workdir, recipe)
  report = recipe.hooks[-1].result
  return report if report is not None else {"metrics": last}


def _check_init_from(config) -> None:
  """A missing or unreadable init_from: one line before anything is built."""
  from xlingo.training import load

  load.newest_meta(config.checkpoint.init_from, "checkpoint.init_from")


def main(argv=None):
  cli.run_main(argv or sys.argv, __doc__, run)


if __name__ == "__main__":
  cli.exit_when_done(main)
