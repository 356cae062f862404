"""Tests for launch/tpu.py, the Cloud TPU VM launcher, against a fake `gcloud` on PATH."""

import ast
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PY = os.path.join(ROOT, "launch", "tpu.py")
TPU_SH = os.path.join(ROOT, "launch", "tpu.sh")

_spec = importlib.util.spec_from_file_location("xlingo_launch_tpu", TPU_PY)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

# The fake gcloud logs its argv as a JSON line. `describe` answers from the scripted FAKE_STATES
# sequence (the last state repeats); at the FAKE_HOOK_AT-th describe it first runs FAKE_HOOK with
# sh. A status check answers from FAKE_STATUS: polls separated by ',', each poll's workers by
# '|' (the last poll repeats). With FAKE_EXEC_HOMES set (directories separated by os.pathsep),
# `ssh --command=...` runs the command with sh on stand-in workers instead: --worker=all on
# every directory, --worker=N on the N-th, each as HOME, with FAKE_SHELL (default sh).
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

  def scripted(var, default, n):
    seq = os.environ.get(var, default).split(",")
    return seq[min(n, len(seq)) - 1]

  command = next((a[len("--command="):] for a in argv if a.startswith("--command=")), None)
  worker = next((a[len("--worker="):] for a in argv if a.startswith("--worker=")), "0")
  if argv[:2] == ["config", "list"]:
    print(os.environ.get("FAKE_CONFIG", '{{"core": {{"account": "me@example.com", '
                                        '"project": "proj"}}}}'))
  elif "describe" in argv:
    n = bump("describe")
    if os.environ.get("FAKE_HOOK") and n == int(os.environ.get("FAKE_HOOK_AT", "0")):
      subprocess.run(["sh", "-c", os.environ["FAKE_HOOK"]], check=True)
    print(scripted("FAKE_STATES", "READY", n))
  elif command is not None and os.environ.get("FAKE_EXEC_HOMES"):
    homes = os.environ["FAKE_EXEC_HOMES"].split(os.pathsep)
    rc = 0
    for home in homes if worker == "all" else [homes[int(worker)]]:
      env = dict(os.environ, HOME=home)
      shell = os.environ.get("FAKE_SHELL", "sh")
      rc = max(rc, subprocess.run([shell, "-c", command], env=env).returncode)
    sys.exit(rc)
  elif command is not None and {prefix!r} in command:
    for i, s in enumerate(scripted("FAKE_STATUS", "running", bump("status")).split("|")):
      print({prefix!r} + " " + s + " w" + str(i))
  sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
""")

FAKE_VARS = ("FAKE_STATES", "FAKE_STATUS", "FAKE_EXEC_HOMES", "FAKE_SHELL", "FAKE_EXIT",
             "FAKE_HOOK", "FAKE_HOOK_AT", "FAKE_CONFIG")


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A fake gcloud first on PATH; returns a function giving the argv lists it was called with,
  except `gcloud config list` (the preflight reading which project and account gcloud would
  use: a local read, no cloud action). FAKE_CONFIG is what that read prints."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(FAKE_GCLOUD.format(python=sys.executable, prefix=tpu.STATUS_PREFIX))
  fake.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.delenv("GCLOUD", raising=False)
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  for var in FAKE_VARS:
    monkeypatch.delenv(var, raising=False)

  def calls():
    if not log.exists():
      return []
    argvs = [json.loads(line) for line in log.read_text().splitlines()]
    return [a for a in argvs if a[:2] != ["config", "list"]]

  return calls


@pytest.fixture
def gcloud(fake_gcloud, monkeypatch):
  """fake_gcloud, with the preflight's local load of --config left out: these tests are about
  the launcher's commands and remote scripts (the config check has its own tests below)."""
  monkeypatch.setattr(tpu.tpu_preflight, "check_config", lambda *a: None)
  return fake_gcloud


BASE = ["--name", "my-tpu", "--zone", "us-west4-a"]
RUN = ["--workdir", "gs://bucket/runs/r1", "--module", "xlingo.train",
       "--config", "configs/tpu_1b.py"]
CREATE = ["--accelerator-type", "v5litepod-16"]
FAST = ["--poll-seconds", "0", "--grace-seconds", "1"]


def _ssh_command(argv):
  return next(a[len("--command="):] for a in argv if a.startswith("--command="))


def _kinds(calls):
  """A short label per gcloud call, e.g. 'queued-resources describe', 'ssh:all'."""
  out = []
  for c in calls:
    if c[3] == "ssh":
      out.append("ssh:" + next(a.split("=")[1] for a in c if a.startswith("--worker=")))
    else:
      out.append(f"{c[2]} {c[3]}")
  return out


def _printed(out):
  """The argv of each '+ ' line of a dry run."""
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------------------------
# Creating, deleting, status.


@pytest.mark.parametrize("accel, version", [
  ("v4-32", "tpu-ubuntu2204-base"),
  ("v5litepod-16", "v2-alpha-tpuv5-lite"),
  ("v5p-64", "v2-alpha-tpuv5"),
  ("v6e-16", "v2-alpha-tpuv6e"),
  ("v3-8", "tpu-ubuntu2204-base"),
  ("v2-8", "tpu-ubuntu2204-base"),
])
def test_runtime_version_follows_the_accelerator_family(gcloud, capsys, accel, version):
  # --any-zone: BASE's zone has v5e only; this is about the version.
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", accel, "--any-zone"]) == 0
  assert _printed(capsys.readouterr().out) == [[
    "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--zone=us-west4-a",
    f"--accelerator-type={accel}", f"--runtime-version={version}", "--node-id=my-tpu"]]
  assert gcloud() == []


def test_version_flag_overrides_the_family_and_unknown_families_need_it(gcloud, capsys):
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", "v6e-16", "--direct",
                   "--version", "v2-alpha-tpuv6e-custom", "--any-zone"]) == 0
  assert "--version=v2-alpha-tpuv6e-custom" in _printed(capsys.readouterr().out)[0]
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", "v9-8"]) == 2
  err = capsys.readouterr().err
  assert "no known runtime version for accelerator family 'v9'; pass --version" in err
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", "v9-8",
                   "--version", "v2-alpha-tpuv9"]) == 0
  assert "--runtime-version=v2-alpha-tpuv9" in _printed(capsys.readouterr().out)[0]


def test_create_queued_by_default_and_direct_on_request(gcloud):
  assert tpu.main(["create", *BASE, *CREATE, "--spot", "--project", "proj"]) == 0
  assert tpu.main(["create", *BASE, "--accelerator-type", "v4-32", "--direct", "--spot",
                   "--internal-ips", "--any-zone"]) == 0
  assert tpu.main(["create", *BASE, "--accelerator-type", "v6e-16", "--queued",
                   "--internal-ips", "--any-zone"]) == 0
  queued, direct, internal = gcloud()
  assert queued == ["compute", "tpus", "queued-resources", "create", "my-tpu",
                    "--zone=us-west4-a", "--project=proj", "--accelerator-type=v5litepod-16",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=my-tpu", "--spot"]
  assert direct == ["compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
                    "--internal-ips"]
  assert internal[-1] == "--internal-ips" and "--spot" not in internal


def test_delete_and_status_follow_the_way_it_was_created(gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_STATES", "ACTIVE")
  assert tpu.main(["delete", *BASE]) == 0
  assert tpu.main(["delete", *BASE, "--direct"]) == 0
  assert tpu.main(["status", *BASE]) == 0
  assert tpu.main(["status", *BASE, "--direct"]) == 0
  assert capsys.readouterr().out.split() == ["ACTIVE", "ACTIVE"]
  assert gcloud() == [
    ["compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone=us-west4-a", "--force",
     "--quiet"],
    ["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a", "--quiet"],
    ["compute", "tpus", "queued-resources", "describe", "my-tpu", "--zone=us-west4-a",
     "--format=value(state.state)"],
    ["compute", "tpus", "tpu-vm", "describe", "my-tpu", "--zone=us-west4-a",
     "--format=value(state)"]]


def test_status_of_a_missing_node_hints_at_the_other_kind(gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_EXIT", "1")
  assert tpu.main(["status", *BASE]) == 1
  assert "was it created with --direct?" in capsys.readouterr().out


def test_gcloud_from_env_var(gcloud, tmp_path, monkeypatch):
  other = tmp_path / "bin" / "my-gcloud"
  other.symlink_to(tmp_path / "bin" / "gcloud")
  monkeypatch.setenv("GCLOUD", str(other))
  assert tpu.main(["delete", *BASE, "--direct"]) == 0
  assert gcloud() == [["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a",
                       "--quiet"]]


# ---------------------------------------------------------------------------------------------
# Installing.


def _setup_requirements():
  """INSTALL_REQUIRES and EXTRAS of setup.py, read without running it."""
  tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
  found = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
      found[node.targets[0].id] = ast.literal_eval(node.value)
  return found["INSTALL_REQUIRES"], found["EXTRAS"]


def test_install_uses_the_tpu_extra_and_libtpu_from_pypi(gcloud):
  requires, extras = _setup_requirements()
  (cpu_jax,) = [r for r in requires if r.startswith("jax[cpu]==")]
  (tpu_jax,) = [r for r in extras["tpu"] if r.startswith("jax[tpu]==")]
  assert tpu_jax.split("==")[1] == cpu_jax.split("==")[1]
  assert tpu.main(["install", *BASE, "--repo-url", "https://example.com/x.git",
                   "--ref", "main"]) == 0
  (call,) = gcloud()
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a"]
  assert "--worker=all" in call
  cmd = _ssh_command(call)
  assert "git clone -q --depth 1 --branch main https://example.com/x.git $HOME/xlingo" in cmd
  assert "git -C $HOME/xlingo rev-parse HEAD > $HOME/xlingo/.xlingo_commit" in cmd
  assert ("cd $HOME/xlingo && $HOME/.local/bin/uv pip install -q --python "
          "$HOME/xlingo_venv/bin/python -e '.[tpu]'") in cmd
  assert "libtpu" not in cmd and " -f " not in cmd and "find-links" not in cmd
  assert not hasattr(tpu, "LIBTPU_INDEX")


def test_install_a_pinned_commit_from_a_repo_url(gcloud):
  sha = "0123456789abcdef0123456789abcdef01234567"
  assert tpu.main(["install", *BASE, "--repo-url", "https://example.com/x.git",
                   "--commit", sha, "--internal-ips"]) == 0
  (call,) = gcloud()
  assert "--internal-ip" in call
  cmd = _ssh_command(call)
  assert (f"git clone -q --no-checkout https://example.com/x.git $HOME/xlingo && "
          f"git -C $HOME/xlingo checkout -q {sha}") in cmd


def test_install_from_local_copies_a_commit_and_records_it(gcloud):
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  assert tpu.main(["install", *BASE, "--from-local", "--internal-ips"]) == 0
  scp, ssh = gcloud()
  assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[5].endswith("xlingo.tar.gz") and scp[6] == "my-tpu:xlingo.tar.gz"
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert "--internal-ip" in scp and "--internal-ip" in ssh
  cmd = _ssh_command(ssh)
  assert "tar -xzf $HOME/xlingo.tar.gz" in cmd
  assert f"echo {head} > $HOME/xlingo/.xlingo_commit" in cmd
  assert tpu.pip_install_script() in cmd
  # The install refuses while a launcher-started trainer runs (it would delete its code).
  assert "a trainer is running" in cmd and tpu.RUN_ENV in cmd


# ---------------------------------------------------------------------------------------------
# Running and stopping, on stand-in workers (directories used as HOME; the remote scripts run
# for real under sh).

# A stand-in for the venv's python. Each start reads its behaviour from line N of $HOME/modes
# (N counts the starts): 'term' waits and exits 0 on SIGTERM, 'hang' ignores SIGTERM (like a
# trainer stuck in a collective) and has two children, one of them without the run's marker in
# its environment (only the process-group signal reaches it), 'finish' prints the completion
# marker, 'exit' exits 0 silently (a non-zero process at the end of training).
STAND_IN = textwrap.dedent("""\
  #!/bin/sh
  n=$(( $(cat "$HOME/launches" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$HOME/launches"
  echo "args: $*"
  case "$(sed -n "${{n}}p" "$HOME/modes" 2>/dev/null)" in
    hang) trap '' TERM; env -i sleep 300 & echo "$!" > "$HOME/bare.pid"
          sleep 300 & echo "$!" > "$HOME/child.pid"; sleep 300 ;;
    finish) echo '{marker}' ;;
    exit) ;;
    *) trap 'echo "got TERM"; exit 0' TERM; sleep 300 & echo "$!" > "$HOME/child.pid"; wait ;;
  esac
""")


def _alive(pid):
  """True while pid exists and is not a zombie."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (FileNotFoundError, ProcessLookupError):
    return False


def _wait_for(predicate, what, timeout=20.0):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return
    time.sleep(0.05)
  pytest.fail(f"timed out waiting for {what}")


def _launched_by(home):
  """Pids of live processes the launcher started with this HOME (for checks and clean-up)."""
  out = []
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/environ", "rb") as f:
        env = f.read().split(b"\0")
    except OSError:
      continue
    if f"HOME={home}".encode() in env and any(e.startswith(tpu.RUN_ENV.encode()) for e in env):
      if _alive(d):
        out.append(int(d))
  return out


@pytest.fixture
def workers(gcloud, tmp_path, monkeypatch):
  """make(n, modes) -> n stand-in worker homes; every process they started is killed after."""
  homes = []

  def make(n, modes=("term",)):
    for i in range(n):
      home = tmp_path / f"worker{i}"
      (home / "xlingo").mkdir(parents=True)
      (home / "xlingo_venv" / "bin").mkdir(parents=True)
      python = home / "xlingo_venv" / "bin" / "python"
      python.write_text(STAND_IN.format(marker=tpu.FINISHED_MARKER))
      python.chmod(0o755)
      mine = modes[i] if i < len(modes) else []
      (home / "modes").write_text("".join(f"{m}\n" for m in ([mine] if isinstance(mine, str)
                                                               else mine)))
      homes.append(home)
    monkeypatch.setenv("FAKE_EXEC_HOMES", os.pathsep.join(str(h) for h in homes))
    return homes

  yield make
  for home in homes:
    pids = _launched_by(home)
    if (home / "bare.pid").exists():
      bare = (home / "bare.pid").read_text().strip()
      try:
        if open(f"/proc/{bare}/cmdline", "rb").read() == b"sleep\x00300\x00":
          pids.append(int(bare))
      except OSError:
        pass
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def _trainer_pid(home, run="r1"):
  return int((home / "xlingo_logs" / f"{run}.pid").read_text())


def test_run_script_on_a_local_stand_in_worker(workers, capfd):
  (home,) = workers(1, modes=["finish"])
  assert tpu.main(["run", *BASE, *RUN, "--", "--config.note=a b"]) == 0
  args = tpu.parse(["watch", *BASE, *CREATE, "--from-local", *RUN])
  _wait_for(lambda: tpu.run_status(tpu.Runner(), args) == "finished", "the stand-in to finish")
  log = (home / "xlingo_logs" / "r1.log").read_text()
  assert log.startswith(f"{tpu.START_HEADER} ") and " commit unknown\n" in log
  assert ("args: -m xlingo.train --config configs/tpu_1b.py --workdir gs://bucket/runs/r1 "
          "--config.note=a b") in log
  cmd = (home / "xlingo_logs" / "r1.cmd").read_text()
  assert "xlingo_venv/bin/python -m xlingo.train" in cmd
  assert "started r1 on" in capfd.readouterr().out


def test_stop_kills_a_hung_trainer_and_its_child_then_run_starts_again(workers, capfd):
  (home,) = workers(1, modes=[["hang", "term"]])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "child.pid").exists(), "the stand-in to start its child")
  trainer, child = _trainer_pid(home), int((home / "child.pid").read_text())
  bare = int((home / "bare.pid").read_text())
  assert os.getpgid(trainer) == trainer and os.getpgid(child) == os.getpgid(bare) == trainer
  capfd.readouterr()
  assert tpu.main(["run", *BASE, *RUN]) == 1  # refused while the old trainer lives
  assert "r1 is already running" in capfd.readouterr().err
  assert tpu.main(["stop", *BASE, "--run", "r1", "--grace-seconds", "1"]) == 0
  assert "stopped r1 on" in capfd.readouterr().out
  assert not _alive(trainer) and not _alive(child) and not _alive(bare)
  (home / "child.pid").unlink()
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "launches").read_text().strip() == "2", "the second start")


def test_install_refuses_to_replace_the_code_under_a_running_trainer(workers, capfd):
  (home,) = workers(1, modes=["term"])
  (home / "xlingo" / "keep").write_text("installed code")
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "child.pid").exists(), "the stand-in to start")
  capfd.readouterr()
  assert tpu.main(["install", *BASE, "--repo-url", "https://example.invalid/x.git"]) == 1
  assert "a trainer is running on" in capfd.readouterr().err
  assert (home / "xlingo" / "keep").read_text() == "installed code"


def test_stop_reports_kill_only_when_term_is_ignored(workers, capfd):
  (home,) = workers(1, modes=["hang"])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "child.pid").exists(), "the stand-in to start")
  capfd.readouterr()
  assert tpu.main(["stop", *BASE, "--grace-seconds", "1"]) == 0
  assert "(KILL after TERM)" in capfd.readouterr().out


def test_stop_gives_a_healthy_trainer_its_sigterm(workers, capfd):
  (home,) = workers(1, modes=["term"])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "child.pid").exists(), "the stand-in to start")
  capfd.readouterr()
  assert tpu.main(["stop", *BASE, "--run", "r1", "--grace-seconds", "10"]) == 0
  out = capfd.readouterr().out
  assert "stopped r1 on" in out and out.rstrip().endswith("(TERM)")
  assert "got TERM" in (home / "xlingo_logs" / "r1.log").read_text()
  assert _launched_by(home) == []


def test_stop_never_signals_a_process_that_reused_a_stale_pid(workers, capfd):
  (home,) = workers(1, modes=["term"])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  _wait_for(lambda: (home / "child.pid").exists(), "the stand-in to start")
  trainer = _trainer_pid(home)
  # An unrelated process group now owns the pid the file names (as after a reboot).
  other = subprocess.Popen(["sleep", "60"], start_new_session=True)
  try:
    (home / "xlingo_logs" / "r1.pid").write_text(f"{other.pid}\n")
    assert tpu.main(["stop", *BASE, "--run", "r1", "--grace-seconds", "5"]) == 0
    assert not _alive(trainer) and _alive(other.pid)
    assert tpu.main(["stop", *BASE, "--run", "r1", "--grace-seconds", "1"]) == 0
    assert "no r1 trainer running" in capfd.readouterr().out
    assert _alive(other.pid)
  finally:
    other.kill()
    other.wait()


def test_stop_without_a_run_name_stops_every_launched_run(workers):
  (home,) = workers(1, modes=[["term", "term"]])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  assert tpu.main(["run", *BASE, *RUN[:1], "gs://bucket/runs/r2", *RUN[2:]]) == 0
  _wait_for(lambda: len(_launched_by(home)) >= 4, "both stand-ins and their children")
  assert tpu.main(["stop", *BASE, "--grace-seconds", "5"]) == 0
  assert _launched_by(home) == []


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_watch_recovers_when_the_trainer_dies_on_one_worker(workers, capfd, monkeypatch, shell):
  """Worker 1's trainer dies, worker 0's hangs (ignores SIGTERM): the watcher stops both and
  starts both again; the second start finishes. Under POSIX sh and bash (the workers' shell)."""
  monkeypatch.setenv("FAKE_SHELL", shell)
  h0, h1 = workers(2, modes=[["hang", "finish"], ["hang", "exit"]])
  assert tpu.main(["run", *BASE, *RUN]) == 0
  for h in (h0, h1):
    _wait_for(lambda h=h: (h / "child.pid").exists(), "the stand-ins to start")
  os.killpg(_trainer_pid(h1), signal.SIGKILL)  # the crash
  _wait_for(lambda: not _alive(_trainer_pid(h1)), "worker 1's trainer to die")
  hung = _trainer_pid(h0)
  capfd.readouterr()
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--poll-seconds", "0.3",
          "--max-polls", "30"]
  assert tpu.main(argv) == 0
  out = capfd.readouterr().out
  assert "a trainer died while the others still run" in out
  assert "stopped r1 on" in out and "(KILL after TERM)" in out
  assert "r1 finished (1 restarts)" in out
  assert not _alive(hung)
  assert (h0 / "launches").read_text().strip() == "2"
  assert (h1 / "launches").read_text().strip() == "2"


# ---------------------------------------------------------------------------------------------
# The watcher, with scripted node states and worker statuses.


def test_watch_confirms_a_partial_stop_then_stops_and_relaunches_everywhere(gcloud, monkeypatch,
                                                                           capsys):
  monkeypatch.setenv("FAKE_STATES", "ACTIVE")
  monkeypatch.setenv("FAKE_STATUS",
                     "running|running,running|stopped,running|stopped,running|running,"
                     "finished|stopped")
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--max-polls", "20"]
  assert tpu.main(argv) == 0
  calls = gcloud()
  assert _kinds(calls) == [
    "queued-resources describe", "ssh:all",  # running everywhere
    "queued-resources describe", "ssh:all",  # worker 1 stopped: check again next poll
    "queued-resources describe", "ssh:all",  # still: stop everywhere, run everywhere
    "ssh:all", "ssh:all",
    "queued-resources describe", "ssh:all",  # running again
    "queued-resources describe", "ssh:all",  # finished
  ]
  stop_cmd, run_cmd = _ssh_command(calls[6]), _ssh_command(calls[7])
  assert "xl_signal TERM" in stop_cmd and "xl_signal KILL" in stop_cmd
  assert "xl_wait 5;" in stop_cmd  # 1 s of grace, polled every 0.2 s
  assert f"{tpu.RUN_ENV}=r1 setsid nohup" in run_cmd
  assert "restart 1/10" in capsys.readouterr().out


def test_watch_relaunches_at_once_when_every_trainer_stopped(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATES", "ACTIVE")
  monkeypatch.setenv("FAKE_STATUS", "stopped|stopped,finished|stopped")
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--max-polls", "5"]
  assert tpu.main(argv) == 0
  assert _kinds(gcloud()) == ["queued-resources describe", "ssh:all", "ssh:all", "ssh:all",
                              "queued-resources describe", "ssh:all"]


def test_watch_recreates_a_suspended_queued_resource(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATES", "ACTIVE,SUSPENDED,WAITING_FOR_RESOURCES,ACTIVE")
  monkeypatch.setenv("FAKE_STATUS", "running,finished")
  argv = ["watch", *BASE, *CREATE, "--spot", "--repo-url", "https://example.com/x.git",
          "--commit", "0123456789abcdef0123456789abcdef01234567", *RUN, *FAST,
          "--max-polls", "20"]
  assert tpu.main(argv) == 0
  calls = gcloud()
  assert _kinds(calls) == [
    "queued-resources describe", "ssh:all",                    # ACTIVE, running
    "queued-resources describe",                               # SUSPENDED
    "queued-resources delete", "queued-resources create",      # ... so recreate it
    "queued-resources describe",                               # WAITING_FOR_RESOURCES
    "queued-resources describe", "ssh:all", "ssh:all", "ssh:all",  # ACTIVE: stop, install, run
    "queued-resources describe", "ssh:all",                    # finished
  ]
  assert "--force" in calls[3]
  assert "--spot" in calls[4] and "--runtime-version=v2-alpha-tpuv5-lite" in calls[4]
  assert "xl_signal KILL" in _ssh_command(calls[7])
  assert "checkout -q 0123456789abcdef0123456789abcdef01234567" in _ssh_command(calls[8])
  assert "setsid nohup" in _ssh_command(calls[9])


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED"])
def test_watch_recreates_a_preempted_direct_tpu_vm(gcloud, monkeypatch, state):
  monkeypatch.setenv("FAKE_STATES", f"READY,{state},CREATING,READY")
  monkeypatch.setenv("FAKE_STATUS", "running,finished")
  argv = ["watch", *BASE, *CREATE, "--spot", "--direct", "--from-local", *RUN, *FAST,
          "--max-polls", "20"]
  assert tpu.main(argv) == 0
  calls = gcloud()
  assert _kinds(calls) == [
    "tpu-vm describe", "ssh:all",
    "tpu-vm describe",
    "tpu-vm delete", "tpu-vm create",
    "tpu-vm describe",
    "tpu-vm describe", "ssh:all", "tpu-vm scp", "ssh:all", "ssh:all",
    "tpu-vm describe", "ssh:all",
  ]
  assert "--version=v2-alpha-tpuv5-lite" in calls[4]


def _git(*argv, cwd):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *argv],
                        cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_watch_installs_the_commit_it_started_with_from_local(gcloud, tmp_path, monkeypatch,
                                                             capsys):
  repo = tmp_path / "checkout"
  repo.mkdir()
  _git("init", "-q", cwd=repo)
  _git("commit", "-q", "--allow-empty", "-m", "A", cwd=repo)
  first = _git("rev-parse", "HEAD", cwd=repo)
  monkeypatch.setattr(tpu, "ROOT", str(repo))
  # While the watcher runs, the branch moves on (at the second describe).
  monkeypatch.setenv("FAKE_HOOK_AT", "2")
  monkeypatch.setenv("FAKE_HOOK", f"cd {shlex.quote(str(repo))} && git -c user.name=t -c "
                     "user.email=t@example.com commit -q --allow-empty -m B")
  monkeypatch.setenv("FAKE_STATES", "READY,PREEMPTED,READY")
  monkeypatch.setenv("FAKE_STATUS", "running,finished")
  argv = ["watch", *BASE, *CREATE, "--direct", "--from-local", *RUN, *FAST, "--max-polls", "20"]
  assert tpu.main(argv) == 0
  assert _git("rev-parse", "HEAD", cwd=repo) != first  # the hook ran
  installs = [c for c in gcloud() if c[3] == "ssh" and "xlingo.tar.gz" in _ssh_command(c)]
  assert len(installs) == 1
  assert f"echo {first} > $HOME/xlingo/.xlingo_commit" in _ssh_command(installs[0])
  assert f"pinned commit {first} (HEAD of {repo})" in capsys.readouterr().out


def test_watch_installs_the_commit_it_started_with_from_a_repo_url(gcloud, tmp_path,
                                                                   monkeypatch, capsys):
  origin, work = tmp_path / "origin.git", tmp_path / "work"
  _git("init", "-q", "--bare", str(origin), cwd=tmp_path)
  _git("clone", "-q", str(origin), str(work), cwd=tmp_path)
  _git("commit", "-q", "--allow-empty", "-m", "A", cwd=work)
  _git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
  first = _git("rev-parse", "HEAD", cwd=work)
  monkeypatch.setenv("FAKE_HOOK_AT", "2")
  monkeypatch.setenv("FAKE_HOOK", f"cd {shlex.quote(str(work))} && git -c user.name=t -c "
                     "user.email=t@example.com commit -q --allow-empty -m B && "
                     "git push -q origin HEAD:refs/heads/main")
  monkeypatch.setenv("FAKE_STATES", "ACTIVE,SUSPENDED,ACTIVE")
  monkeypatch.setenv("FAKE_STATUS", "running,finished")
  argv = ["watch", *BASE, *CREATE, "--repo-url", str(origin), "--ref", "main", *RUN, *FAST,
          "--max-polls", "20"]
  assert tpu.main(argv) == 0
  moved = _git("ls-remote", str(origin), "main", cwd=tmp_path).split()[0]
  assert moved != first
  installs = [c for c in gcloud() if c[3] == "ssh" and "git clone" in _ssh_command(c)]
  assert len(installs) == 1
  assert f"checkout -q {first}" in _ssh_command(installs[0])
  assert f"pinned commit {first} (main of {origin})" in capsys.readouterr().out


def test_watch_gives_up_after_max_restarts(gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_STATES", "SUSPENDED")
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--max-polls", "50",
          "--max-restarts", "1", "--launch"]
  assert tpu.main(argv) == 1
  assert _kinds(gcloud()).count("queued-resources create") == 1
  assert "giving up" in capsys.readouterr().out


def test_watch_gives_up_after_max_restarts_of_a_crashing_trainer(gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_STATES", "ACTIVE")
  monkeypatch.setenv("FAKE_STATUS", "stopped")
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--max-polls", "50",
          "--max-restarts", "2"]
  assert tpu.main(argv) == 1
  assert "the trainers stopped unfinished" in capsys.readouterr().out
  assert len([c for c in gcloud() if c[3] == "ssh" and "setsid" in _ssh_command(c)]) == 2


def test_watch_stops_after_max_polls(gcloud):
  argv = ["watch", *BASE, *CREATE, "--from-local", *RUN, *FAST, "--max-polls", "3"]
  assert tpu.main(argv) == 0
  assert _kinds(gcloud()) == ["queued-resources describe", "ssh:all"] * 3


def test_watch_launch_stops_before_installing(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_STATUS", "finished")
  argv = ["watch", *BASE, *CREATE, "--direct", "--repo-url", "https://example.com/x.git",
          "--commit", "0123456789abcdef0123456789abcdef01234567", *RUN, *FAST, "--launch",
          "--max-polls", "5"]
  assert tpu.main(argv) == 0
  calls = gcloud()
  assert _kinds(calls) == ["tpu-vm describe", "ssh:all", "ssh:all", "ssh:all",
                           "tpu-vm describe", "ssh:all"]
  assert "xl_signal" in _ssh_command(calls[1]) and "git clone" in _ssh_command(calls[2])


# ---------------------------------------------------------------------------------------------
# Dry runs and arguments.


def test_dry_run_prints_commands_and_never_calls_gcloud(gcloud, capsys):
  assert tpu.main(["--dry-run", "create", *BASE, *CREATE, "--spot"]) == 0
  assert tpu.main(["--dry-run", "run", *BASE, *RUN, "--", "--config.train.steps=5"]) == 0
  assert tpu.main(["delete", *BASE, "--dry-run"]) == 0
  assert tpu.main(["--dry-run", "stop", *BASE, "--internal-ips"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert gcloud() == []
  assert len(lines) == 4 and all(line.startswith("+ gcloud ") for line in lines)
  create, run, delete, stop = _printed("\n".join(lines))
  assert create == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--zone=us-west4-a",
    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
    "--node-id=my-tpu", "--spot"]
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in run
  assert "-m xlingo.train --config configs/tpu_1b.py --workdir gs://bucket/runs/r1 " \
         "--config.train.steps=5" in _ssh_command(run)
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu",
                    "--zone=us-west4-a", "--force", "--quiet"]
  assert stop[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                      "--zone=us-west4-a", "--internal-ip"]
  assert "--worker=all" in stop and "xl_signal KILL" in _ssh_command(stop)


def test_dry_run_watch_shows_the_pin_the_poll_and_both_recoveries(gcloud, capsys):
  argv = ["--dry-run", "watch", *BASE, *CREATE, "--spot", "--from-local", *RUN]
  assert tpu.main(argv) == 0
  out = capsys.readouterr().out
  assert gcloud() == []
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  assert f"# pinned commit {head}" in out
  assert "queued-resources describe my-tpu" in out and "value(state.state)" in out
  assert "queued-resources create my-tpu" in out and "--node-id=my-tpu" in out
  after_preemption, after_crash = out.split("# after a preemption")[1].split("# after a trainer")
  assert [c[3] if c[0] == "git" else " ".join(c[3:5]) for c in _printed(after_preemption)] == [
    "queued-resources delete", "queued-resources create", "tpu-vm ssh", "archive", "tpu-vm scp",
    "tpu-vm ssh", "tpu-vm ssh"]
  assert [_ssh_command(c).count("xl_signal KILL") for c in _printed(after_crash)] == [1, 0]


@pytest.mark.parametrize("argv, message", [
  (["create", *BASE], "required: --accelerator-type"),
  (["create", *BASE, "--accelerator-type", "tpu16"], "invalid --accelerator-type"),
  (["create", *BASE, *CREATE, "--queued", "--direct"], "not allowed with"),
  (["create", "--name", "My_TPU", "--zone", "us-west4-a", *CREATE], "invalid --name"),
  (["create", "--name", "t", "--zone", "west", *CREATE], "invalid --zone"),
  (["install", *BASE], "one of the arguments --repo-url --from-local is required"),
  (["install", *BASE, "--from-local", "--repo-url", "u"], "not allowed with"),
  (["install", *BASE, "--repo-url", "u", "--commit", "abc"], "full 40-character SHA"),
  (["run", *BASE, *RUN[:-2]], "required: --config"),
  (["run", *BASE, *RUN[2:], "--workdir", "/tmp/w"], "invalid --workdir"),
  (["run", *BASE, *RUN[:2], "--module", "xlingo.nope", *RUN[4:]], "invalid choice"),
  (["run", *BASE, *RUN, "--", "steps=3"], "invalid extra trainer argument"),
  (["stop", *BASE, "--worker", "x"], "--worker must be a worker index or all"),
  (["stop", *BASE, "--run", "a b"], "invalid --run"),
  (["stop", *BASE, "--grace-seconds", "-1"], "--grace-seconds must be >= 0"),
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
  assert proc.stdout.startswith("+ gcloud compute tpus queued-resources describe my-tpu")
  proc = subprocess.run([TPU_SH, "status"], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert gcloud() == []


def test_readme_tpu_section_prints_what_it_shows(gcloud, capsys):
  """Every `$ ./launch/tpu.sh --dry-run ...` example in the README's TPU section prints exactly
  the '+ ' lines shown under it."""
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  section = text.split("## On Cloud TPU VMs", 1)[1].split("\n## ", 1)[0]
  examples = re.findall(r"^\$ (\./launch/tpu\.sh --dry-run .+)\n((?:\+ .+\n)+)", section, re.M)
  assert len(examples) >= 5
  families = set()
  for command, shown in examples:
    assert tpu.main(shlex.split(command)[1:]) == 0, command
    assert capsys.readouterr().out == shown, command
    families.update(re.findall(r"--accelerator-type=(v\d+[a-z]*)-", shown))
  assert families == {"v4", "v5litepod", "v5p", "v6e"}
  assert gcloud() == []


# ---------------------------------------------------------------------------------------------
# The preflight (launch/tpu_preflight.py): every problem in one go, before any gcloud command.

pf = tpu.tpu_preflight
DATA = ["--config.data.tfds_data_dir=gs://bucket/tfds", "--config.data.vocab_path=gs://bucket/v.model"]


def _errors(err):
  return [line[len("tpu.py: error: "):] for line in err.splitlines()
          if line.startswith("tpu.py: error: ")]


def test_preflight_names_every_mistake_before_any_command(fake_gcloud, capfd):
  """The issue's line: v5e-16 (Google's v5litepod-16) with tpu_8b (a 32-chip mesh, TFDS without
  data.tfds_data_dir, a 32k model without its vocabulary)."""
  rc = subprocess.run([TPU_SH, "--dry-run", "watch", "--name", "n", "--zone", "us-west4-a",
                       "--accelerator-type", "v5e-16", "--spot", "--from-local", "--workdir",
                       "gs://b/r", "--module", "xlingo.train", "--config", "configs/tpu_8b.py"],
                      env=dict(os.environ, XLINGO_VENV=os.path.dirname(os.path.dirname(
                          sys.executable)))).returncode
  out, err = capfd.readouterr()
  assert rc == 2 and out == ""  # nothing printed to paste, nothing run
  assert "v5e-16 is Google's v5litepod-16" in err
  assert "gcloud project proj, account me@example.com" in err
  errors = _errors(err)
  assert len(errors) == 3, err
  assert "data.tfds_data_dir is empty; pass -- --config.data.tfds_data_dir=gs://" in errors[0]
  assert "shipped 8192-piece vocabulary" in errors[1] and "model.vocab_size=32768" in errors[1]
  assert "configs/tpu_8b.py's mesh does not fit v5litepod-16 (16 chips)" in errors[2]
  assert "multiply to 32" in errors[2] and "v5litepod-32 (32 chips)" in errors[2]
  assert fake_gcloud() == []


def test_preflight_refuses_a_generation_outside_its_zones(fake_gcloud, capsys):
  assert tpu.main(["create", *BASE, "--accelerator-type", "v5p-64"]) == 2
  out, err = capsys.readouterr()
  (error,) = _errors(err)
  assert "v5p is not offered in zone us-west4-a; zones with v5p: us-central1-a, us-east5-a" in error
  assert out == "" and fake_gcloud() == []
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", "v5p-64",
                   "--any-zone"]) == 0


@pytest.mark.parametrize("accel, message", [
  ("v5litepod-12", "v5litepod-12 is not a size Google offers: v5litepod-N with N in 1, 4, 8, 16"),
  ("v5p-60", "multiples of 8 up to 12288 (N counts TensorCores, two per chip)"),
  ("v7-8", "no known runtime version for accelerator family 'v7'; pass --version"),
])
def test_preflight_refuses_unknown_types_and_sizes(fake_gcloud, capsys, accel, message):
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", accel]) == 2
  out, err = capsys.readouterr()
  assert out == "" and message in _errors(err)[0]


def test_v5e_spelling_becomes_googles_name(fake_gcloud, capsys):
  assert tpu.main(["--dry-run", "create", *BASE, "--accelerator-type", "v5e-16"]) == 0
  out, err = capsys.readouterr()
  assert "--accelerator-type=v5litepod-16" in out and "--runtime-version=v2-alpha-tpuv5-lite" in out
  assert "v5e-16 is Google's v5litepod-16; using v5litepod-16" in err


def test_preflight_shows_or_refuses_the_gcloud_identity(fake_gcloud, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_CONFIG", '{"core": {"account": "a@b.c"}}')
  assert tpu.main(["--dry-run", "create", *BASE, *CREATE]) == 2
  assert "gcloud has no project: pass --project P" in _errors(capsys.readouterr().err)[0]
  assert tpu.main(["--dry-run", "create", *BASE, *CREATE, "--project", "p2"]) == 0
  assert "gcloud project p2 (--project), account a@b.c" in capsys.readouterr().err
  monkeypatch.setenv("GCLOUD", "/nonexistent/gcloud")  # a dry run works without the SDK
  assert tpu.main(["--dry-run", "create", *BASE, *CREATE]) == 0
  assert "gcloud not found" in capsys.readouterr().err


def test_preflight_loads_the_config_with_its_overrides(fake_gcloud, capsys):
  def run(*extra, config="configs/tpu_8b.py", accel=("--accelerator-type", "v5p-64")):
    rc = tpu.main(["--dry-run", "run", *BASE, *RUN[:-1], config, *accel, "--", *extra])
    out, err = capsys.readouterr()
    return rc, out, _errors(err), err

  # The mesh set here, so that the test does not depend on the shipped one.
  mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=16", "--config.mesh.tensor=2"]
  rc, out, errors, err = run(*DATA, *mesh)
  assert rc == 0 and errors == [] and "mesh data=1 fsdp=16 tensor=2 on v5p-64 (32 chips)" in err
  assert "--config.data.tfds_data_dir=gs://bucket/tfds" in out
  rc, out, errors, _ = run(*DATA, *mesh, "--config.mesh.tensor=4")
  assert rc == 2 and out == "" and "multiply to 64 but there are 32 devices" in errors[0]
  rc, _, errors, _ = run(*DATA, *mesh, "--config.train.batch_size=40")
  assert rc == 2 and "rows do not split over data x fsdp = 16" in errors[0]
  rc, _, errors, _ = run(*DATA, "--config.nope=1")
  assert rc == 2 and "unknown config key 'nope'" in errors[0]
  rc, _, errors, _ = run(config="configs/nope.py")
  assert rc == 2 and "config file configs/nope.py does not exist" in errors[0]
  assert "tpu_1b.py" in errors[0]
  rc, _, errors, err = run(*DATA, accel=())  # run without the slice: the mesh is not checked
  assert rc == 0 and "not checked against the slice (pass --accelerator-type)" in err
  assert fake_gcloud() == []


def test_fit_maps_the_slice_to_libtpu_and_refuses_what_does_not_fit(fake_gcloud, monkeypatch,
                                                                    capsys):
  slc = pf.check_accelerator(pf.Report(io.StringIO()), "v5e-16", None)
  assert pf.libtpu_topology(slc) == "v5e:4x4"
  topo = {a: pf.libtpu_topology(pf.check_accelerator(pf.Report(io.StringIO()), a, None))
          for a in ("v5p-64", "v6e-8", "v4-32", "v5litepod-256")}
  assert topo == {"v5p-64": "v5p:2x4x4", "v6e-8": "v6e:2x4", "v4-32": None,
                  "v5litepod-256": "v5e:16x16"}
  asked = []

  def compiled(spare):
    def fake(config, topology, overrides):
      asked.append((config, topology, overrides))
      return {"total_gib": 20.0, "hbm_gib": 14.9, "spare": spare, "device_kind": "TPU v5 lite"}
    return fake

  argv = ["--dry-run", "run", *BASE, *RUN, "--accelerator-type", "v5e-16", "--fit", "--", *DATA]
  monkeypatch.setattr(pf, "check_fit", functools.partial(pf.check_fit, compile_fn=compiled(-0.34)))
  assert tpu.main(argv) == 2
  out, err = capsys.readouterr()
  assert out == "" and asked == [("configs/tpu_1b.py", "v5e:4x4", DATA)]
  assert "does not fit v5litepod-16: 20.0 GiB per chip of 14.9 GiB (v5e:4x4)" in _errors(err)[0]
  check_fit = pf.check_fit.func
  monkeypatch.setattr(pf, "check_fit", functools.partial(check_fit, compile_fn=compiled(0.3)))
  assert tpu.main(argv) == 0
  assert "--fit: 20.0 GiB per chip of 14.9 GiB on v5e:4x4 (30% spare)" in capsys.readouterr().err
  report = pf.Report(io.StringIO())
  check_fit(report, "configs/tpu_1b.py", [], pf.Slice("v4-32", "v4", 16))
  assert "--fit cannot check v4-32: libtpu's v4 topologies have one device per TensorCore" \
      in report.problems[0]
