"""A gs:// trainer whose storage goes away, against an emulator each test starts itself: killed
and restarted on the same port, or paused (SIGSTOP: connections accepted, nothing answered).

Within ``checkpoint.storage_retry_s`` the run goes on and finishes as if nothing happened;
past it the run stops with one line (what failed, since when, the last good checkpoint, the
command that resumes), and that command resumes once the store is back; a SIGTERM while a save
is stuck ends the run within a bounded time.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _cmd(emu, retry_s):
  return [sys.executable, "-m", "xlingo.train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
          f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
          "--config.train.log_every=2", "--config.train.eval_every=1000",
          f"--config.checkpoint.storage_retry_s={retry_s}", "--workdir=gs://bkt/run"]


def _env(emu, cache_dir):
  env = dict(os.environ, **emu.env, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  return env


class Trainer:
  """The trainer in a subprocess, its output collected line by line."""

  def __init__(self, cmd, env, cwd):
    self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                     daemon=True)
    self._reader.start()

  def wait_for(self, prefix: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in self.lines):
      assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output[-3000:]}"
      assert time.monotonic() < deadline, f"no {prefix!r} in time:\n{self.output[-3000:]}"
      time.sleep(0.05)

  def finish(self, timeout: float = 400) -> int:
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=30)
    return self.proc.returncode

  @property
  def output(self) -> str:
    return "".join(self.lines)


def _saved_steps(emu):
  d = os.path.join(emu.root, "bkt", "run", "checkpoints")
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.isfile(os.path.join(d, n, "meta", "metadata")))


def _logged_steps(emu):
  with open(os.path.join(emu.root, "bkt", "run", "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def test_store_paused_then_killed_within_the_bound_is_survived(own_gcs_emulator, cache_dir,
                                                                tmp_path):
  emu = own_gcs_emulator
  emu.bucket("bkt")
  run = Trainer(_cmd(emu, 240), _env(emu, cache_dir), tmp_path)
  run.wait_for("step      4/")
  emu.pause()  # a store that stops answering mid-run
  time.sleep(8)
  emu.resume()
  run.wait_for("step      8/")
  emu.kill()  # a store that goes away, for longer than gcsfs' and tensorstore's own retries
  time.sleep(40)
  emu.start()
  assert run.finish() == 0, run.output[-4000:]
  out = run.output
  assert "training finished" in out and "Traceback" not in out, out[-4000:]
  assert "failed (" in out and "retrying for up to" in out, out[-4000:]
  assert "xlingo: error" not in out
  assert _saved_steps(emu)[-1] == STEPS
  assert _logged_steps(emu) == list(range(2, STEPS + 1, 2))  # every row once, none lost


def test_store_away_past_the_bound_stops_with_one_line_and_resumes(own_gcs_emulator, cache_dir,
                                                                   tmp_path):
  emu = own_gcs_emulator
  emu.bucket("bkt")
  cmd, env = _cmd(emu, 15), _env(emu, cache_dir)
  run = Trainer(cmd, env, tmp_path)
  run.wait_for("step      6/")
  emu.kill()
  t0 = time.monotonic()
  code = run.finish(timeout=200)
  took = time.monotonic() - t0
  out = run.output
  assert code == 2, out[-4000:]
  errors = [line for line in out.splitlines() if line.startswith("xlingo: error:")]
  assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
  err = errors[0]
  assert "gs://bkt/run failed (" in err and "checkpoint.storage_retry_s=15 s ran out" in err, err
  assert "the storage failed from 20" in err and "the last good checkpoint is step " in err, err
  assert "resume with: " in err and "-m xlingo.train" in err and "--workdir=gs://bkt/run" in err
  assert took < 15 + 60 + 30, took  # the window, one gcsfs/tensorstore try, margin
  last = int(err.split("the last good checkpoint is step ")[1].split(".")[0])
  assert last >= 2

  emu.start()
  again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert f"resumed from gs://bkt/run/checkpoints step {last}" in again.stdout
  assert "training finished" in again.stdout and _saved_steps(emu)[-1] == STEPS


def test_sigterm_while_a_save_is_stuck_ends_the_run_in_bounded_time(own_gcs_emulator,
                                                                     cache_dir, tmp_path):
  emu = own_gcs_emulator
  emu.bucket("bkt")
  run = Trainer(_cmd(emu, 600), _env(emu, cache_dir), tmp_path)
  run.wait_for("step      6/")
  emu.pause()
  time.sleep(4)
  run.proc.send_signal(signal.SIGTERM)
  t0 = time.monotonic()
  code = run.finish(timeout=120)
  took = time.monotonic() - t0
  emu.resume()
  out = run.output
  assert code == 2, out[-4000:]
  errors = [line for line in out.splitlines() if line.startswith("xlingo: error:")]
  assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
  assert "a stop request came while it was stuck" in errors[0], errors[0]
  assert "the last good checkpoint is step " in errors[0] and "resume with: " in errors[0]
  assert took < 60, took  # Retrying.GRACE_S (15 s) after the signal, and the exit
