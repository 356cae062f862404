"""``python -m xlingo.hf import``: a Hugging Face model (directory or GGUF file) -> an xlingo
workdir.

The workdir holds ``tokenizer/`` (the model's tokenizer files, copied or, for a GGUF, built)
and ``checkpoints/0``, a params-only step directory written by ``checkpoints.export_params``
whose metadata names the model section (with the options that make xlingo compute the Hugging
Face function: ``norm_eps``, ``qkv_bias``, ``rope_scaling``, ``tied_output_scale='none'``,
``bos_id``), the language table and ``tokenizer/tokenizer.json`` as the vocabulary. So
``checkpoint.init_from=OUT``, ``python -m xlingo.evaluate`` and ``python -m xlingo.generate``
load it as they load any workdir. Everything is checked (config, tokenizer, every tensor's
shape) before anything is written; a failure after that removes the workdir again.
"""

from __future__ import annotations

import json

from xlingo import config as config_lib
from xlingo import paths, sharding
from xlingo.errors import CheckpointError, ConfigError
from xlingo.hf import layout, sources

TOKENIZER_DIR = "tokenizer"
# Tokenizer files copied from a model directory (tokenizer.json is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STEP = 0


def read_model(model: str, max_len: int):
  """(source, config.json as a dict, tokenizer files {name: text}, where) for ``model``."""
  path = paths.resolve(model)
  if path.endswith(".gguf"):
    from xlingo.hf import gguf_file

    src = gguf_file.GgufSource(path)
    return src, src.config, src.tokenizer_files(), path
  config_path = paths.join(path, "config.json")
  if not paths.isdir(path):
    raise ConfigError(f"--model {model!r} does not exist; give a Hugging Face model directory "
                      "or a .gguf file")
  if not paths.exists(config_path):
    raise CheckpointError(f"{path} has no config.json; give a Hugging Face model directory "
                          "(save_pretrained writes one)")
  try:
    hf_cfg = json.loads(paths.read_text(config_path))
  except ValueError as e:
    raise CheckpointError(f"{config_path} is not JSON ({e}); fix or download it again") from None
  layout.model_keys(hf_cfg, config_path, max_len=max_len)  # refuse before opening the weights
  tokenizer = {}
  for name in TOKENIZER_FILES:
    if paths.exists(paths.join(path, name)):
      tokenizer[name] = paths.read_text(paths.join(path, name))
  if "tokenizer.json" not in tokenizer:
    raise CheckpointError(f"{path} has no tokenizer.json (xlingo reads Hugging Face fast "
                          "tokenizers); write it with AutoTokenizer.from_pretrained(DIR)"
                          ".save_pretrained(DIR)")
  return sources.SafetensorsSource(path), hf_cfg, tokenizer, config_path


def check_tokenizer(files: dict, keys: dict, where: str) -> None:
  """CheckpointError unless the tokenizer loads, fits the embedding table and has the BOS."""
  from tokenizers import Tokenizer

  try:
    tok = Tokenizer.from_str(files["tokenizer.json"])
  except Exception as e:  # noqa: BLE001 - the tokenizers library's parse errors
    raise CheckpointError(f"{where}: tokenizer.json does not load ({str(e)[:120]}); use the "
                          "model's own tokenizer.json") from None
  n = tok.get_vocab_size(with_added_tokens=True)
  if n > keys["vocab_size"]:
    raise CheckpointError(f"{where}: tokenizer.json has {n} tokens but the model's embedding "
                          f"table has {keys['vocab_size']} rows; the tokenizer is from another "
                          "model: use the one saved with these weights")
  if keys["bos_id"] >= n:
    raise CheckpointError(f"{where}: bos_token_id={keys['bos_id']} is not a token of "
                          f"tokenizer.json ({n} tokens); use the model's own tokenizer")


def xlingo_config(keys: dict, languages, max_len: int, vocab_path: str):
  """base_config with the imported model section, the language table and the vocabulary."""
  c = config_lib.base_config()
  for k, v in keys.items():
    c.model[k] = v
  c.model.max_len = int(max_len)
  c.model.use_lang_emb = True
  c.model.num_languages = len(languages)
  c.model.lang_emb_init_std = 0.0
  c.model.lid_head = False
  c.model.dtype = "float32"
  c.data.languages = tuple(languages)
  c.data.vocab_path = vocab_path
  return c


class Converted:
  """An imported model in memory: ``config`` (base_config with its model section, languages and
  vocabulary), the ``model`` (Decoder), its sharded ``params`` and the ``tokenizer`` files."""

  def __init__(self, config, model, params, tokenizer, mesh, rules):
    self.config, self.model, self.params, self.tokenizer = config, model, params, tokenizer
    self.mesh, self.rules = mesh, rules


def convert(model: str, *, vocab_path: str = "", languages=config_lib.EMBEDDED_LANGUAGES,
            max_len: int = 2048, mesh=None, rules=None, record=None) -> Converted:
  """``model`` (a Hugging Face directory or a .gguf file) as xlingo parameters, everything
  checked first. ``mesh``/``rules`` place them (default: base_config's mesh); ``record`` sees
  every tensor read (``sources.build_params``)."""
  from xlingo.model import decoder as decoder_lib

  languages = tuple(languages)
  if not languages or len(set(languages)) != len(languages):
    raise ConfigError(f"--languages={','.join(languages)} must list distinct language codes")
  src, hf_cfg, tokenizer, where = read_model(model, max_len)
  keys = layout.model_keys(hf_cfg, where, max_len=max_len)
  check_tokenizer(tokenizer, keys, where)
  config = xlingo_config(keys, languages, max_len, vocab_path)
  sources.check_shapes(src, config.model, where)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.logical_rules(config.mesh) if rules is None else rules
  decoder = decoder_lib.Decoder(config.model)
  params = sources.build_params(src, config.model, decoder, mesh, rules, record=record)
  return Converted(config, decoder, params, tokenizer, mesh, rules)


def import_model(model: str, workdir: str, *, languages=config_lib.EMBEDDED_LANGUAGES,
                 max_len: int = 2048, mesh=None, rules=None) -> str:
  """Writes the xlingo workdir for ``model``; returns its step directory."""
  from xlingo.training import checkpoints

  workdir = paths.resolve(workdir)
  if paths.exists(workdir) and paths.listdir(workdir):
    raise ConfigError(f"--workdir {workdir} is not empty; give a new directory for the import")
  vocab_path = paths.join(workdir, TOKENIZER_DIR, "tokenizer.json")
  c = convert(model, vocab_path=vocab_path, languages=languages, max_len=max_len, mesh=mesh,
              rules=rules)
  try:
    for name, text in c.tokenizer.items():
      paths.write_text(paths.join(workdir, TOKENIZER_DIR, name), text)
    return checkpoints.export_params(paths.join(workdir, "checkpoints", str(STEP)), c.params,
                                     c.config, STEP)
  except BaseException:
    paths.rmtree(workdir)  # nothing half-written
    raise
