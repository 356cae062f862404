"""Golden fixture for the lm-evaluation-harness adaptor, computed by lm-eval itself.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=$PWD \\
      /work/venv-lmeval/bin/python bench/make_lm_eval_fixtures.py \\
      [--out tests/fixtures/lm_eval/tiny_random.json] [--limit 8]

Needs the ``eval`` extra (lm-eval). Builds the tiny deterministic checkpoint of
:func:`build_checkpoint` (configs/tiny.py's model at ``MAX_LEN`` tokens, float32, initialised
from ``SEED``; no training, so it is the same bit for bit on every machine that initialises the
same way), runs lm-eval's own evaluator (``lm_eval.simple_evaluate``, ``log_samples``) with the
``xlingo`` model on the shipped tasks ``xlingo_chapter`` and ``xlingo_translation`` (``--limit``
items of each language's test split, spread evenly over it with lm-eval's ``samples``: the
chapter files are in chapter order, so the first items would all be one class), and writes,
per task, lm-eval's per-item log-likelihoods (in choice order), gold and doc ids, and its
acc / acc_norm.
tests/test_lm_eval_adapter.py rebuilds the checkpoint and checks that ``evaluate
--multiple_choice`` gives the same numbers without lm-eval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261207
MAX_LEN = 256
LIMIT = 8
TASKS = ("xlingo_chapter", "xlingo_translation")


def tiny_config():
  sys.path.insert(0, ROOT)
  from configs import tiny

  cfg = tiny.get_config()
  cfg.model.max_len = MAX_LEN
  return cfg


def build_checkpoint(out_dir: str) -> str:
  """configs/tiny.py's model at MAX_LEN, initialised from SEED, exported as a step directory
  that every tool loads (``checkpoints.export_params``)."""
  import jax

  from xlingo import sharding
  from xlingo.model import decoder as decoder_lib
  from xlingo.training import checkpoints

  cfg = tiny_config()
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
  model = decoder_lib.Decoder(cfg.model)
  params = sharding.init_params(model, cfg.model, mesh, rules, jax.random.PRNGKey(SEED), 8)
  return checkpoints.export_params(out_dir, params, cfg, 0)


def task_names(tasks=TASKS) -> list[str]:
  """The lm-eval tasks of ``tasks`` (the groups expanded)."""
  from xlingo import multiple_choice

  out = []
  for t in tasks:
    if t == "xlingo_chapter":
      out += [f"xlingo_chapter_{x}" for x in multiple_choice.languages("chapter", "test")]
    elif t == "xlingo_translation":
      out += [f"xlingo_translation_en-{x}"
              for x in multiple_choice.languages("translation", "test")]
    else:
      out.append(t)
  return out


def spread(task: str, k: int) -> list[int]:
  """``k`` item indices spread evenly over the test items of an xlingo task."""
  from xlingo import multiple_choice

  name, lang = task[len("xlingo_"):].split("_", 1)
  n = len(multiple_choice.items(name, lang.removeprefix("en-"), "test"))
  return sorted({(i * n) // k for i in range(min(k, n))})


def lm_eval_results(step_dir: str, per_task: int, tasks=TASKS, metadata=None) -> dict:
  """lm-eval's own numbers: {task: {"acc", "acc_norm", "items": [{"doc_id", "logprobs",
  "gold"}]}} for the xlingo model on ``per_task`` items (:func:`spread`) of ``tasks``."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from xlingo import lm_eval_adapter

  names = task_names(tasks)

  config_path = os.path.join(ROOT, "configs", "tiny.py")
  out = lm_eval.simple_evaluate(
      model="xlingo", model_args=f"checkpoint={step_dir},config={config_path},"
      f"max_length={MAX_LEN}", tasks=names, samples={t: spread(t, per_task) for t in names},
      log_samples=True,
      batch_size=16, task_manager=TaskManager(include_path=lm_eval_adapter.TASKS_DIR,
                                              metadata=metadata or {}),
      metadata=metadata)
  results = {}
  for task, samples in out["samples"].items():
    rows = sorted(samples, key=lambda s: s["doc_id"])
    results[task] = {
        "acc": out["results"][task]["acc,none"],
        "acc_norm": out["results"][task]["acc_norm,none"],
        "items": [{"doc_id": s["doc_id"], "gold": s["target"],
                   "logprobs": [float(r[0][0]) for r in s["resps"]]} for s in rows]}
  return results


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "lm_eval",
                                                "tiny_random.json"))
  ap.add_argument("--limit", type=int, default=LIMIT, help="items per task")
  ap.add_argument("--workdir", default="/tmp/xlingo_lm_eval_fixture")
  args = ap.parse_args()
  import lm_eval

  step_dir = build_checkpoint(os.path.join(args.workdir, "tiny_random"))
  results = lm_eval_results(step_dir, args.limit)
  fixture = {"lm_eval_version": lm_eval.__version__, "seed": SEED, "max_len": MAX_LEN,
             "limit": args.limit, "tasks": results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(fixture, f, indent=1, sort_keys=True)
  for task, r in sorted(results.items()):
    print(f"{task:<28} acc {r['acc']:.3f}  acc_norm {r['acc_norm']:.3f}  n {len(r['items'])}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
