"""Runs that would read a language too many times are refused in one line (data.max_epochs), and
the TPU configs default to a real corpus (TFDS c4/multilingual) that needs data.tfds_data_dir."""

import pytest

from configs import tiny, tpu_1b, tpu_1b_v6e, tpu_8b
from xlingo.data import mixing
from xlingo.errors import ConfigError

STATS = [mixing.TaskStats("t.en", "en", examples=1000, tokens=100_000),
         mixing.TaskStats("t.sw", "sw", examples=10, tokens=1_000)]
RATES = {"t.en": 0.5, "t.sw": 0.5}  # every other example from the small language


def test_check_epochs_names_every_language_over_the_bound():
  # 100,000 tokens drawn: 1,000 examples of 100 tokens, 500 of each task -> en 0.5 epochs, sw 50.
  epochs = mixing.epochs_over_run(STATS, RATES, 100_000)
  assert epochs["t.sw"] == pytest.approx(50.0) and epochs["t.en"] == pytest.approx(0.5)
  with pytest.raises(ConfigError) as e:
    mixing.check_epochs(STATS, epochs, max_epochs=4)
  msg = str(e.value)
  assert "\n" not in msg and "data.max_epochs=4" in msg and "sw 50.0" in msg and "en" not in \
      msg.split("(")[1].split(")")[0]


def test_check_epochs_passes_under_the_bound_and_when_off():
  epochs = mixing.epochs_over_run(STATS, RATES, 100_000)
  mixing.check_epochs(STATS, epochs, max_epochs=60)
  mixing.check_epochs(STATS, epochs, max_epochs=0)


def test_plan_inputs_refuses_a_run_that_repeats_the_corpus():
  from xlingo.data import inputs

  c = tiny.get_config()
  c.data.languages = c.data.train_languages = ("en", "de")
  c.train.steps = 200_000  # ~100M tokens over a corpus of about a million
  c.data.max_epochs = 4.0
  with pytest.raises(ConfigError, match=r"planned epochs over the run exceed data.max_epochs=4"):
    inputs.plan_inputs(c)
  c.data.max_epochs = 0.0  # the override: no bound
  plan = inputs.plan_inputs(c)
  assert max(plan.mix.epochs().values()) > 4


@pytest.mark.parametrize("module", [tpu_1b, tpu_1b_v6e, tpu_8b])
def test_tpu_configs_read_mc4_and_require_its_data_dir(module):
  from data_tasks import tfds_corpora

  c = module.get_config()
  assert (c.data.source, c.data.tfds_name) == ("tfds", "c4/multilingual")
  assert 0 < c.data.max_epochs <= 4 and c.train.loss_chunk_size > 0
  assert c.data.tfds_data_dir == ""
  with pytest.raises(ConfigError, match=r"^data.tfds_data_dir is empty; set "
                                         r"--config.data.tfds_data_dir=gs://"):
    tfds_corpora.register(c.data, vocab=None)
