"""The configs' one ':arg' parser and model-size table (xlingo.config), and every shipped config
with each of its documented arg forms."""

import importlib

import pytest

from xlingo import config as xconfig
from xlingo.errors import ConfigError

FORMS = {
    "configs.tiny": [None], "configs.small": [None], "configs.tpu_1b": [None],
    "configs.tpu_1b_v6e": [None], "configs.tpu_8b": [None], "configs.adapt_tiny": [None],
    "configs.adapt_small": [None, "pretrain"], "configs.distill_tiny": [None],
    "configs.distill_small": [None, "teacher", "student"],
    "configs.experiments.adapt_el": [None, "extended"],
    "configs.experiments.contrastive": ["0", "0.1,tiny", "adapt:0.1"],
    "configs.experiments.lang_emb": ["on", "off", "dropout,tiny"],
    "configs.experiments.lid": ["0.1", "1,tiny"],
    "configs.experiments.loss_weights": ["de,0.3", "fr,0.5,tiny"],
    "configs.experiments.temperature": ["1", "unimax,tiny"],
}


def test_parse_arg_reads_numbers_choices_and_defaults():
  a = xconfig.parse_arg("0.5,tiny", "c.py", beta=0.1, size=("small", "tiny"))
  assert (a.beta, a.size) == (0.5, "tiny")
  a = xconfig.parse_arg(None, "c.py", beta=0.1, size=("small", "tiny"))
  assert (a.beta, a.size) == (0.1, "small")
  a = xconfig.parse_arg("unimax", "c.py", t=(3.33, "unimax"))
  assert a.t == "unimax" and xconfig.parse_arg("100", "c.py", t=(3.33, "unimax")).t == 100.0
  with pytest.raises(ConfigError, match=r"c.py:x,tiny: beta 'x' is not a number; the form is "
                     r"c.py:BETA\[,SIZE\]"):
    xconfig.parse_arg("x,tiny", "c.py", beta=0.1, size=("small", "tiny"))
  with pytest.raises(ConfigError, match="size 'huge' is not 'small' or 'tiny'"):
    xconfig.parse_arg("1,huge", "c.py", beta=0.1, size=("small", "tiny"))
  with pytest.raises(ConfigError, match="c.py:a: it takes no argument"):
    xconfig.parse_arg("a", "c.py")
  with pytest.raises(ConfigError, match="c.py:1,2: too many values; the form is c.py:BETA$"):
    xconfig.parse_arg("1,2", "c.py", beta=0.1)


def test_model_sizes():
  c = xconfig.base_config()
  assert {k: c.model[k] for k in xconfig.MODEL_SIZES["base"]} == xconfig.MODEL_SIZES["base"]
  xconfig.set_model_size(c.model, "8b")
  assert (c.model.d_model, c.model.num_kv_heads) == (4096, 8)
  with pytest.raises(ConfigError, match="model size 'xl' is unknown"):
    xconfig.set_model_size(c.model, "xl")


@pytest.mark.parametrize("module", sorted(FORMS))
def test_every_config_loads_with_its_arg_forms(module):
  mod = importlib.import_module(module)
  for arg in FORMS[module]:
    c = mod.get_config(arg)
    assert c.data.seq_len <= c.model.max_len
  if FORMS[module] == [None]:
    with pytest.raises(ConfigError, match="takes no argument"):
      mod.get_config("x")
