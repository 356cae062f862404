"""Tests for launch/tpu.py, the Cloud TPU VM launcher, against a fake `gcloud` on PATH."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PY = os.path.join(ROOT, "launch", "tpu.py")
TPU_SH = os.path.join(ROOT, "launch", "tpu.sh")

_spec = importlib.util.spec_from_file_location("xlingo_launch_tpu", TPU_PY)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

# The fake gcloud: logs its argv as a JSON line; `describe` answers from the scripted
# FAKE_STATES sequence (the last state repeats); the worker-0 status check answers "running"
# until the FAKE_FINISH_AT-th check, then the completion marker. With FAKE_EXEC_HOME set,
# `ssh --command=...` runs the command with bash and HOME set to it (a local stand-in worker).
FAKE_GCLOUD = textwrap.dedent("""\
  #!{python}
  import json, os, subprocess, sys
  argv = sys.argv[1:]
  log = os.environ["FAKE_GCLOUD_LOG"]
  with open(log, "a") as f:
    f.write(json.dumps(argv) + "\\n")

  def bump(counter):
    path = log + "." + counter
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    open(path, "w").write(str(n))
    return n

  command = next((a[len("--command="):] for a in argv if a.startswith("--command=")), None)
  if "describe" in argv:
    states = os.environ.get("FAKE_STATES", "READY").split(",")
    print(states[min(bump("describe"), len(states)) - 1])
  elif command is not None and os.environ.get("FAKE_EXEC_HOME"):
    env = dict(os.environ, HOME=os.environ["FAKE_EXEC_HOME"])
    sys.exit(subprocess.run(["bash", "-c", command], env=env).returncode)
  elif command is not None and {marker!r} in command:
    n = bump("check")
    finish_at = int(os.environ.get("FAKE_FINISH_AT", "0"))
    print({marker!r} if finish_at and n >= finish_at else "running")
  sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  """A fake gcloud first on PATH; returns a function giving the argv lists it was called with."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(FAKE_GCLOUD.format(python=sys.executable, marker=tpu.FINISHED_MARKER))
  fake.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.delenv("GCLOUD", raising=False)
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  for var in ("FAKE_STATES", "FAKE_FINISH_AT", "FAKE_EXEC_HOME", "FAKE_EXIT"):
    monkeypatch.delenv(var, raising=False)

  def calls():
    if not log.exists():
      return []
    return [json.loads(line) for line in log.read_text().splitlines()]

  return calls


BASE = ["--name", "my-tpu", "--zone", "us-west4-a"]
RUN = ["--workdir", "gs://bucket/runs/r1", "--module", "xlingo.train",
       "--config", "configs/tpu_1b.py"]
CREATE = ["--accelerator-type", "v5litepod-16"]


def _ssh_command(argv):
  return next(a[len("--command="):] for a in argv if a.startswith("--command="))


def _kinds(calls):
  """A short label per gcloud call, e.g. 'tpu-vm describe', 'ssh:all'."""
  out = []
  for c in calls:
    if c[3] == "ssh":
      out.append("ssh:" + next(a.split("=")[1] for a in c if a.startswith("--worker=")))
    else:
      out.append(f"{c[2]} {c[3]}")
  return out


def test_dry_run_prints_commands_and_never_calls_gcloud(gcloud, capsys):
  assert tpu.main(["--dry-run", "create", *BASE, *CREATE, "--spot"]) == 0
  assert tpu.main(["--dry-run", "run", *BASE, *RUN, "--", "--config.train.steps=5"]) == 0
  assert tpu.main(["delete", *BASE, "--queued", "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert gcloud() == []
  assert len(lines) == 3 and all(line.startswith("+ gcloud ") for line in lines)
  assert shlex.split(lines[0][2:]) == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
    "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base", "--spot"]
  run = shlex.split(lines[1][2:])
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in run
  assert "-m xlingo.train --config configs/tpu_1b.py --workdir gs://bucket/runs/r1 " \
         "--config.train.steps=5" in _ssh_command(run)
  assert shlex.split(lines[2][2:]) == [
    "gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone=us-west4-a",
    "--force", "--quiet"]


def test_dry_run_watch_shows_poll_and_recovery(gcloud, capsys):
  argv = ["--dry-run", "watch", *BASE, *CREATE, "--spot", "--queued", "--repo-url",
          "https://example.com/xlingo.git", *RUN]
  assert tpu.main(argv) == 0
  out = capsys.readouterr().out
  assert gcloud() == []
  assert "queued-resources describe my-tpu" in out and "value(state.state)" in out
  assert "queued-resources create my-tpu" in out and "--node-id=my-tpu" in out


def test_create_tpu_vm_and_queued(gcloud):
  assert tpu.main(["create", *BASE, *CREATE, "--spot", "--project", "proj"]) == 0
  assert tpu.main(["create", *BASE, "--accelerator-type", "v4-32", "--queued", "--spot",
                   "--version", "tpu-vm-v4-base"]) == 0
  assert tpu.main(["create", *BASE, *CREATE]) == 0
  vm, queued, plain = gcloud()
  assert vm == ["compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
                "--project=proj", "--accelerator-type=v5litepod-16",
                "--version=tpu-ubuntu2204-base", "--spot"]
  assert queued == ["compute", "tpus", "queued-resources", "create", "my-tpu",
                    "--zone=us-west4-a", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-vm-v4-base", "--node-id=my-tpu", "--spot"]
  assert "--spot" not in plain


def test_gcloud_from_env_var(gcloud, tmp_path, monkeypatch):
  other = tmp_path / "bin" / "my-gcloud"
  other.symlink_to(tmp_path / "bin" / "gcloud")
  monkeypatch.setenv("GCLOUD", str(other))
  assert tpu.main(["delete", *BASE]) == 0
  assert gcloud() == [["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a",
                       "--quiet"]]


def test_install_from_repo_url(gcloud):
  assert tpu.main(["install", *BASE, "--repo-url", "https://example.com/x.git",
                   "--ref", "main"]) == 0
  (call,) = gcloud()
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a"]
  assert "--worker=all" in call
  cmd = _ssh_command(call)
  assert "git clone -q --depth 1 --branch main https://example.com/x.git" in cmd
  assert "-e $HOME/xlingo" in cmd and "jax[tpu]" in cmd and tpu.LIBTPU_INDEX in cmd


def test_install_from_local_copies_git_archive(gcloud):
  assert tpu.main(["install", *BASE, "--from-local"]) == 0
  scp, ssh = gcloud()
  assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[5].endswith("xlingo.tar.gz") and scp[6] == "my-tpu:xlingo.tar.gz"
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert "tar -xzf $HOME/xlingo.tar.gz" in _ssh_command(ssh)
  assert tpu.pip_install_script() in _ssh_command(ssh)


def test_run_and_logs(gcloud, capsys):
  assert tpu.main(["run", *BASE, *RUN, "--run-name", "exp1", "--",
                   "--config.train.steps=10", "--config.note=a b"]) == 0
  assert tpu.main(["logs", *BASE, "--run", "exp1", "--worker", "3"]) == 0
  run, logs = gcloud()
  assert "--worker=all" in run
  cmd = _ssh_command(run)
  assert "nohup $HOME/xlingo_venv/bin/python -m xlingo.train" in cmd
  assert "--config.train.steps=10 '--config.note=a b' >> $HOME/xlingo_logs/exp1.log" in cmd
  assert "> $HOME/xlingo_logs/exp1.cmd" in cmd
  assert "--worker=3" in logs
  assert _ssh_command(logs) == "tail -n 100 $HOME/xlingo_logs/exp1.log"
  assert "-m xlingo.train --config configs/tpu_1b.py" in capsys.readouterr().out


def test_run_script_on_a_local_stand_in_worker(gcloud, tmp_path, monkeypatch):
  """The remote run and status scripts, executed by bash in a fake home directory."""
  home = tmp_path / "home"
  (home / "xlingo").mkdir(parents=True)
  venv_bin = home / "xlingo_venv" / "bin"
  venv_bin.mkdir(parents=True)
  python = venv_bin / "python"
  python.write_text(f"#!/bin/sh\necho \"args: $*\"\necho '{tpu.FINISHED_MARKER}'\n")
  python.chmod(0o755)
  monkeypatch.setenv("FAKE_EXEC_HOME", str(home))
  assert tpu.main(["run", *BASE, *RUN, "--", "--config.note=a b"]) == 0
  args = tpu.parse(["watch", *BASE, *CREATE, "--from-local", *RUN])
  runner = tpu.Runner()
  for _ in range(100):  # the trainer runs in the background; wait for it to finish
    if tpu.run_status(runner, args) == "finished":
      break
  else:
    pytest.fail("the stand-in trainer never finished")
  log = (home / "xlingo_logs" / "r1.log").read_text()
  assert ("args: -m xlingo.train --config configs/tpu_1b.py --workdir gs://bucket/runs/r1 "
          "--config.note=a b") in log
  cmd = (home / "xlingo_logs" / "r1.cmd").read_text()
  assert "xlingo_venv/bin/python -m xlingo.train" in cmd


def test_watch_relaunches_after_preemption_and_stops_on_completion(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATES", "READY,PREEMPTED,CREATING,READY")
  monkeypatch.setenv("FAKE_FINISH_AT", "2")
  argv = ["watch", *BASE, *CREATE, "--spot", "--repo-url", "https://example.com/x.git", *RUN,
          "--poll-seconds", "0", "--max-polls", "20"]
  assert tpu.main(argv) == 0
  calls = gcloud()
  assert _kinds(calls) == [
    "tpu-vm describe", "ssh:0",              # READY: still running
    "tpu-vm describe",                       # PREEMPTED
    "tpu-vm delete", "tpu-vm create",        # ... so recreate it
    "tpu-vm describe",                       # CREATING: wait
    "tpu-vm describe", "ssh:all", "ssh:all",  # READY: install, run
    "tpu-vm describe", "ssh:0",              # finished
  ]
  create = calls[4]
  assert "--spot" in create and "--accelerator-type=v5litepod-16" in create
  assert "git clone" in _ssh_command(calls[7])
  assert "nohup" in _ssh_command(calls[8])
  assert tpu.FINISHED_MARKER in _ssh_command(calls[-1])


def test_watch_queued_resource_suspended(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATES", "SUSPENDED,WAITING_FOR_RESOURCES,ACTIVE")
  monkeypatch.setenv("FAKE_FINISH_AT", "1")
  argv = ["watch", *BASE, *CREATE, "--spot", "--queued", "--from-local", *RUN,
          "--poll-seconds", "0", "--max-polls", "10"]
  assert tpu.main(argv) == 0
  kinds = _kinds(gcloud())
  assert kinds[:4] == ["queued-resources describe", "queued-resources delete",
                       "queued-resources create", "queued-resources describe"]
  assert kinds[4:] == ["queued-resources describe", "tpu-vm scp", "ssh:all", "ssh:all",
                       "queued-resources describe", "ssh:0"]
  delete = gcloud()[1]
  assert "--force" in delete


def test_watch_gives_up_after_max_restarts(gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_STATES", "PREEMPTED")
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, "--poll-seconds", "0",
          "--max-polls", "50", "--max-restarts", "1", "--launch"]
  assert tpu.main(argv) == 1
  assert _kinds(gcloud()).count("tpu-vm create") == 1
  assert "giving up" in capsys.readouterr().out


def test_watch_stops_after_max_polls(gcloud):
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, "--poll-seconds", "0",
          "--max-polls", "3"]
  assert tpu.main(argv) == 0
  assert _kinds(gcloud()) == ["tpu-vm describe", "ssh:0"] * 3


@pytest.mark.parametrize("argv, message", [
  (["create", *BASE], "required: --accelerator-type"),
  (["create", *BASE, "--accelerator-type", "tpu16"], "invalid --accelerator-type"),
  (["create", "--name", "My_TPU", "--zone", "us-west4-a", *CREATE], "invalid --name"),
  (["create", "--name", "t", "--zone", "west", *CREATE], "invalid --zone"),
  (["install", *BASE], "one of the arguments --repo-url --from-local is required"),
  (["install", *BASE, "--from-local", "--repo-url", "u"], "not allowed with"),
  (["run", *BASE, *RUN[:-2]], "required: --config"),
  (["run", *BASE, *RUN[2:], "--workdir", "/tmp/w"], "invalid --workdir"),
  (["run", *BASE, *RUN[:2], "--module", "xlingo.nope", *RUN[4:]], "invalid choice"),
  (["run", *BASE, *RUN, "--", "steps=3"], "invalid extra trainer argument"),
  (["delete", *BASE, "--", "--config.x=1"], "takes no trainer arguments"),
  (["watch", *BASE, *CREATE, "--from-local", *RUN, "--max-restarts", "-1"], ">= 0"),
  (["frobnicate"], "invalid choice"),
  ([], "required: command"),
])
def test_bad_arguments_exit_2_with_one_line(gcloud, capsys, argv, message):
  assert tpu.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("tpu.py: error: ") and message in err
  assert gcloud() == []


def test_missing_gcloud_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("GCLOUD", str(tmp_path / "no-such-gcloud"))
  assert tpu.main(["delete", *BASE]) == 1
  assert "gcloud not found" in capsys.readouterr().err


def test_shell_wrapper(gcloud):
  proc = subprocess.run([TPU_SH, "--dry-run", "status", *BASE], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("+ gcloud compute tpus tpu-vm describe my-tpu")
  proc = subprocess.run([TPU_SH, "status"], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert gcloud() == []
