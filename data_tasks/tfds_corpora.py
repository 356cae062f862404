"""Public multilingual corpora through TFDS: wiki40b and c4/multilingual (mC4).

  c.data.source = "tfds_corpora"
  c.data.tfds_name = "wiki40b"          # or "c4/multilingual"
  c.data.tfds_data_dir = "gs://bucket/tensorflow_datasets"   # prepared beforehand

wiki40b has one config per language (wiki40b/de) with train/validation splits; mC4 has one
split per language ("de") and "<lang>-validation".
"""

from data_tasks.registered import Registered
from xlingo.data import tasks
from xlingo.errors import ConfigError, DataError

VERSIONS = {"wiki40b": "1.3.0", "c4/multilingual": "3.1.0"}


def tfds_spec(tfds_name: str, lang: str):
  """(tfds_name with config/version, split mapping) for one language."""
  base = tfds_name.split(":")[0]
  version = tfds_name.split(":")[1] if ":" in tfds_name else VERSIONS.get(base)
  if base == "wiki40b":
    name = f"wiki40b/{lang}" + (f":{version}" if version else "")
    return name, {"train": "train", "validation": "validation"}
  if base in ("c4/multilingual", "mc4"):
    name = "c4/multilingual" + (f":{version}" if version else "")
    return name, {"train": lang, "validation": f"{lang}-validation"}
  raise DataError(
      f"data.tfds_name={tfds_name!r} is not supported; use 'wiki40b' or 'c4/multilingual'")


def register(data_cfg, vocab, prefix: str = "xlingo.tfds") -> Registered:
  name = data_cfg.get("tfds_name", "")
  if not name:
    raise DataError("data.source='tfds_corpora' needs data.tfds_name ('wiki40b' or "
                          "'c4/multilingual')")
  if not data_cfg.get("tfds_data_dir"):
    raise ConfigError(f"data.tfds_data_dir is empty; set --config.data.tfds_data_dir=gs://BUCKET/"
                      f"tensorflow_datasets where {name} has been prepared (tfds build)")
  lm = {}
  for lang in data_cfg.languages:
    tfds_name, splits = tfds_spec(name, lang)
    task = tasks.lm_task_name(f"{prefix}.{name.split(':')[0].replace('/', '_')}", lang)
    tasks.register_tfds_lm_task(task, lang, tfds_name, splits, vocab,
                                tfds_data_dir=data_cfg.get("tfds_data_dir") or None)
    lm[lang] = task
  return Registered(lm=lm, mt={})
