"""A workdir whose layout is wrong, refused by the real trainer before anything is built or
trained: the lock, checkpoints or metrics.jsonl of the wrong kind, a checkpoint step (or the
checkpoints directory) given as --workdir; a malformed lock file taken over; a config error
after the checkpoint manager started leaves no workdir; and the vocabulary CLIs refuse an
output they cannot write before training."""

import json
import os
import subprocess
import sys

import pytest

from xlingo.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.train.steps=2",
        "--config.checkpoint.every_steps=2", "--config.train.eval_every=1000"]


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _refused(p) -> str:
  """The one error line of a command that stopped before any work."""
  assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("xlingo: error: "), p.stderr[-2000:]
  assert "compiled" not in p.stdout and "step " not in p.stdout, p.stdout[-2000:]
  return lines[0]


def _make_file(path, text="keep me"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


@pytest.mark.parametrize("entry,kind,needle", [
    ("lock", "file", "lock is a file, but a run keeps a directory there"),
    ("checkpoints", "file", "checkpoints is a file, but a run keeps a directory there"),
    ("metrics.jsonl", "dir", "metrics.jsonl is a directory, but a run keeps a file there"),
])
def test_layout_entry_of_the_wrong_kind_is_refused_before_training(tmp_path, entry, kind,
                                                                   needle):
  wd = tmp_path / "run"
  (wd / "tensorboard").mkdir(parents=True)
  if kind == "file":
    _make_file(wd / entry)
  else:
    (wd / entry).mkdir()
  err = _refused(_run("xlingo.train", *ARGS, f"--workdir={wd}"))
  assert needle in err and f"move {wd / entry} away" in err, err
  assert sorted(os.listdir(wd)) == sorted(["tensorboard", entry])  # nothing else written
  if kind == "file":
    assert (wd / entry).read_text() == "keep me"


def test_checkpoint_step_or_checkpoints_directory_as_workdir_is_refused(tmp_path):
  run = tmp_path / "run"
  step = run / "checkpoints" / "6"
  for item in ("state", "meta", "data"):
    (step / item).mkdir(parents=True)
  _make_file(step / "meta" / "metadata", "{}")
  err = _refused(_run("xlingo.train", *ARGS, f"--workdir={step}"))
  assert "is a checkpoint step directory" in err and f"--workdir {run}," in err, err
  assert sorted(os.listdir(step)) == ["data", "meta", "state"]
  err = _refused(_run("xlingo.train", *ARGS, f"--workdir={run / 'checkpoints'}"))
  assert "it is a run's checkpoints directory" in err and f"--workdir {run} " in err, err
  assert sorted(os.listdir(run / "checkpoints")) == ["6"]


def test_config_error_after_the_checkpoint_manager_started_leaves_no_workdir(tmp_path):
  wd = tmp_path / "new" / "run"
  p = _run("xlingo.train", *ARGS, f"--workdir={wd}",
           f"--config.checkpoint.init_from={tmp_path / 'no_such_run'}")
  assert p.returncode == 2 and "checkpoint.init_from" in p.stderr, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_lock_file_with_wrong_types_is_taken_over(tmp_path, capsys):
  wd = tmp_path / "run"
  holder = json.loads(json.dumps(workdir_lib.Holder.this_process().__dict__))
  holder["heartbeat"] = "abc"
  _make_file(wd / "lock" / "00000003.json", json.dumps(holder))
  with workdir_lib.WorkdirLock(str(wd), heartbeat_s=3600) as lock:
    assert lock.number == 4
  out = capsys.readouterr().out
  assert "taking over a malformed lock file" in out and 'heartbeat="abc" is not a number' in out
  # Released as usual: the next trainer takes the lock without a word.
  with workdir_lib.WorkdirLock(str(wd), heartbeat_s=3600) as lock:
    assert lock.number == 5
  assert "taking over" not in capsys.readouterr().out


def test_vocab_train_refuses_a_read_only_output_before_training(tmp_path, read_only_dir):
  src = tmp_path / "en.txt"
  src.write_text("one line of text\n" * 50)
  err = _refused(_run("xlingo.data.vocab", "train", "--input", f"en={src}", "--output",
                      str(read_only_dir / "v")))
  assert f"{read_only_dir / 'v'}.model cannot be written" in err, err


def test_vocab_extend_refuses_a_read_only_output_before_training(tmp_path, read_only_dir):
  from xlingo.data import vocab as vocab_lib

  src = tmp_path / "el.txt"
  src.write_text("Καλημέρα κόσμε\n" * 50)
  p = _run("xlingo.data.vocab", "extend", "--vocab", vocab_lib.embedded_vocab_path(),
           "--input", f"el={src}", "--new_pieces", "8", "--output", str(read_only_dir / "v"))
  assert f"{read_only_dir / 'v'}.model cannot be written" in _refused(p)
