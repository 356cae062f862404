"""The one restore path: tools without the corpus, fallbacks past unreadable checkpoints, config
changes at resume, set-aside checkpoints, the way out of a NaN stop, and the tools' flags.

One small run on a user-files corpus (two languages) is trained once and copied for each case;
the command-line cases run the real CLI in a subprocess, sharing compiled programs through a
persistent compilation cache.
"""

import importlib.util
import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, run_module

from configs import tiny
from xlingo import adapt, cli, evaluate, generate, sharding, train
from xlingo.errors import CheckpointError
from xlingo.model import decoder as decoder_lib
from xlingo.model import peft
from xlingo.training import checkpoints as ckpt_lib
from xlingo.training import load, loop, restore
from xlingo.training import state as state_lib
from xlingo.training.load import load_model

CORPUS = os.path.join(ROOT, "xlingo", "data", "corpus", "mono")
FILES_CONFIG = """
from configs import tiny


def get_config(arg=None):
  c = tiny.get_config()
  c.data.source = "files"
  c.data.languages = ("en", "de")
  c.model.num_languages = 2
  c.data.file_patterns = {{"en": "{d}/en.train.txt", "de": "{d}/de.train.txt"}}
  c.data.file_val_patterns = {{"en": "{d}/en.validation.txt", "de": "{d}/de.validation.txt"}}
  c.train.steps = 4
  c.train.eval_every = 100
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 10
  return c
"""


def _cli(module, cache_dir, *args, check=True):
  return run_module(module, args, cache_dir, check=check)


def _last_error(text: str) -> str:
  lines = text.strip().splitlines()
  assert lines and lines[-1].startswith("xlingo: error:"), text[-2000:]
  return lines[-1]


def _load_config(path):
  spec = importlib.util.spec_from_file_location("files_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def files_run(tmp_path_factory, cache_dir):
  """(config file, corpus dir, workdir) of a 4-step run on files, checkpoints at 2 and 4."""
  base = tmp_path_factory.mktemp("files_run")
  corpus = base / "corpus"
  corpus.mkdir()
  for name in ("en.train.txt", "de.train.txt", "en.validation.txt", "de.validation.txt"):
    shutil.copy(os.path.join(CORPUS, name), corpus / name)
  cfg = base / "files_config.py"
  cfg.write_text(FILES_CONFIG.format(d=corpus))
  wd = base / "run"
  _cli("xlingo.train", cache_dir, "--config", cfg, "--workdir", wd)
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
  return cfg, corpus, wd


def _copy(files_run, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(files_run[2], wd)
  return wd


def _garble_state(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      with open(os.path.join(root, f), "w") as fh:
        fh.write("garbage")


def _tear_meta(step_dir):
  path = step_dir / "meta" / "metadata"
  path.write_text(path.read_text()[:40])


def _train_in_process(cfg, wd, *extra):
  argv = ["xlingo.train", "--config", str(cfg), f"--workdir={wd}", *extra]
  cli.run_main(argv, train.__doc__, lambda c, w: loop.run(c, w))


def _listing(wd):
  return sorted(os.listdir(wd / "checkpoints")), [
      (wd / "checkpoints" / s / "meta" / "metadata").read_text()
      for s in sorted(os.listdir(wd / "checkpoints")) if s.isdigit()]


# --- tools ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_and_evaluate_without_the_corpus(files_run, cache_dir, tmp_path):
  """The tools need the checkpoint and the vocabulary only: not the training plan, not the
  corpus (here the files the run trained on are gone)."""
  cfg, corpus, wd = files_run
  gone = corpus.parent / "corpus.gone"
  corpus.rename(gone)
  try:
    # Two languages from one model load.
    p = _cli("xlingo.generate", cache_dir, "--config", cfg, "--workdir", wd, "--lang", "de,en",
             "--prompt", "Das Paket", "--max_len", 4)
    assert p.stdout.strip().startswith("[de] Das Paket\u2192"), p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("[en] Das Paket\u2192"), p.stdout
    tsv = tmp_path / "en-de.tsv"
    tsv.write_text("The package\tDas Paket\nThe system\tDas System\n")
    report = evaluate.run(_load_config(cfg), {"run": str(wd)}, translate_pairs=["en-de"],
                          translate_tsv={"en-de": str(tsv)}, max_examples=2,
                          what="--workdir")
    r = report["results"]["run"]
    assert r["step"] == 4 and r["languages"] == ["en", "de"]
    assert r["translation"]["en-de"]["examples"] == 2
    assert not any(k.startswith("val/") for k in r["metrics"])  # no validation files here
  finally:
    gone.rename(corpus)


@pytest.mark.slow
def test_tools_fall_back_past_an_unreadable_latest(files_run, cache_dir, tmp_path):
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  _garble_state(wd / "checkpoints" / "4")
  p = _cli("xlingo.generate", cache_dir, "--config", cfg, "--workdir", wd, "--lang", "en",
           "--max_len", 2)
  assert "checkpoints/4 is unreadable" in p.stdout and "using" in p.stdout, p.stdout
  assert p.stdout.strip().splitlines()[-1].startswith("[en]")
  # A tool leaves another run's files as they are.
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]

  # A torn meta/metadata: evaluate and a distillation teacher fall back the same way.
  torn = tmp_path / "torn"
  shutil.copytree(files_run[2], torn)
  _tear_meta(torn / "checkpoints" / "4")
  config = _load_config(cfg)
  assert evaluate.evaluate_checkpoint(config, str(torn))["step"] == 2
  from configs import distill_tiny
  from xlingo import distill

  d = distill_tiny.get_config()
  d.data.languages, d.model.num_languages = ("en", "de"), 2
  d.distill.teacher_model.num_languages = 2
  d.distill.teacher_workdir = str(torn)
  teacher = distill.restore_teacher(d, sharding.make_mesh(d.mesh), sharding.logical_rules(d.mesh))
  assert teacher.step == 2 and teacher.model.config.d_model == 64


@pytest.mark.slow
def test_training_falls_back_past_torn_metadata(files_run, cache_dir, tmp_path):
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  _tear_meta(wd / "checkpoints" / "4")
  p = _cli("xlingo.train", cache_dir, "--config", cfg, "--workdir", wd)
  assert "checkpoint step 4" in p.stdout and "falling back" in p.stdout, p.stdout[-2000:]
  # Said once, not again as a logging WARNING.
  assert (p.stdout + p.stderr).count("checkpoint step 4 ") == 1 and "WARNING" not in p.stderr
  assert f"resumed from {wd / 'checkpoints'} step 2" in p.stdout
  assert "training finished" in p.stdout
  names = os.listdir(wd / "checkpoints")
  assert "4" in names and any(n.startswith("4.unreadable-") for n in names)


# --- config changes at resume -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("override,needle", [
    ("--config.train.optimizer=sgd", "train.optimizer='adamw' but this config has 'sgd'"),
    ("--config.data.group_size=0", "data.group_size=64 but this config has 0"),
    ("--config.train.batch_size=16", "train.batch_size=8 but this config has 16"),
    ("--config.train.trainable=blocks", "train.trainable='.*' but this config has 'blocks'"),
])
def test_config_change_at_resume_names_the_key_and_touches_nothing(files_run, tmp_path, capsys,
                                                                 override, needle):
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  before = _listing(wd)
  with pytest.raises(SystemExit) as e:
    _train_in_process(cfg, wd, override)
  assert e.value.code == 2
  err = _last_error(capsys.readouterr().err)
  assert needle in err and "nothing was changed" in err, err
  assert _listing(wd) == before


@pytest.mark.slow
def test_config_change_with_older_metadata_compares_the_saved_tree(files_run, tmp_path, capsys):
  """Metadata written before the settings were recorded: the saved tree tells the change."""
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  for s in ("2", "4"):
    path = wd / "checkpoints" / s / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["settings"], meta["vocab_path"]
    path.write_text(json.dumps(meta))
  before = _listing(wd)
  with pytest.raises(SystemExit) as e:
    _train_in_process(cfg, wd, "--config.train.optimizer=sgd")
  assert e.value.code == 2
  err = _last_error(capsys.readouterr().err)
  assert "does not fit this config's train state" in err and "opt_state" in err, err
  assert _listing(wd) == before


@pytest.mark.slow
def test_grad_clip_toggled_at_resume_is_carried_over(files_run, tmp_path):
  """Clipping keeps no state: turning it off (or on) at resume restores the same arrays."""
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  _train_in_process(cfg, wd, "--config.train.grad_clip=0")
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_only_set_aside_checkpoints_left_is_refused(files_run, tmp_path, capsys):
  cfg, _, _ = files_run
  wd = _copy(files_run, tmp_path)
  for s in ("2", "4"):
    os.rename(wd / "checkpoints" / s, wd / "checkpoints" / f"{s}.unreadable-100")
  before = _listing(wd)
  with pytest.raises(SystemExit) as e:
    _train_in_process(cfg, wd)
  assert e.value.code == 2
  err = _last_error(capsys.readouterr().err)
  assert "were set aside as unreadable" in err and "move them out of" in err, err
  assert _listing(wd) == before


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, capsys, keep):
  with pytest.raises(SystemExit) as e:
    _train_in_process(os.path.join(ROOT, "configs", "tiny.py"), tmp_path / "wd",
                      f"--config.checkpoint.keep={keep}")
  assert e.value.code == 2
  assert f"checkpoint.keep={keep} must be >= 1" in _last_error(capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")


# --- the way out of a NaN stop ----------------------------------------------------------------


@pytest.mark.slow
def test_nan_stop_advice_leads_to_a_finished_run(files_run, cache_dir, tmp_path):
  """With a checkpoint every step the newest kept one already holds diverged parameters
  (~1e30); the message names an older step, and restoring it with a sane learning rate
  finishes the run. The same command run again resumes the new line of checkpoints."""
  cfg, _, _ = files_run
  wd = tmp_path / "nan"
  args = ["--config", cfg, "--workdir", wd, "--config.checkpoint.every_steps=1"]
  p = _cli("xlingo.train", cache_dir, *args, "--config.train.learning_rate=1e30", check=False)
  assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
  err = _last_error(p.stderr)
  assert "grad_clip" not in err  # it is on in this config
  step = re.search(r"--config\.checkpoint\.restore_step=(\d+)", err).group(1)
  fixed = [*args, f"--config.checkpoint.restore_step={step}", "--config.train.learning_rate=1e-3"]
  p = _cli("xlingo.train", cache_dir, *fixed)
  assert "training finished" in p.stdout
  names = os.listdir(wd / "checkpoints")
  assert any(".superseded-" in n for n in names)
  params = ocp.StandardCheckpointer().restore(str(wd / "checkpoints" / "4" / "state"))["params"]
  assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(params)) < 100
  p = _cli("xlingo.train", cache_dir, *fixed)
  assert f"resumed from {wd / 'checkpoints'} step 4" in p.stdout, p.stdout[-2000:]


def test_nan_message_without_a_checkpoint_and_with_clipping_off():
  c = tiny.get_config()
  c.train.grad_clip = 0.0
  msg = loop._nonfinite_message(3, [], c, {})
  assert "None" not in msg and "No checkpoint was saved" in msg and "grad_clip" in msg


# --- the tools' flags -------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_negative_max_len_is_one_line(cache_dir, tmp_path):
  p = _cli("xlingo.generate", cache_dir, "--config", "configs/tiny.py", "--workdir", tmp_path,
           "--lang", "de", "--max_len", -5, check=False)
  assert p.returncode == 2
  assert "--max_len=-5 must be" in _last_error(p.stderr)


@pytest.mark.parametrize("flag,value", [("max_len", -100), ("max_len", 0), ("top_p", 0),
                                        ("top_p", 1.5), ("top_k", -1), ("temperature", -1),
                                        ("num_samples", 0), ("batch_size", 0), ("seed", -1)])
def test_generate_numeric_flags_name_the_flag(tmp_path, capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    generate.main(["xlingo.generate", "--config", os.path.join(ROOT, "configs", "tiny.py"),
                   f"--workdir={tmp_path}", "--lang", "de", f"--{flag}={value}"])
  assert e.value.code == 2
  assert _last_error(capsys.readouterr().err).startswith(f"xlingo: error: --{flag}={value}")


def test_empty_workdir_names_the_flag(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    generate.main(["xlingo.generate", "--config", os.path.join(ROOT, "configs", "tiny.py"),
                   f"--workdir={tmp_path}", "--lang", "de"])
  assert e.value.code == 2
  err = _last_error(capsys.readouterr().err)
  assert "--workdir" in err and "holds no checkpoint" in err and "init_from" not in err


@pytest.mark.slow
def test_evaluate_unwritable_output_is_refused_before_evaluating(files_run, cache_dir, tmp_path):
  cfg, _, wd = files_run
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me")
  p = _cli("xlingo.evaluate", cache_dir, "--config", cfg, "--workdir", wd, "--output",
           blocker / "results.json", check=False)
  assert p.returncode == 2
  assert "--output" in _last_error(p.stderr) and "validation bits" not in p.stdout
  assert blocker.read_text() == "keep me"


@pytest.mark.slow
def test_evaluate_prints_the_results_when_writing_fails(files_run, tmp_path, capsys, monkeypatch):
  cfg, _, wd = files_run
  out = tmp_path / "results.json"

  def full_disk(path, text, encoding="utf-8"):
    if str(path) == str(out):
      raise OSError(28, "No space left on device")
    with open(path, "w", encoding=encoding) as f:
      f.write(text)

  monkeypatch.setattr("xlingo.paths.write_text", full_disk)
  with pytest.raises(SystemExit) as e:
    evaluate.main(["xlingo.evaluate", "--config", str(cfg), f"--workdir={wd}",
                   f"--output={out}"])
  assert e.value.code == 2
  captured = capsys.readouterr()
  assert "No space left" in _last_error(captured.err)
  assert "validation bits per byte" in captured.out and '"val/bpb/de"' in captured.out


def test_step_shown_as_dash_when_unknown():
  report = {"results": {"export": {"step": None, "metrics": {"val/bpb": 3.0}}}}
  assert "None" not in evaluate.format_table(report, ("en",))


# --- what load_model reads: LoRA workdirs, best/, merged exports -------------------------------


def test_load_model_builds_the_adapted_model_and_reads_best_and_exports(tmp_path):
  """A LoRA workdir's checkpoint (factors beside the base weights) loads with its LoRA side
  paths from its metadata alone (the caller's config has no adapt section), as does ``best/``;
  a merged export loads as plain parameters that compute the same; an unreadable step
  directory is one line."""
  from configs import adapt_tiny

  c = adapt_tiny.get_config()
  c.checkpoint.init_from = "unused"
  c.adapt.mode = "lora"
  adapt.resolve_config(c)
  spec = peft.spec_from_config(c)
  mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c.mesh)
  factory = state_lib.StateFactory(decoder_lib.Decoder(c.model, spec), c, mesh, rules)
  state = factory.init(jax.random.PRNGKey(0))
  # B starts at zero (the side path is then the identity); give it values.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if sharding.path_str(p).endswith("_lora_b") else x, state.params)
  state = state.replace(params=params)
  wd = tmp_path / "lora_run"
  ckpts = ckpt_lib.Checkpoints(str(wd), c)
  ckpts.save(3, state, force=True)
  ckpts.close()
  ckpt_lib.save_best(str(wd), c, state, 3)

  plain = tiny.get_config()
  x = np.arange(16, dtype=np.int32).reshape(2, 8) % 50
  for path in (wd, wd / "best"):
    lm = load_model(plain, str(path))
    assert lm.step == 3 and lm.model.peft == spec
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm.params),
                 jax.device_get(params))
  want = jax.jit(lambda p: lm.model.apply({"params": p}, x)[0])(lm.params)
  export = load.export_merged(lm, str(tmp_path / "export"))
  lm = load_model(plain, export, what="--checkpoint")
  assert lm.step == 3 and lm.model.peft is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm.params),
               jax.device_get(peft.merge_lora(params, spec)))
  got = jax.jit(lambda p: lm.model.apply({"params": p}, x)[0])(lm.params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  # The decoder built from the metadata runs.
  model = decoder_lib.Decoder(lm.config.model)
  assert model.config.num_languages == len(lm.table)

  _garble_state(tmp_path / "export")
  with pytest.raises(CheckpointError, match="is unreadable"):
    load_model(plain, export, what="--checkpoint")


def test_resuming_an_adaptation_with_another_mode_names_adapt_mode(tmp_path):
  """adapt.mode overwrites train.trainable, so advice about train.trainable could never work:
  the message names adapt.mode, the setting that resumes the run."""
  from configs import adapt_tiny

  def config(mode):
    c = adapt_tiny.get_config()
    c.checkpoint.init_from = "unused"
    c.adapt.mode = mode
    adapt.resolve_config(c)
    return c

  saved = restore.checkpoint_meta(config("lora"), 4)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "run"), config("adapter"))
  with pytest.raises(CheckpointError) as e:
    ckpts.check_compatible(4, saved)
  msg = str(e.value)
  assert "saved with adapt.mode='lora' but this config has 'adapter'" in msg, msg
  assert "resume with --config.adapt.mode='lora'" in msg and "train.trainable" not in msg, msg
