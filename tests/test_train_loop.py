"""The LM loop end to end through its command line: train, resume exactly, preemption, errors."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, final_params, metrics_rows, run_module, subprocess_env

STEPS = 24
BASE_ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.py"), f"--config.train.steps={STEPS}",
             "--config.checkpoint.every_steps=4", "--config.train.log_every=2",
             "--config.train.eval_every=12", "--config.checkpoint.keep=10",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]

pytestmark = pytest.mark.slow


def _train(workdir, cache_dir, *extra, check=True, module="xlingo.train", cwd=ROOT):
  return run_module(module, [*BASE_ARGS, f"--workdir={workdir}", *extra], cache_dir, cwd=cwd,
                    check=check)


def _assert_same_run(a, b):
  pa, pb = final_params(a, STEPS), final_params(b, STEPS)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  la = {r["step"]: r["loss"] for r in metrics_rows(a) if "loss" in r}
  lb = {r["step"]: r["loss"] for r in metrics_rows(b) if "loss" in r}
  assert la[STEPS] == lb[STEPS]
  # the cumulative tokens and bytes per language count on exactly from the checkpoint
  ta, tb = ({k: v for k, v in [r for r in metrics_rows(w) if "loss" in r][-1].items()
             if k.startswith(("tokens/", "bytes/"))} for w in (a, b))
  assert ta and ta == tb and any(k.startswith("bytes/") for k in ta)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
  wd = tmp_path_factory.mktemp("baseline")
  p = _train(wd, cache_dir)
  return wd, p


def test_end_to_end_on_8_devices(baseline):
  wd, p = baseline
  assert "xlingo: training finished" in p.stdout
  assert "{'data': 2, 'fsdp': 2, 'tensor': 2}" in p.stdout
  rows = metrics_rows(wd)
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(2, STEPS + 1, 2))
  last = [r for r in rows if "loss" in r][-1]
  for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "step_time_s",
              "input_wait_s"):
    assert key in last and np.isfinite(last[key]), key
  # Per-language training metrics appear for every language over the run (a log window of
  # two small batches need not hold all nine).
  seen = {k for r in rows if "loss" in r for k in r}
  for lang in ("en", "de", "ru", "ja", "zh"):
    assert f"loss/{lang}" in seen and f"bpb/{lang}" in seen, lang
  # tokens/<lang>: the cumulative tokens delivered per language, every log step
  logged = [r for r in rows if "loss" in r]
  totals = [sum(v for k, v in r.items() if k.startswith("tokens/")) for r in logged]
  assert all(len([k for k in r if k.startswith("tokens/")]) == 9 for r in logged)
  assert totals == sorted(totals) and 0.8 * STEPS * 8 * 64 < totals[-1] <= STEPS * 8 * 64
  val = [r for r in rows if "val/bpb/de" in r]
  assert [r["step"] for r in val] == [0, 12, 24]
  # Learning happens: validation bits per byte fall in every language.
  for lang in ("en", "de", "fr", "es", "it", "pt", "ru", "ja", "zh"):
    assert val[-1][f"val/bpb/{lang}"] < val[0][f"val/bpb/{lang}"], lang
  assert os.path.exists(os.path.join(wd, "languages.png"))
  assert os.listdir(os.path.join(wd, "tensorboard"))


def test_sigterm_then_resume_is_exact(baseline, tmp_path, cache_dir):
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "xlingo.train", *BASE_ARGS, f"--workdir={wd}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith("step      6/"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  out.append(rest)
  text = "".join(out)
  assert proc.returncode == 0, text[-3000:]
  assert "preempted (SIGTERM)" in text
  assert "training finished" not in text
  stopped = max(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert 6 <= stopped < STEPS
  p = _train(wd, cache_dir)
  assert f"resumed from {wd / 'checkpoints'} step {stopped}" in p.stdout
  _assert_same_run(baseline[0], wd)


def test_sigkill_then_corrupt_latest_then_resume_is_exact(baseline, tmp_path, cache_dir):
  """SIGKILL after a checkpoint; the newest checkpoint is then corrupted (as a crash during a
  write could leave it); the resumed run falls back to the one before and still ends bitwise
  equal to the uninterrupted run."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "xlingo.train", *BASE_ARGS, f"--workdir={wd}",
         "--config.checkpoint.async_save=False"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (wd / "checkpoints" / "12").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  steps = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert 12 in steps and steps[-1] < STEPS
  latest, previous = steps[-1], steps[-2]
  for root, _, files in os.walk(wd / "checkpoints" / str(latest) / "state"):
    for f in files:
      with open(os.path.join(root, f), "w") as fh:
        fh.write("garbage")
  p = _train(wd, cache_dir)
  assert f"checkpoint step {latest}" in p.stdout and "falling back" in p.stdout
  assert f"resumed from {wd / 'checkpoints'} step {previous}" in p.stdout
  # Nothing lost: the unreadable step is kept aside, not deleted.
  assert any(n.startswith(f"{latest}.unreadable") for n in os.listdir(wd / "checkpoints"))
  _assert_same_run(baseline[0], wd)


def test_relative_workdir_saves_and_resumes(tmp_path, cache_dir):
  # Orbax's array writer needs absolute paths; `--workdir runs/rel` (what the README's demo
  # passes) must still checkpoint, and a second run must resume from it.
  args = ("--config.train.steps=4", "--config.train.eval_every=100")
  _train("runs/rel", cache_dir, *args, cwd=tmp_path)
  assert os.path.isdir(tmp_path / "runs" / "rel" / "checkpoints" / "4" / "state")
  p = _train("runs/rel", cache_dir, "--config.train.steps=8", "--config.train.eval_every=100",
             cwd=tmp_path)
  assert os.path.isdir(tmp_path / "runs" / "rel" / "checkpoints" / "8" / "state")
  assert "resumed from" in p.stdout and "step 4" in p.stdout, p.stdout[-2000:]


def test_incompatible_checkpoint_is_refused(baseline, tmp_path, capsys):
  wd = tmp_path / "run"
  shutil.copytree(baseline[0], wd)
  before = sorted(os.listdir(wd / "checkpoints"))
  with pytest.raises(SystemExit) as e:
    _run_in_process(["--workdir", str(wd), "--config.model.d_model=32"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("xlingo: error:") and "incompatible model" in err and "d_model" in err
  assert sorted(os.listdir(wd / "checkpoints")) == before


def _run_in_process(extra):
  from xlingo import cli, train
  from xlingo.training import loop

  argv = ["xlingo.train", *BASE_ARGS, *extra]
  cli.run_main(argv, train.__doc__, lambda c, w: loop.run(c, w))


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
  wd = tmp_path / "run"
  p = _train(wd, cache_dir, "--config.train.learning_rate=1e30", "--config.train.grad_clip=0",
             "--config.train.optimizer=sgd", "--config.train.eval_every=100", check=False)
  assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
  err = p.stderr.strip().splitlines()[-1]
  assert "non-finite loss or gradient at step" in err
  steps = [int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()]
  import orbax.checkpoint as ocp

  for s in steps:
    tree = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(s), "state"))
    import jax

    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree["params"]))


@pytest.mark.parametrize("args,needle", [
    (["--config.train.no_such_key=1"], "no_such_key"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.train.batch_size=6"], "train.batch_size=6"),
    (["--config.train.eval_context=64"], "train.eval_context=64"),
])
def test_bad_input_one_line_error(tmp_path, capsys, args, needle):
  with pytest.raises(SystemExit) as e:
    _run_in_process(["--workdir", str(tmp_path / "wd"), *args])
  assert e.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith("xlingo: error:") and needle in lines[-1], lines[-3:]
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_missing_config_file_and_unwritable_workdir(tmp_path, capsys):
  from xlingo import cli, train

  with pytest.raises(SystemExit) as e:
    cli.run_main(["xlingo.train", "--config", "configs/nope.py", f"--workdir={tmp_path}"],
                 train.__doc__, lambda c, w: None)
  assert e.value.code == 2
  assert "configs/nope.py" in capsys.readouterr().err.strip().splitlines()[-1]
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me")
  with pytest.raises(SystemExit) as e:
    _run_in_process(["--workdir", str(blocker / "wd")])
  assert e.value.code == 2
  assert "not writable" in capsys.readouterr().err.strip().splitlines()[-1]
  assert blocker.read_text() == "keep me"


def test_console_line_shows_objective_terms_and_says_what_mfu_is_of():
  from xlingo.training import metrics as metrics_lib

  m = {"loss": 3.2, "contrastive_loss": 1.25, "contrastive_acc": 0.375, "kl": 0.5,
       "tokens_per_s": 1000.0, "mfu": 0.8, "input_wait_frac": 0.0}
  cpu = metrics_lib.Progress(10, 0, mfu_measured=True).line(
      2, m, terms=["contrastive_acc", "contrastive_loss", "kl", "lid_loss"])
  assert "contrastive_acc 37.5% contrastive_loss 1.25 kl 0.5 |" in cpu
  assert "lid_loss" not in cpu  # not an active term
  assert "MFU* 80% of measured matmul" in cpu and "MFU 80" not in cpu
  tpu = metrics_lib.Progress(10, 0).line(2, m)
  assert "MFU 80.0%" in tpu and "measured" not in tpu and "kl" not in tpu
