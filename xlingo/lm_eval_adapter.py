"""xlingo models in EleutherAI's lm-evaluation-harness (the optional extra ``eval``).

  python -m xlingo.lm_eval --model xlingo \\
      --model_args workdir=W[,config=configs/tiny.py,lang=auto,max_length=N,dtype=float32] \\
      --tasks xlingo_chapter,xlingo_translation [--batch_size 16] [--limit 8] [lm-eval flags]

This module is the only one in xlingo that imports ``lm_eval``; ``python -m xlingo.lm_eval``
(``xlingo/lm_eval.py``) imports it, registers the model as ``xlingo`` and adds the shipped
tasks (``xlingo/lm_eval_tasks``) to lm-eval's ``--include_path``. From Python, import this
module and call ``lm_eval.simple_evaluate(model="xlingo", ...)`` with a ``TaskManager`` whose
include path is :data:`TASKS_DIR`.

Model arguments:
  workdir / checkpoint  the run's workdir (its newest readable checkpoint) or a step directory.
  config      the config file the run was trained with (``FILE[:arg]``); its model.max_len,
              dtype and mesh are used (the model's shape, languages and vocabulary come from
              the checkpoint). Default: ``base_config()``.
  lang        ``auto`` (default): the languages an xlingo task's docs name (``context_lang``
              and ``choice_lang``, see ``xlingo.multiple_choice``), no language hint for any
              other task; ``none``: never a hint; a code of the checkpoint's languages: that
              language for every token.
  max_length  the model's context (``model.max_len``), default the config's.
  dtype       the compute dtype (``model.dtype``), default the config's.
  max_gen_toks  new tokens per ``generate_until`` request unless the task says (default 256).
  batch_size  lm-eval's ``--batch_size`` (rows scored together; rounded up to the mesh's
              data-parallel size; ``auto``: 16).

The three request types, all on the mesh the config describes:
  loglikelihood           ``xlingo.likelihood.score``: the continuation's summed log-probability
                          and is_greedy; a request longer than the context keeps its
                          continuation and the last tokens of its context (left truncation,
                          counted in a log line); a continuation longer than the context alone
                          is a one-line ConfigError.
  loglikelihood_rolling   the text's windows (``likelihood.rolling_requests``), summed.
  generate_until          ``xlingo.decode.generate_ids`` (the KV-cache decoder): greedy unless
                          the task asks for a temperature; cut at the first ``until`` string;
                          a prompt that leaves no room for ``max_gen_toks`` new tokens keeps
                          its last tokens (left truncation).
"""

from __future__ import annotations

import importlib.util
import os

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from xlingo import decode, likelihood
from xlingo.errors import ConfigError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
AUTO, NO_HINT = "auto", decode.NO_HINT
DEFAULT_BATCH = 16


def load_config(spec: str | None):
  """The ConfigDict of ``FILE[:arg]`` (a config file's ``get_config(arg)``), or base_config."""
  from xlingo import config as xconfig

  if not spec:
    return xconfig.base_config()
  path, _, arg = str(spec).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"model_args config={path!r} does not exist; give the config file the run "
                      "was trained with, e.g. config=configs/tiny.py")
  module_spec = importlib.util.spec_from_file_location("_xlingo_lm_eval_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


@register_model("xlingo")
class XlingoLM(LM):
  """An xlingo checkpoint as an lm-eval ``LM`` (module docstring)."""

  def __init__(self, workdir: str | None = None, checkpoint: str | None = None,
               config: str | None = None, lang: str = AUTO, max_length: int | None = None,
               dtype: str | None = None, max_gen_toks: int = 256, batch_size=DEFAULT_BATCH,
               max_batch_size=None, device=None, **unknown):
    super().__init__()
    from xlingo.training.load import load_model

    if unknown:
      raise ConfigError(f"unknown model_args {', '.join(sorted(unknown))}; the xlingo model "
                        "takes workdir, checkpoint, config, lang, max_length, dtype, max_gen_toks")
    if not (workdir or checkpoint):
      raise ConfigError("model_args needs workdir=DIR (its newest checkpoint) or "
                        "checkpoint=STEP_DIR")
    cfg = load_config(config)
    if max_length is not None:
      if int(max_length) < 2:
        raise ConfigError(f"model_args max_length={max_length} must be >= 2")
      cfg.model.max_len = int(max_length)
    if dtype is not None:
      cfg.model.dtype = str(dtype)
    if int(max_gen_toks) < 1:
      raise ConfigError(f"model_args max_gen_toks={max_gen_toks} must be >= 1")
    self.batch_size = DEFAULT_BATCH if batch_size in (None, "auto") or str(batch_size).startswith(
        "auto") else int(batch_size)
    if self.batch_size < 1:
      raise ConfigError(f"batch_size={batch_size} must be >= 1")
    self.max_gen_toks = int(max_gen_toks)
    what = "model_args checkpoint" if checkpoint else "model_args workdir"
    self.lm = load_model(cfg, checkpoint or workdir, what=what)
    codes = self.lm.table.codes
    self.lang = str(lang)
    if self.lang not in (AUTO, NO_HINT) and self.lang not in codes:
      raise ConfigError(f"model_args lang={self.lang} is not a language of {self.lm.step_dir} "
                        f"(it has {', '.join(codes)}; or {AUTO}, or {NO_HINT} for no language "
                        "hint)")
    self.max_length = int(self.lm.model.config.max_len)
    print(f"xlingo: {self.lm.step_dir} (step {self.lm.step}), languages {', '.join(codes)}, "
          f"context {self.max_length} tokens, lang={self.lang}", flush=True)

  # --- languages ------------------------------------------------------------------------------

  def _lang_id(self, code) -> int:
    if not code or code == NO_HINT or code not in self.lm.table.codes:
      return likelihood.UNKNOWN_LANG
    return self.lm.table.id(code)

  def _langs(self, instance) -> tuple[int, int]:
    """(context language id, continuation language id) of a request."""
    if self.lang == AUTO:
      doc = instance.doc if isinstance(instance.doc, dict) else {}
      return self._lang_id(doc.get("context_lang")), self._lang_id(doc.get("choice_lang"))
    return self._lang_id(self.lang), self._lang_id(self.lang)

  # --- the three request types ------------------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    reqs = []
    for inst in requests:
      ctx, cont = inst.args[0], inst.args[1]
      reqs.append(likelihood.encode_pair(self.lm.vocab, ctx, cont, *self._langs(inst)))
    scored = likelihood.score(self.lm, reqs, batch_size=self.batch_size)
    if scored.truncated:
      print(f"xlingo: {scored.truncated} of {len(reqs)} requests were longer than the context "
            f"({self.max_length} tokens); their contexts were left-truncated", flush=True)
    out = list(zip(scored.logprobs, scored.greedy))
    for inst, res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", inst.args, res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, inst in enumerate(requests):
      text = inst.args[0]
      lang = self._langs(inst)[1]
      ids = list(self.lm.vocab.encode(text)) if text else []
      for w in likelihood.rolling_requests(ids, self.max_length, lang):
        windows.append(w)
        owner.append(k)
    scored = likelihood.score(self.lm, windows, batch_size=self.batch_size)
    totals = [0.0] * len(requests)
    for k, lp in zip(owner, scored.logprobs):
      totals[k] += lp
    for inst, res in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", inst.args, res)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    vocab, model = self.lm.vocab, self.lm.model
    utf8 = decode.utf8_table(vocab, model.config.vocab_size)
    rows = []
    for k, inst in enumerate(requests):
      ctx, kw = inst.args[0], dict(inst.args[1] or {})
      until = kw.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(kw.get("max_gen_toks", self.max_gen_toks)), self.max_length - 2)
      temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
      ids = list(vocab.encode(ctx)) if ctx else []
      room = self.max_length - 1 - max_new  # the start id, the prompt, the new tokens
      ids = ids[len(ids) - room:] if len(ids) > room else ids
      ctx_lang, lang = self._langs(inst)
      rows.append((k, ids, until, max_new, temperature, ctx_lang, lang))
    out = [""] * len(requests)
    groups: dict = {}
    for r in rows:
      groups.setdefault((r[3], r[4]), []).append(r)
    for (max_new, temperature), members in groups.items():
      for s in range(0, len(members), self.batch_size):
        chunk = members[s:s + self.batch_size]
        padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
        new = decode.generate_ids(model, self.lm.params, [r[1] for r in padded],
                                  [r[6] for r in padded], max_len=max_new,
                                  temperature=temperature,
                                  prompt_lang_ids=[r[5] for r in padded],
                                  eos_id=vocab.eos_id, start_id=vocab.start_id, utf8=utf8)
        for r, ids in zip(chunk, new):
          text = vocab.decode(ids) if ids else ""
          for stop in r[2]:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[r[0]] = text
    for inst, res in zip(requests, out):
      self.cache_hook.add_partial("generate_until", inst.args, res)
    return out
