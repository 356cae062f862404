"""Task fine-tuning (python -m xlingo.finetune) on a tiny synthetic labelled task: a classifier
run from a pretrained LM end to end (val/acc, test/acc, the transfer table, evaluate --task),
its resume equal to the uninterrupted run, the verbalizer head under LoRA, and bad input as
one line before any training."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn
from helpers import final_params, metrics_rows

from configs import finetune_tiny, tiny
from xlingo import evaluate, finetune, sharding
from xlingo.data import task_batches, vocabulary
from xlingo.errors import ConfigError, DataError
from xlingo.model import decoder as decoder_lib
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import task

LABELS = ["net", "disk", "user"]
WORDS = {"net": "network eth0 route dns", "disk": "disk fdisk mount ext4",
         "user": "user useradd passwd sudo"}
FILLER = {"en": "the system is set up with", "de": "das System wird eingerichtet mit"}
NAMES = {"en": ["network", "disks", "users"], "de": ["Netzwerk", "Platten", "Benutzer"]}


def write_task(root, *, names=NAMES, sizes=(24, 8, 8), val_labels=LABELS, drop_train=()):
  """A 3-class task in en and de: the class is in the (shared) technical words."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "labels.json"), "w") as f:
    json.dump({"labels": LABELS, "names": names}, f)
  rng = np.random.default_rng(0)
  for lang in ("en", "de"):
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
      labels = LABELS if split == "train" else val_labels
      with open(os.path.join(root, f"{lang}.{split}.tsv"), "w") as f:
        for i in range(n):
          lab = labels[i % len(labels)]
          if split == "train" and lab in drop_train:
            lab = LABELS[0]
          words = rng.permutation(WORDS[lab].split())[:3]
          f.write(f"{lab}\t{FILLER[lang]} {' '.join(words)}\t{i}\n")
  return str(root)


def fresh_params(config):
  model = decoder_lib.Decoder(config.model)
  return model, nn.unbox(sharding.init_variables(model, jax.random.PRNGKey(0), 8)["params"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """An LM to start from: tiny.py's model, freshly initialised and exported as a step
  directory (what init_from reads of a workdir; pretraining it would only add compile time)."""
  c = tiny.get_config()
  _, params = fresh_params(c)
  return ckpt_lib.export_params(str(tmp_path_factory.mktemp("lm") / "export"), params, c, 0)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_task(tmp_path_factory.mktemp("task") / "syn")


def _config(init_from, task, steps=4, **ft):
  c = finetune_tiny.get_config()
  c.checkpoint.init_from = init_from
  c.finetune.task = task
  c.train.steps = steps
  c.train.batch_size = 8
  c.train.eval_every = 2
  c.train.log_every = 2
  c.checkpoint.every_steps = 2
  for k, v in ft.items():
    c.finetune[k] = v
  return c


def test_classifier_end_to_end_and_resume(pretrained, task_dir, tmp_path):
  wd = str(tmp_path / "ft")
  report = finetune.run(_config(pretrained, task_dir), wd)
  assert report["train_languages"] == ["en"] and report["head"] == "classifier"
  assert set(report["test_acc"]) == {"en", "de"} and report["test_examples"] == {"en": 8, "de": 8}
  assert report["transfer"]["gap"]["de"] == pytest.approx(
      report["test_acc"]["de"] - report["test_acc"]["en"])
  assert report["best_step"] in (2, 4)
  rows = metrics_rows(wd)
  val = [r for r in rows if "val/acc/en" in r]
  assert [r["step"] for r in val] == [0, 2, 4] and all("val/acc/de" in r for r in val)
  assert "val/task_error" in val[-1] and "test/acc/de" in rows[-1]
  with open(os.path.join(wd, finetune.REPORT)) as f:
    assert json.load(f)["test_acc"] == report["test_acc"]
  # evaluate --task reads the workdir as the run did, and gives its numbers
  again = evaluate.task_transfer(_config(pretrained, task_dir), {"ft": wd})
  assert again["rows"]["en"]["acc"] == pytest.approx(report["test_acc"])
  assert "0-shot" in evaluate.format_task_transfer(again)

  # a run stopped after its step-2 checkpoint, resumed: the uninterrupted run's parameters
  wd2 = str(tmp_path / "resumed")
  shutil.copytree(wd, wd2, ignore=shutil.ignore_patterns("lock"))
  shutil.rmtree(os.path.join(wd2, "checkpoints", "4"))
  finetune.run(_config(pretrained, task_dir), wd2)
  a, b = final_params(wd, 4), final_params(wd2, 4)
  assert a.keys() == b.keys() and any("task_kernel" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_verbalizer_scores_are_label_name_log_probs(task_dir):
  """The verbalizer's class score is the mean (or sum) log-probability of the class's name in
  the example's language after text + prompt, as the LM's own full logits give it."""
  c = finetune_tiny.get_config()
  c.finetune.task, c.finetune.head, c.finetune.max_len = task_dir, "verbalizer", 32
  vocab = vocabulary.load_configured(c.data, c.model.vocab_size)[1]
  data = finetune.load_data(c)
  enc = task_batches.Encoder.build(vocab, tuple(c.data.languages), data.labels,
                                   c.finetune.to_dict(), ("en", "de"))
  rows = enc.encode(vocab, data.validation["de"][:2], "de")
  model, params = fresh_params(c)
  de = c.data.languages.index("de")
  apply = jax.jit(lambda p, x, seg: model.apply({"params": p}, x, seg,
                                                lang_ids=jax.numpy.full_like(x, de))[0])
  for norm in ("mean", "sum"):
    s = task.Settings.from_dict(c.finetune.to_dict() | {"verbalizer_norm": norm}, enc, 2)
    got = np.asarray(jax.jit(lambda p, b, s=s: task.scores(model, p, b, s))(params, rows))
    for i in range(2):
      m = int(rows["segment_ids"][i].sum())
      for j, name in enumerate(NAMES["de"]):
        ids = np.asarray(vocab.encode(" " + name), np.int32)
        full = np.zeros((1, 32), np.int32)
        full[0, : m + len(ids)] = np.concatenate([rows["inputs"][i, :m], ids])
        lp = jax.nn.log_softmax(apply(params, full, (full > -1).astype(np.int32))[0], axis=-1)
        want = sum(float(lp[m - 1 + k, t]) for k, t in enumerate(ids))
        want = want / len(ids) if norm == "mean" else want
        assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-4), (norm, i, name)


@pytest.mark.slow
def test_verbalizer_with_lora(pretrained, task_dir, tmp_path):
  c = _config(pretrained, task_dir, steps=2, head="verbalizer", max_len=32)
  c.adapt.mode = "lora"
  report = finetune.run(c, str(tmp_path / "verb"))
  assert report["mode"] == "lora" and set(report["val_acc"]) == {"en", "de"}
  params = final_params(str(tmp_path / "verb"), 2)
  assert not any("task_kernel" in k for k in params) and any("lora" in k for k in params)


def test_bad_input_is_one_line_before_training(pretrained, task_dir, tmp_path):
  wd = str(tmp_path / "never")

  def fails(error, match, config):
    with pytest.raises(error, match=match) as e:
      finetune.run(config, wd)
    assert "\n" not in str(e.value) and not os.path.exists(wd)

  fails(DataError, "unknown task 'nope'", _config(pretrained, "nope"))
  fails(DataError, "no train data for training language 'fr'",
        _config(pretrained, task_dir, train_languages=("fr",)))
  fails(ConfigError, "finetune.head='classfier' is unknown", _config(pretrained, task_dir,
                                                                   head="classfier"))
  fails(ConfigError, "set --config.checkpoint.init_from", _config("", task_dir))
  fails(ConfigError, "checkpoint.init_from=.*missing' does not exist",
        _config(str(tmp_path / "missing"), task_dir))
  empty = write_task(tmp_path / "empty_name", names={"en": ["network", "", "users"]})
  fails(DataError, "label name '' .*encodes to no token",
        _config(pretrained, empty, head="verbalizer"))
  unseen = write_task(tmp_path / "unseen", drop_train=("user",))
  fails(DataError, "label\\(s\\) user of en.validation.tsv never occur", _config(pretrained,
                                                                                unseen))
  # elsewhere (another language, a test split) it is a warning with the count
  path = os.path.join(unseen, "en.validation.tsv")
  with open(path) as f:
    kept = [line for line in f if not line.startswith("user\t")]
  with open(path, "w") as f:
    f.writelines(kept)
  notes = finetune.load_data(_config(pretrained, unseen)).notes
  assert len(notes) == 3 and "2 de validation example(s) have label(s) user unseen" in notes[0]
