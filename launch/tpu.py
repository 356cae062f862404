#!/usr/bin/env python3
# Copyright 2025 The xlingo Authors. Licensed under the Apache License, Version 2.0.
"""Cloud TPU VM launcher for xlingo: create, install, run, stop, logs, watch, status, delete.

Standard library only, so it runs on a laptop without xlingo installed. Every cloud action is a
`gcloud` command (found as $GCLOUD, else `gcloud` on PATH); `--dry-run` prints each one
("+ " and the shell-quoted command) instead of running it. See docs/TPU.md.

  python3 launch/tpu.py create  --name N --zone Z --accelerator-type v5litepod-16 [--spot]
                                [--direct] [--version V] [--internal-ips]
  python3 launch/tpu.py install --name N --zone Z --from-local | --repo-url URL [--commit SHA]
  python3 launch/tpu.py run     --name N --zone Z --workdir gs://B/run --module xlingo.train \\
                                --config configs/tpu_1b.py [-- --config.KEY=VALUE ...]
  python3 launch/tpu.py stop    --name N --zone Z [--run RUN] [--grace-seconds 60]
  python3 launch/tpu.py logs    --name N --zone Z [--worker 0] [--follow]
  python3 launch/tpu.py watch   (create + install + run arguments) [--max-restarts K]
  python3 launch/tpu.py status | delete --name N --zone Z [--direct]

Exit codes: 0 success, 1 a gcloud (or git) command failed or the watcher gave up, 2 invalid
arguments.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_preflight  # noqa: E402 - the launcher's sibling, importable however it is started

# The trainers print this as their last line when training completes; the watcher stops on it.
FINISHED_MARKER = "xlingo: training finished"
# Each worker's status check prints one line: STATUS_PREFIX, then finished|running|stopped, then
# the worker's hostname.
STATUS_PREFIX = "xlingo-launch-status"
# The environment variable `run` gives every trainer process (inherited by its children). It is
# how `stop`, `run` and the status check find a run's processes: unlike a pid file, it cannot
# point at an unrelated process after the pid is reused.
RUN_ENV = "XLINGO_LAUNCH_RUN"
# Written by `run` before each start, so the status check reads only the latest start's output.
START_HEADER = "=== xlingo-launch start"

MODULES = ("xlingo.train", "xlingo.adapt", "xlingo.distill")
# setup.py requires Python >= 3.11; TPU images ship an older system Python, so the remote
# environment is a uv-managed virtual environment with this interpreter.
PYTHON_VERSION = "3.11"
# Remote layout on every worker (shell syntax: expanded by the remote shell).
REMOTE_REPO = "$HOME/xlingo"
REMOTE_VENV = "$HOME/xlingo_venv"
REMOTE_LOGS = "$HOME/xlingo_logs"
REMOTE_TARBALL = "xlingo.tar.gz"  # relative to the remote home directory
# The installed commit, next to the code (read by `run` into each start header).
COMMIT_FILE = f"{REMOTE_REPO}/.xlingo_commit"

# Node states: a TPU VM's `state`, a queued resource's `state.state`.
READY_STATES = {"READY", "ACTIVE"}
# A Spot TPU VM that was preempted or reached its end of life; a queued resource whose node was
# deleted (SUSPENDED, after SUSPENDING) or that could not be provisioned (FAILED).
PREEMPTED_STATES = {"direct": {"PREEMPTED", "TERMINATED"}, "queued": {"SUSPENDED", "FAILED"}}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z0-9]+$")
_ACCEL_RE = tpu_preflight.ACCEL_RE
_CONFIG_RE = re.compile(r"^[\w./-]+\.py(:.*)?$")
_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class UsageError(Exception):
  """Invalid command-line arguments (exit 2)."""


class CommandFailed(Exception):
  """A gcloud (or git) command exited non-zero (exit 1)."""


def pip_install_script(repo=REMOTE_REPO):
  """The one place that installs xlingo with its `tpu` extra (jax[tpu], libtpu from PyPI)."""
  uv = "$HOME/.local/bin/uv"
  return " && ".join([
    "(python3 -m pip install --user -q -U uv"
    " || python3 -m pip install --user -q -U --break-system-packages uv)",
    f"([ -x {REMOTE_VENV}/bin/python ] || {uv} venv -q --python {PYTHON_VERSION} {REMOTE_VENV})",
    f"cd {repo}",
    f"{uv} pip install -q --python {REMOTE_VENV}/bin/python -e '.[tpu]'",
  ])


# ---------------------------------------------------------------------------------------------
# Running commands.


class Runner:
  """Runs commands, or with dry_run prints them ("+ " and the shell-quoted argv)."""

  def __init__(self, dry_run=False, gcloud=None):
    self.dry_run = dry_run
    self.gcloud = gcloud or os.environ.get("GCLOUD") or "gcloud"

  def check_gcloud(self):
    if self.dry_run:
      return
    if shutil.which(self.gcloud) is None:
      raise CommandFailed(f"gcloud not found (looked for {self.gcloud!r}); install the Google "
                          "Cloud SDK or point $GCLOUD at it")

  def run(self, argv, capture=False, check=True):
    """Returns (returncode, stdout); stdout is captured only when capture=True."""
    if self.dry_run:
      print("+ " + shlex.join(argv), flush=True)
      return 0, ""
    sys.stdout.flush()
    proc = subprocess.run(argv, stdout=subprocess.PIPE if capture else None, text=True)
    out = proc.stdout or ""
    if check and proc.returncode != 0:
      raise CommandFailed(f"command failed (exit {proc.returncode}): {shlex.join(argv)}")
    return proc.returncode, out

  def query(self, argv):
    """A local read-only query (git rev-parse, ls-remote): runs even with dry_run."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
      detail = (proc.stderr.strip().splitlines() or [""])[-1]
      raise CommandFailed(f"command failed (exit {proc.returncode}): {shlex.join(argv)}"
                          + (f": {detail}" if detail else ""))
    return proc.stdout

  def g(self, args, **kw):
    return self.run([self.gcloud, *args], **kw)


def _scope(args):
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def _reach(args):
  """How ssh/scp reach the workers: their internal IPs when the TPU has no external ones."""
  return ["--internal-ip"] if args.internal_ips else []


def ssh(runner, args, command, worker="all", **kw):
  return runner.g(["compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args), *_reach(args),
                   f"--worker={worker}", f"--command={command}"], **kw)


# ---------------------------------------------------------------------------------------------
# The code to install: a commit, pinned by `watch`.


def local_commit(runner, rev="HEAD"):
  """The full SHA of a commit of this checkout."""
  out = runner.query(["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"])
  return out.strip()


def remote_commit(runner, url, ref=None):
  """The SHA that REF (a branch or tag; default the remote HEAD) names in the repository URL."""
  if ref and _SHA_RE.match(ref):
    return ref
  refs = {}
  for line in runner.query(["git", "ls-remote", url, *([ref] if ref else ["HEAD"])]).splitlines():
    sha, _, name = line.partition("\t")
    refs[name.strip()] = sha.strip()
  wanted = ([f"refs/tags/{ref}^{{}}", f"refs/heads/{ref}", f"refs/tags/{ref}", ref] if ref
            else ["HEAD"])
  for name in wanted:
    if refs.get(name):
      return refs[name]
  raise CommandFailed(f"{url} has no ref {ref or 'HEAD'!r}; pass --ref BRANCH|TAG or --commit SHA")


def pin_commit(runner, args):
  """The commit `watch` installs on every (re)created node, resolved once when it starts."""
  if args.commit:
    if args.from_local:
      return local_commit(runner, args.commit), f"--commit {args.commit}"
    return args.commit, "--commit"
  if args.from_local:
    return local_commit(runner), f"HEAD of {ROOT}"
  return remote_commit(runner, args.repo_url, args.ref), f"{args.ref or 'HEAD'} of {args.repo_url}"


# ---------------------------------------------------------------------------------------------
# Remote shell snippets (POSIX sh, run by `gcloud ... ssh --command` on every worker).


def _members_fn(name):
  """Shell function xl_members: pids of the live processes that carry the run's marker.

  With name None it matches every run the launcher started. Only processes of this $HOME count
  (the runs this user started here). One GNU `grep -z` reads every process's environment, so a
  scan costs a few processes, not a few per process. Zombies (whose environment reads empty
  anyway) count as gone, although `kill -0` would still succeed on them.
  """
  run = (f"-xF {shlex.quote(f'{RUN_ENV}={name}')}" if name else f"'^{RUN_ENV}='")
  return (f"xl_members() {{ c=$(grep -lz {run} /proc/[0-9]*/environ 2>/dev/null); "
          '[ -n "$c" ] || return 0; '
          'for f in $(grep -lzxF "HOME=$HOME" $c 2>/dev/null); do d=${f%/environ}; '
          's=$(cat "$d/stat" 2>/dev/null) || continue; s=${s##*)}; set -- $s; '
          '[ "$1" = Z ] || echo "${d#/proc/}"; done; }')


def install_script(args, commit):
  """Remote script: refuse while a trainer runs, fetch the code, record its commit, pip install."""
  if args.from_local:
    fetch = (f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && "
             f"tar -xzf $HOME/{REMOTE_TARBALL} -C {REMOTE_REPO} && echo {commit} > {COMMIT_FILE}")
  else:
    url = shlex.quote(args.repo_url)
    if commit:
      clone = (f"git clone -q --no-checkout {url} {REMOTE_REPO} && "
               f"git -C {REMOTE_REPO} checkout -q {commit}")
    else:
      ref = f" --branch {shlex.quote(args.ref)}" if args.ref else ""
      clone = f"git clone -q --depth 1{ref} {url} {REMOTE_REPO}"
    fetch = f"rm -rf {REMOTE_REPO} && {clone} && git -C {REMOTE_REPO} rev-parse HEAD > {COMMIT_FILE}"
  return "; ".join([
    _members_fn(None),
    'if [ -n "$(xl_members)" ]; then echo "xlingo-launch: a trainer is running on $(hostname); '
    'stop it first (tpu.py stop)" >&2; exit 1; fi',
    f"{fetch} && {pip_install_script()}",
  ])


def run_name(args):
  return args.run_name or re.sub(r"[^A-Za-z0-9._-]", "_", args.workdir.rstrip("/").split("/")[-1])


def trainer_command(args):
  """The exact trainer command every worker runs (relative to the remote repository)."""
  argv = [f"{REMOTE_VENV}/bin/python", "-m", args.module, "--config", args.config,
          "--workdir", args.workdir, *args.extra]
  # The venv path stays unquoted so that the remote shell expands $HOME.
  return " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])


def _paths(name):
  return (f"{REMOTE_LOGS}/{name}.{ext}" for ext in ("log", "pid", "cmd"))


def run_script(args):
  """Remote script: refuse a second copy, record the command, start the trainer detached.

  The trainer gets its own session (setsid, so it is a process-group leader and survives the
  ssh session) and the RUN_ENV marker; the pid file holds its process group.
  """
  name = run_name(args)
  log, pid, cmd_file = _paths(name)
  cmd = trainer_command(args)
  return "; ".join([
    f"mkdir -p {REMOTE_LOGS}",
    f"cd {REMOTE_REPO} || exit 1",
    _members_fn(name),
    f'if [ -n "$(xl_members)" ]; then echo "xlingo-launch: {name} is already running on '
    f'$(hostname); stop it first (tpu.py stop --run {name})" >&2; exit 1; fi',
    f"echo {shlex.quote(cmd)} > {cmd_file}",
    f'{{ echo "{START_HEADER} $(date -u +%FT%TZ) $(hostname) commit '
    f'$(cat {COMMIT_FILE} 2>/dev/null || echo unknown)"; cat {cmd_file}; }} >> {log}',
    f"{RUN_ENV}={name} setsid nohup {cmd} >> {log} 2>&1 < /dev/null & echo $! > {pid}",
    f'echo "xlingo-launch: started {name} on $(hostname) (process group $!), log {log}"',
  ])


def stop_script(name, grace_seconds):
  """Remote script: SIGTERM the run's processes, wait, then SIGKILL whatever is left.

  A trainer hung in a collective (another host died) never acts on SIGTERM, hence the KILL. The
  process group from the pid file is signalled only while its leader still carries the marker,
  so a stale pid file cannot hit an unrelated process that reused the pid.
  """
  label = name or "xlingo"
  pid_files = f"{REMOTE_LOGS}/{name}.pid" if name else f"{REMOTE_LOGS}/*.pid"
  return "; ".join([
    _members_fn(name),
    "pids=$(xl_members)",
    f'if [ -z "$pids" ]; then echo "xlingo-launch: no {label} trainer running on $(hostname)"; '
    "exit 0; fi",
    f"groups=$(cat {pid_files} 2>/dev/null)",
    'xl_signal() { for g in $groups; do case " $(echo $pids) " in *" $g "*) '
    'kill -s "$1" -- "-$g" 2>/dev/null;; esac; done; kill -s "$1" $pids 2>/dev/null; }',
    # Poll every 0.2 s: up to the grace period after TERM, up to 30 s after KILL (a process
    # holding much memory takes a while to be torn down).
    "xl_wait() { i=0; while [ -n \"$pids\" ] && [ \"$i\" -lt \"$1\" ]; do sleep 0.2; "
    "pids=$(xl_members); i=$((i+1)); done; }",
    "xl_signal TERM",
    f"xl_wait {int(grace_seconds) * 5}",
    "how=TERM",
    'if [ -n "$pids" ]; then how="KILL after TERM"; xl_signal KILL; xl_wait 150; fi',
    f'if [ -n "$pids" ]; then echo "xlingo-launch: could not stop {label} on $(hostname): '
    'pids $(echo $pids) are still alive" >&2; exit 1; fi',
    f'echo "xlingo-launch: stopped {label} on $(hostname) ($how)"',
  ])


def check_script(args):
  """Remote status check (run on every worker): one STATUS_PREFIX line, and a stopped worker's
  last log lines. 'finished' means the completion marker is in the latest start's output."""
  name = run_name(args)
  log = f"{REMOTE_LOGS}/{name}.log"
  return "; ".join([
    _members_fn(name),
    f"if tac {log} 2>/dev/null | sed '/^{START_HEADER} /q' | "
    f"grep -qF {shlex.quote(FINISHED_MARKER)}; then s=finished; "
    'elif [ -n "$(xl_members)" ]; then s=running; else s=stopped; fi',
    f'echo "{STATUS_PREFIX} $s $(hostname)"',
    f'if [ "$s" = stopped ]; then tail -n 20 {log} 2>/dev/null | sed "s/^/[$(hostname)] /"; fi',
    "exit 0",
  ])


# ---------------------------------------------------------------------------------------------
# Subcommands.


def do_create(runner, args):
  if args.queued:
    cmd = ["compute", "tpus", "queued-resources", "create", args.name, *_scope(args),
           f"--accelerator-type={args.accelerator_type}", f"--runtime-version={args.version}",
           f"--node-id={args.name}"]
  else:
    cmd = ["compute", "tpus", "tpu-vm", "create", args.name, *_scope(args),
           f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"]
  if args.spot:
    cmd.append("--spot")
  if args.internal_ips:
    cmd.append("--internal-ips")
  runner.g(cmd)
  if args.queued and not runner.dry_run:
    print(f"[tpu] queued resource {args.name} requested; it is usable once `status` says ACTIVE")


def _delete(runner, args, check=True):
  if args.queued:
    # --force deletes the queued resource's node first (needed while it is ACTIVE).
    runner.g(["compute", "tpus", "queued-resources", "delete", args.name, *_scope(args),
              "--force", "--quiet"], check=check)
  else:
    runner.g(["compute", "tpus", "tpu-vm", "delete", args.name, *_scope(args), "--quiet"],
             check=check)


def do_delete(runner, args):
  _delete(runner, args)


def get_state(runner, args):
  """The node's state ('' when describe fails, e.g. while it does not exist)."""
  if args.queued:
    cmd = ["compute", "tpus", "queued-resources", "describe", args.name, *_scope(args),
           "--format=value(state.state)"]
  else:
    cmd = ["compute", "tpus", "tpu-vm", "describe", args.name, *_scope(args),
           "--format=value(state)"]
  rc, out = runner.g(cmd, capture=True, check=False)
  return out.strip().upper() if rc == 0 else ""


def do_status(runner, args):
  state = get_state(runner, args)
  if runner.dry_run:
    return 0
  other = "--direct" if args.queued else "a queued resource (drop --direct)"
  print(state or f"UNKNOWN (describe failed: does it exist? was it created with {other}?)")
  return 0 if state else 1


def do_install(runner, args):
  if args.from_local:
    commit = local_commit(runner, args.commit or "HEAD")
    tmp = tempfile.mkdtemp(prefix="xlingo-tpu-")
    tarball = os.path.join(tmp, REMOTE_TARBALL)
    try:
      runner.run(["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", tarball, commit])
      runner.g(["compute", "tpus", "tpu-vm", "scp", "--recurse", tarball,
                f"{args.name}:{REMOTE_TARBALL}", *_scope(args), *_reach(args), "--worker=all"])
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  else:
    commit = args.commit
  if not runner.dry_run:
    print(f"[tpu] installing commit {commit or (args.ref or 'HEAD') + ' of ' + args.repo_url} "
          f"on every worker of {args.name}")
  ssh(runner, args, install_script(args, commit))


def do_run(runner, args):
  if not runner.dry_run:
    print(f"[tpu] on every worker of {args.name}: {trainer_command(args)}")
  ssh(runner, args, run_script(args))


def stop(runner, args, name, worker="all"):
  ssh(runner, args, stop_script(name, args.grace_seconds), worker=worker)


def do_stop(runner, args):
  stop(runner, args, args.run, worker=args.worker)


def do_logs(runner, args):
  if args.run:
    log = f"{REMOTE_LOGS}/{args.run}.log"
  else:
    log = f'"$(ls -t {REMOTE_LOGS}/*.log | head -n 1)"'
  tail = "tail -F" if args.follow else "tail"
  ssh(runner, args, f"{tail} -n {args.lines} {log}", worker=args.worker)


def run_status(runner, args):
  """The run across all workers: 'finished' (the completion marker appeared), 'running' (a
  trainer is alive on every worker), 'stopped' (on none), 'partial' (alive on some workers
  only: a trainer died while the others hang), or 'unknown' (the check itself failed)."""
  rc, out = ssh(runner, args, check_script(args), worker="all", capture=True, check=False)
  states = [line.split()[1] for line in out.splitlines()
            if line.startswith(STATUS_PREFIX + " ") and len(line.split()) > 1]
  if "finished" in states:
    return "finished"
  if rc != 0 or not states:
    return "unknown"
  if all(s == "running" for s in states):
    return "running"
  sys.stdout.write(out)
  return "stopped" if "running" not in states else "partial"


def _log(msg):
  print(f"[tpu watch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _dry_run_watch(runner, args):
  print(f"# pinned commit {args.commit}")
  print("# each poll (node state, then the run on every worker):")
  get_state(runner, args)
  run_status(runner, args)
  print("# after a preemption (delete, create, then once READY/ACTIVE: stop, install, run):")
  _delete(runner, args)
  do_create(runner, args)
  stop(runner, args, run_name(args))
  do_install(runner, args)
  do_run(runner, args)
  print("# after a trainer died while the node stayed up (stop everywhere, run everywhere):")
  stop(runner, args, run_name(args))
  do_run(runner, args)
  return 0


def do_watch(runner, args):
  """The watcher: relaunch the run after preemptions and trainer deaths until it finishes.

  Phases: 'monitor' (trainer launched; check the run on every worker), 'recreate' (node
  preempted; delete it and create it again, retried until create succeeds), 'launch' (wait for
  READY/ACTIVE, then stop, install and run). A relaunch always stops the run everywhere first,
  so no survivor of a dead peer is left hanging in a collective, and then starts the same
  command on every worker; the trainers resume from the latest checkpoint in the workdir.
  Every install uses the commit pinned when the watcher started.
  """
  try:
    args.commit, source = pin_commit(runner, args)
  except CommandFailed as e:
    if not runner.dry_run:
      raise
    print(f"# could not resolve the commit to pin ({e})")
    args.commit, source = "UNRESOLVED", ""
  if runner.dry_run:
    return _dry_run_watch(runner, args)
  _log(f"pinned commit {args.commit} ({source}): every install uses it")

  kind = "queued" if args.queued else "direct"
  phase = "launch" if args.launch else "monitor"
  restarts, polls, suspect = 0, 0, False

  def restart(why):
    nonlocal restarts
    if restarts >= args.max_restarts:
      _log(f"{why} and {restarts} restarts were used; giving up")
      return False
    restarts += 1
    _log(f"{why}: restart {restarts}/{args.max_restarts}")
    return True

  while True:
    if args.max_polls and polls >= args.max_polls:
      _log(f"stopping after {polls} polls (run not finished; {restarts} restarts)")
      return 0
    if polls:
      time.sleep(args.poll_seconds)
    polls += 1
    try:
      if phase != "recreate":
        state = get_state(runner, args)
        if state in PREEMPTED_STATES[kind]:
          if not restart(f"{args.name} is {state}; recreating it"):
            return 1
          phase, suspect = "recreate", False
      if phase == "recreate":
        # Deleting fails harmlessly when a previous attempt already deleted the node.
        _delete(runner, args, check=False)
        do_create(runner, args)
        phase = "launch"
        _log(f"{args.name} created again; waiting for it to be ready")
        continue
      if state not in READY_STATES:
        _log(f"{args.name} is {state or 'unknown'}; waiting")
        continue
      if phase == "launch":
        _log(f"{args.name} is {state}: stopping any old trainer, installing {args.commit}, "
             f"starting {run_name(args)}")
        stop(runner, args, run_name(args))
        do_install(runner, args)
        do_run(runner, args)
        phase, suspect = "monitor", False
        continue
      status = run_status(runner, args)
      if status == "finished":
        _log(f"{run_name(args)} finished ({restarts} restarts)")
        return 0
      if status == "unknown":
        _log("could not check the trainers; retrying at the next poll")
        continue
      if status == "running":
        suspect = False
        continue
      if status == "partial" and not suspect:
        # Once training completes, the other workers exit moments before worker 0 prints the
        # completion marker: confirm at the next poll before treating this as a crash.
        suspect = True
        _log("the trainer is gone on some workers only; checking again at the next poll")
        continue
      why = ("a trainer died while the others still run" if status == "partial"
             else "the trainers stopped unfinished")
      if not restart(f"{why}; stopping it everywhere and starting it again"):
        return 1
      suspect = False
      stop(runner, args, run_name(args))
      do_run(runner, args)
    except CommandFailed as e:
      _log(f"{e}; retrying at the next poll")


# ---------------------------------------------------------------------------------------------
# Argument parsing.


class _Parser(argparse.ArgumentParser):
  """argparse with a one-line error message and exit status 2."""

  def error(self, message):
    raise UsageError(message)


def _add_common(p):
  p.add_argument("--name", required=True, help="TPU node (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-west4-a")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud config)")
  p.add_argument("--internal-ips", action="store_true",
                 help="the TPU has internal IPs only: create it so, and ssh/scp with "
                      "--internal-ip (from a machine in its VPC network)")
  p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                 help="print the gcloud commands instead of running them")


def _add_kind(p):
  g = p.add_mutually_exclusive_group()
  g.add_argument("--queued", action="store_true",
                 help="a queued resource with a node of the same name (the default)")
  g.add_argument("--direct", action="store_true",
                 help="a TPU VM made directly by `tpu-vm create` (fails when no capacity)")


def _add_create(p):
  p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32")
  p.add_argument("--version", default=None,
                 help="TPU software (runtime) version (default: Google's image for the "
                      "accelerator family)")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
  p.add_argument("--any-zone", action="store_true",
                 help="skip the preflight's check of --zone against the zones that Google "
                      "lists for the generation")
  _add_kind(p)


def _add_install(p, required):
  g = p.add_mutually_exclusive_group(required=required)
  g.add_argument("--repo-url", help="git URL to clone on every worker")
  g.add_argument("--from-local", action="store_true",
                 help="copy `git archive` of a commit of this checkout to every worker")
  p.add_argument("--ref", default=None, help="branch or tag to clone (with --repo-url)")
  p.add_argument("--commit", default=None,
                 help="the commit to install (default: HEAD of this checkout, or --ref)")


def _add_run(p):
  p.add_argument("--workdir", required=True, help="gs://bucket/path shared by all workers")
  p.add_argument("--module", required=True, choices=MODULES)
  p.add_argument("--config", required=True, help="config file, e.g. configs/tpu_1b.py")
  p.add_argument("--run-name", default=None,
                 help="log name on the workers (default: last component of --workdir)")
  p.add_argument("--fit", action="store_true",
                 help="preflight: compile the train step for the slice's topology with "
                      "bench/tpu_aot.py (needs libtpu here; minutes) and refuse if one chip's "
                      "memory does not fit")
  p.add_argument("--no-config-check", action="store_true",
                 help="skip the preflight's local load of --config (when xlingo cannot be "
                      "imported here)")


def _add_grace(p):
  p.add_argument("--grace-seconds", type=int, default=60,
                 help="how long trainers get to exit after SIGTERM before SIGKILL")


def build_parser():
  parser = _Parser(prog="tpu.py", description="Run xlingo on Cloud TPU VMs with gcloud.")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands instead of running them")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("create", help="create a queued resource (or with --direct a TPU VM)")
  _add_common(p)
  _add_create(p)

  p = sub.add_parser("install", help="copy the repository and install it on every worker")
  _add_common(p)
  _add_install(p, required=True)

  p = sub.add_parser("run", help="start a trainer on every worker, in the background",
                     usage="tpu.py run [options] [-- --config.KEY=VALUE ...]")
  _add_common(p)
  _add_run(p)
  p.add_argument("--accelerator-type", default=None,
                 help="the slice's type, for the preflight's mesh check (and --fit)")
  p.set_defaults(version=None, any_zone=True)

  p = sub.add_parser("stop", help="stop the trainers on every worker (TERM, wait, KILL)")
  _add_common(p)
  p.add_argument("--run", default=None, help="run name (default: every run the launcher started)")
  p.add_argument("--worker", default="all", help="worker index, or all (default)")
  _add_grace(p)

  p = sub.add_parser("logs", help="tail a run's log on one worker")
  _add_common(p)
  p.add_argument("--worker", default="0", help="worker index (default 0)")
  p.add_argument("--run", default=None, help="run name (default: the newest log)")
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--follow", action="store_true", help="keep following the log")

  p = sub.add_parser("watch", help="relaunch a run after preemptions and crashes until it "
                                   "finishes", usage="tpu.py watch [options] [-- --config.KEY=VALUE ...]")
  _add_common(p)
  _add_create(p)
  _add_install(p, required=True)
  _add_run(p)
  _add_grace(p)
  p.add_argument("--launch", action="store_true",
                 help="install and start the run once the node is ready (default: the run "
                      "was already started with `run`)")
  p.add_argument("--max-restarts", type=int, default=10)
  p.add_argument("--poll-seconds", type=float, default=60.0)
  p.add_argument("--max-polls", type=int, default=0, help="stop after this many polls (0: never)")

  p = sub.add_parser("status", help="print the queued resource (or TPU VM) state")
  _add_common(p)
  _add_kind(p)

  p = sub.add_parser("delete", help="delete the queued resource and its node (or the TPU VM)")
  _add_common(p)
  _add_kind(p)
  return parser


def validate(args):
  if not _NAME_RE.match(args.name):
    raise UsageError(f"invalid --name {args.name!r}: lowercase letters, digits and '-', "
                     "starting with a letter, at most 63 characters")
  if not _ZONE_RE.match(args.zone):
    raise UsageError(f"invalid --zone {args.zone!r}: expected a zone such as us-west4-a")
  if hasattr(args, "direct"):
    args.queued = not args.direct
  accel = getattr(args, "accelerator_type", None)
  if accel is not None:
    if not _ACCEL_RE.match(accel):
      raise UsageError(f"invalid --accelerator-type {accel!r}: expected e.g. v5litepod-16, "
                       "v4-32")
  if getattr(args, "ref", None) and not getattr(args, "repo_url", None):
    raise UsageError("--ref needs --repo-url")
  if getattr(args, "commit", None) and getattr(args, "repo_url", None):
    if not _SHA_RE.match(args.commit):
      raise UsageError(f"invalid --commit {args.commit!r}: with --repo-url give the full "
                       "40-character SHA")
    if args.ref:
      raise UsageError("--commit and --ref name the same thing; give one")
  if hasattr(args, "workdir"):
    if not re.match(r"^gs://[^/]+/.+", args.workdir):
      raise UsageError(f"invalid --workdir {args.workdir!r}: every worker must see it, use "
                       "gs://BUCKET/PATH")
    if not _CONFIG_RE.match(args.config):
      raise UsageError(f"invalid --config {args.config!r}: expected a file such as "
                       "configs/tpu_1b.py")
    if args.run_name is not None and not _RUN_RE.match(args.run_name):
      raise UsageError(f"invalid --run-name {args.run_name!r}: letters, digits, '.', '_', '-'")
    for a in args.extra:
      if not a.startswith("--"):
        raise UsageError(f"invalid extra trainer argument {a!r}: expected --config.KEY=VALUE")
  elif args.extra:
    raise UsageError(f"'{args.command}' takes no trainer arguments after '--'")
  if getattr(args, "run", None) is not None and not _RUN_RE.match(args.run):
    raise UsageError(f"invalid --run {args.run!r}: letters, digits, '.', '_', '-'")
  if args.command == "logs" and (not re.match(r"^\d+$", args.worker) or args.lines < 1):
    raise UsageError("--worker must be a worker index and --lines positive")
  if args.command == "stop" and not re.match(r"^(\d+|all)$", args.worker):
    raise UsageError("--worker must be a worker index or all")
  if getattr(args, "grace_seconds", 0) < 0:
    raise UsageError("--grace-seconds must be >= 0")
  if args.command == "watch" and (args.max_restarts < 0 or args.poll_seconds < 0
                                  or args.max_polls < 0):
    raise UsageError("--max-restarts, --poll-seconds and --max-polls must be >= 0")


def parse(argv):
  argv = list(argv)
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  args = build_parser().parse_args(argv)
  args.extra = extra
  validate(args)
  return args


# What checks before it spends: the accelerator, zone, gcloud identity and config (tpu_preflight).
PREFLIGHT = ("create", "run", "watch")
COMMANDS = {"create": do_create, "install": do_install, "run": do_run, "stop": do_stop,
            "logs": do_logs, "watch": do_watch, "status": do_status, "delete": do_delete}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse(argv)
  except UsageError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 2
  runner = Runner(dry_run=args.dry_run)
  if args.command in PREFLIGHT:
    problems = tpu_preflight.run(args, runner.gcloud)
    for p in problems:
      print(f"tpu.py: error: {p}", file=sys.stderr)
    if problems:
      return 2
  try:
    runner.check_gcloud()
    rc = COMMANDS[args.command](runner, args)
  except CommandFailed as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return rc or 0


if __name__ == "__main__":
  sys.exit(main())
