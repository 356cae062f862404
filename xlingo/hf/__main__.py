"""Hugging Face import and export.

  python -m xlingo.hf import --model DIR_OR_GGUF --workdir OUT [--languages en,de,...]
      [--max_len 2048] [--fsdp N --tensor N]
  python -m xlingo.hf export --workdir W --output DIR [--lang L] [--peft] [--max_positions N]

import: a Hugging Face model directory (config.json, model.safetensors or a sharded
model.safetensors.index.json, tokenizer.json) of LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM, or a llama.cpp .gguf file, becomes an xlingo workdir that
--config.checkpoint.init_from=OUT, python -m xlingo.evaluate and python -m xlingo.generate load.
--languages is its language table (default: the embedded corpus's); their embeddings start at
zero. --max_len is the longest row it will see (a Mistral sliding window must not be shorter).

export: the workdir's newest checkpoint becomes a directory that transformers'
AutoModelForCausalLM / AutoTokenizer load: LoRA merged (--peft: kept as adapter/ for the peft
library), --lang's language embedding folded into the token table. docs/HF.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m xlingo.hf", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory or GGUF -> xlingo workdir")
  imp.add_argument("--model", required=True, help="model directory or .gguf file")
  imp.add_argument("--workdir", required=True, help="new xlingo workdir")
  imp.add_argument("--languages", default="", help="language table, e.g. en,de (default: the "
                   "embedded corpus's)")
  imp.add_argument("--max_len", type=int, default=2048, help="longest row the model will see")
  imp.add_argument("--fsdp", type=int, default=1, help="mesh fsdp size for the read")
  imp.add_argument("--tensor", type=int, default=1, help="mesh tensor size for the read")
  exp = sub.add_parser("export", help="xlingo workdir -> Hugging Face directory")
  exp.add_argument("--workdir", required=True, help="xlingo workdir (its newest checkpoint)")
  exp.add_argument("--output", required=True, help="new directory")
  exp.add_argument("--lang", default=None, help="language whose embedding is folded in (or "
                   "'none')")
  exp.add_argument("--peft", action="store_true", help="LoRA as a PEFT adapter, not merged")
  exp.add_argument("--max_positions", type=int, default=0,
                   help="max_position_embeddings (default: the tokenizer's model_max_length)")
  return ap


def main(argv=None) -> None:
  from xlingo import cli

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  args = _parser().parse_args((argv or sys.argv)[1:])

  def body():
    if args.command == "import":
      from xlingo import config as config_lib
      from xlingo import sharding
      from xlingo.hf import importer

      langs = tuple(x for x in args.languages.split(",") if x) or config_lib.EMBEDDED_LANGUAGES
      mesh_cfg = config_lib.base_config().mesh
      mesh_cfg.fsdp, mesh_cfg.tensor = args.fsdp, args.tensor
      step_dir = importer.import_model(
          args.model, args.workdir, languages=langs, max_len=args.max_len,
          mesh=sharding.make_mesh(mesh_cfg), rules=sharding.logical_rules(mesh_cfg))
      print(f"xlingo: imported {args.model} -> {step_dir}", flush=True)
    else:
      from xlingo.hf import exporter

      out = exporter.export_model(args.workdir, args.output, lang=args.lang, peft=args.peft,
                                  max_positions=args.max_positions)
      print(f"xlingo: exported {args.workdir} -> {out}", flush=True)

  cli.run_body(body)


if __name__ == "__main__":
  from xlingo import cli

  cli.exit_when_done(main)
