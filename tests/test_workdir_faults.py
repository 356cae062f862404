"""Workdir faults through the real command line: two trainers on one workdir, a trainer killed
with its lock held and a torn metrics.jsonl line, Ctrl-C, a signal during start-up, a config
error in a new workdir, a workdir that is a file, and a full disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, subprocess_env

STEPS = 16
ARGS = ["--config", os.path.join(ROOT, "configs", "tiny.py"), f"--config.train.steps={STEPS}",
        "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=2",
        "--config.train.log_every=2", "--config.train.eval_every=1000"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(cache_dir):
  return subprocess_env(cache_dir)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "xlingo.train", *ARGS, f"--workdir={workdir}", *extra]


def _run(env, workdir, *extra, cwd=ROOT):
  return subprocess.run(_cmd(workdir, *extra), cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


def _start(env, workdir, log, *extra):
  return subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not pred():
    assert proc.poll() is None, f"exited {proc.returncode} before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _one_error_line(p):
  lines = p.stderr.strip().splitlines()
  assert lines and lines[-1].startswith("xlingo: error:"), p.stderr[-2000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  return lines[-1]


def test_two_trainers_ctrl_c_killed_holder_and_torn_metrics(env, tmp_path):
  wd = str(tmp_path / "run")
  first = _start(env, wd, tmp_path / "first.txt")
  _wait_for(lambda: "step      2/" in (tmp_path / "first.txt").read_text(), first, "training")
  # Hold the first trainer still (alive, mid-run) while a second one tries the same workdir.
  first.send_signal(signal.SIGSTOP)
  second = _run(env, wd)
  first.send_signal(signal.SIGCONT)
  assert second.returncode == 2
  err = _one_error_line(second)
  assert "is in use by another trainer" in err and f"pid {first.pid}" in err, err

  # Ctrl-C is a stop request like SIGTERM: save at the next step, exit 0.
  first.send_signal(signal.SIGINT)
  first.wait(timeout=300)
  out = (tmp_path / "first.txt").read_text()
  assert first.returncode == 0, out[-3000:]
  assert "interrupted (SIGINT) at step" in out and "run the same command again" in out.lower()
  stopped = _steps(wd)[-1]

  # A trainer killed outright leaves its lock behind, and a torn last metrics line.
  third = _start(env, wd, tmp_path / "third.txt")
  _wait_for(lambda: _steps(wd)[-1] > stopped, third, "a checkpoint")
  third.kill()
  third.wait()
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 99, "loss": 1.2')

  last = _run(env, wd)
  assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
  assert "taking over the lock of a trainer that is gone (host" in last.stdout
  assert f"pid {third.pid} is not running" in last.stdout
  assert "dropped a torn last line" in last.stdout and "resumed from" in last.stdout
  assert "training finished" in last.stdout
  # One history, every line whole, each logged step once; no more than keep checkpoints.
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == list(range(2, STEPS + 1, 2))
  assert len(_steps(wd)) <= 2 and _steps(wd)[-1] == STEPS


def test_signal_during_start_up_stops_cleanly(env, tmp_path):
  wd = str(tmp_path / "run")
  proc = _start(env, wd, tmp_path / "out.txt")
  # The first line comes before compiling, restoring and evaluating.
  _wait_for(lambda: "xlingo lm: mesh" in (tmp_path / "out.txt").read_text(), proc, "start-up")
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = (tmp_path / "out.txt").read_text()
  assert proc.returncode == 0, out[-3000:]
  assert "stopped by SIGTERM before training step 1; nothing new to save" in out
  assert _steps(wd) == [] and not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  # The lock was released: the same command then trains.
  assert all(json.load(open(os.path.join(wd, "lock", n)))["released"]
             for n in os.listdir(os.path.join(wd, "lock")))


def test_config_error_leaves_nothing_and_workdir_that_is_a_file(env, tmp_path):
  wd = tmp_path / "new" / "run"
  p = _run(env, str(wd), "--config.mesh.data=3")
  assert p.returncode == 2 and "mesh" in _one_error_line(p)
  assert not (tmp_path / "new").exists()
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me")
  p = _run(env, str(blocker))
  assert p.returncode == 2
  assert "is a file, not a directory" in _one_error_line(p)
  assert blocker.read_text() == "keep me"


def _can_mount_tmpfs(path) -> bool:
  os.makedirs(path, exist_ok=True)
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", str(path)], check=True)
  return ok


def test_disk_full_is_one_line_and_keeps_the_checkpoint(env, tmp_path):
  """A real ENOSPC: the workdir is on a small tmpfs, filled up after the first checkpoint."""
  disk = tmp_path / "disk"
  if not _can_mount_tmpfs(disk):
    pytest.skip("needs permission to mount a tmpfs (root) for a real 'no space left on device'")
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(disk)], check=True)
  try:
    wd = str(disk / "run")
    extra = ("--config.checkpoint.every_steps=3",)
    proc = _start(env, wd, tmp_path / "out.txt", *extra)
    _wait_for(lambda: _steps(wd) == [3], proc, "the first checkpoint")
    proc.send_signal(signal.SIGSTOP)
    st = os.statvfs(disk)  # leave 256 KiB: room for metrics rows, not for a checkpoint
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - 256 * 1024),
                    str(disk / "filler")], check=True)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=300)
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 2, out[-3000:]
    err = [line for line in out.splitlines() if line.startswith("xlingo: error:")]
    assert len(err) == 1 and "Traceback" not in out, out[-3000:]
    assert f"disk full while writing to --workdir {wd}" in err[0]
    assert "needs about" in err[0] and "(step 3) is kept" in err[0]
    assert _steps(wd) == [3]
    assert not [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
    # Space again: the same command resumes from the kept checkpoint and finishes.
    os.remove(disk / "filler")
    p = _run(env, wd, *extra)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"resumed from {wd}/checkpoints step 3" in p.stdout
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
