"""Sample text from a checkpoint in a chosen language, with the KV cache.

  python -m xlingo.generate --config configs/tiny.py --workdir /tmp/xlingo_tiny --lang de \
      --prompt "Debian ist" [--prompts_file F] [--temperature 0.8 --top_k 40 --top_p 0.95] \
      [--max_len 64] [--seed 0] [--num_samples N] [--checkpoint STEP_DIR]

``--lang de,fr,ja`` (or ``all``: every language of the checkpoint) samples each prompt in each
language from one model load, the rows of all languages batched together.

The decoding itself (KV cache, batching, sampling) is ``xlingo.decode``'s.
"""

from __future__ import annotations

from xlingo.decode import NO_HINT, generate
from xlingo.errors import ConfigError
from xlingo.model import decoder as decoder_lib

# --- command line ---------------------------------------------------------------------------


def _define_flags(fl) -> None:
  from absl import flags

  flags.DEFINE_string("lang", None, "Language code(s) to generate in (from data.languages), "
                      f"comma-separated, 'all' for every one, or '{NO_HINT}' for no language "
                      "hint.", flag_values=fl)
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
    cli.fail(f"--lang is required (one or more of {', '.join(fl.config.data.languages)} "
             f"comma-separated, {ALL}, or {NO_HINT} for no language hint)")
  for name, (ok, must) in FLAG_RULES.items():
    value = getattr(fl, name)
    if not ok(value):
      cli.fail(f"--{name}={value} must be {must}")


ALL = "all"  # --lang all: every language of the checkpoint


def lang_codes(flag: str, table) -> list[str]:
  """The languages a --lang value names, in its order (``all``: the checkpoint's table);
  ConfigError for a code the checkpoint lacks."""
  codes = list(table.codes) if flag == ALL else [c.strip() for c in flag.split(",") if c.strip()]
  for code in codes:
    if code != NO_HINT and code not in table.codes:
      raise ConfigError(f"--lang={flag}: {code} is not a language of the checkpoint (it has "
                        f"{', '.join(table.codes)}, {ALL}, or {NO_HINT} for no language hint)")
  return list(dict.fromkeys(codes))


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
    codes = lang_codes(fl.lang, lm.table)
    if fl.prompt_lang and fl.prompt_lang != NO_HINT and fl.prompt_lang not in lm.table.codes:
      raise ConfigError(f"--prompt_lang={fl.prompt_lang} is not a language of {lm.step_dir} (it "
                        f"has {', '.join(lm.table.codes)}, or {NO_HINT} for no language hint)")
    rows = [(code, p, k) for code in codes for p in prompts for k in range(fl.num_samples)]
    for start in range(0, len(rows), fl.batch_size):
      chunk = rows[start:start + fl.batch_size]
      langs = [lang_id_of(lm.table, code) for code, _, _ in chunk]
      prompt_langs = ([lang_id_of(lm.table, fl.prompt_lang)] * len(chunk) if fl.prompt_lang
                      else langs)
      outs = generate(lm.model, lm.params, lm.vocab, [p for _, p, _ in chunk], langs,
                      max_len=fl.max_len, temperature=fl.temperature, top_k=fl.top_k,
                      top_p=fl.top_p, seed=fl.seed + start, prompt_lang_ids=prompt_langs)
      for (code, p, k), text in zip(chunk, outs):
        tag = f"[{code} #{k}]" if fl.num_samples > 1 else f"[{code}]"
        print(f"{tag} {p}\u2192{text}" if p else f"{tag} {text}", flush=True)

  cli.run_tool(argv, __doc__, _define_flags, body, check=_check_flags)


if __name__ == "__main__":
  from xlingo import cli

  cli.exit_when_done(main)
