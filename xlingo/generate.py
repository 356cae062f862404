"""Sample text from a checkpoint in a chosen language, with the KV cache.

  python -m xlingo.generate --config configs/tiny.py --workdir /tmp/xlingo_tiny --lang de \
      --prompt "Debian ist" [--prompts_file F] [--temperature 0.8 --top_k 40 --top_p 0.95] \
      [--max_len 64] [--seed 0] [--num_samples N] [--checkpoint STEP_DIR]

The decoding itself (KV cache, batching, sampling) is ``xlingo.decode``'s.
"""

from __future__ import annotations

from xlingo.decode import NO_HINT, generate
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib

# --- command line ---------------------------------------------------------------------------


def _define_flags(fl) -> None:
  from absl import flags

  flags.DEFINE_string("lang", None, "Language code to generate in (from data.languages), or "
                      f"'{NO_HINT}' for no language hint.", flag_values=fl)
  flags.DEFINE_string("prompt_lang", None, f"Language of the prompt (default --lang; '{NO_HINT}': "
                      "no hint).", flag_values=fl)
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).", flag_values=fl)
  flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line.", flag_values=fl)
  flags.DEFINE_float("temperature", 0.0, "0: greedy.", flag_values=fl)
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).",
                       flag_values=fl)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=fl)
  flags.DEFINE_integer("max_len", 64, "New tokens per sample at most.", flag_values=fl)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fl)
  flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", flag_values=fl)
  flags.DEFINE_integer("batch_size", 16, "Rows decoded together.", flag_values=fl)


# flag -> (test, what it must be): checked before anything is loaded.
FLAG_RULES = {
    "max_len": (lambda v: v >= 1, "an integer >= 1 (new tokens per sample)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0: no limit)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
}


def _check_flags(fl) -> None:
  from xlingo import cli

  if not (fl.workdir or fl.checkpoint):
    cli.fail("give --workdir DIR (its latest checkpoint) or --checkpoint STEP_DIR")
  if not fl.lang:
    cli.fail(f"--lang is required (one of {', '.join(fl.config.data.languages)}, or {NO_HINT} "
             "for no language hint)")
  for name, (ok, must) in FLAG_RULES.items():
    value = getattr(fl, name)
    if not ok(value):
      cli.fail(f"--{name}={value} must be {must}")


def lang_id_of(table, code: str) -> int:
  """The id of a --lang value: the table's, or UNKNOWN_LANG for 'none'."""
  return decoder_lib.UNKNOWN_LANG if code == NO_HINT else table.id(code)


def read_prompts(prompt_flags, prompts_file) -> list[str]:
  from xlingo import paths

  prompts = list(prompt_flags or [])
  if prompts_file:
    if not paths.isfile(prompts_file):
      raise ConfigError(f"--prompts_file {prompts_file!r} does not exist; give a text file")
    text = paths.read_text(prompts_file)
    prompts += [line for line in text.splitlines() if line.strip()]
  return prompts or [""]


def main(argv=None):
  from xlingo import cli

  def body(fl):
    from xlingo.training.load import load_model

    prompts = read_prompts(fl.prompt, fl.prompts_file)
    path, what = cli.tool_checkpoint(fl)
    lm = load_model(fl.config, path, what=what)
    # The checkpoint's language table (which may differ from the config's).
    for flag in ("lang", "prompt_lang"):
      code = getattr(fl, flag)
      if code and code != NO_HINT and code not in lm.table.codes:
        raise ConfigError(f"--{flag}={code} is not a language of {lm.step_dir} (it has "
                          f"{', '.join(lm.table.codes)}, or {NO_HINT} for no language hint)")
    lang = lang_id_of(lm.table, fl.lang)
    prompt_lang = lang_id_of(lm.table, fl.prompt_lang) if fl.prompt_lang else lang
    rows = [(p, k) for p in prompts for k in range(fl.num_samples)]
    for start in range(0, len(rows), fl.batch_size):
      chunk = rows[start:start + fl.batch_size]
      outs = generate(lm.model, lm.params, lm.vocab, [p for p, _ in chunk], lang,
                      max_len=fl.max_len, temperature=fl.temperature, top_k=fl.top_k,
                      top_p=fl.top_p, seed=fl.seed + start, prompt_lang_ids=prompt_lang)
      for (p, k), text in zip(chunk, outs):
        tag = f"[{fl.lang} #{k}]" if fl.num_samples > 1 else f"[{fl.lang}]"
        print(f"{tag} {p}\u2192{text}" if p else f"{tag} {text}", flush=True)

  cli.run_tool(argv, __doc__, _define_flags, body, check=_check_flags)


if __name__ == "__main__":
  from xlingo import cli

  cli.exit_when_done(main)
