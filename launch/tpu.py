#!/usr/bin/env python3
# Copyright 2025 The xlingo Authors. Licensed under the Apache License, Version 2.0.
"""Cloud TPU VM launcher for xlingo: create, install, run, logs, watch, status, delete.

Standard library only, so it runs on a laptop without xlingo installed. Every cloud action is a
`gcloud` command (found as $GCLOUD, else `gcloud` on PATH); `--dry-run` prints each one
("+ " and the shell-quoted command) instead of running it. See docs/TPU.md.

  python3 launch/tpu.py create  --name N --zone Z --accelerator-type v5litepod-16 [--spot]
  python3 launch/tpu.py install --name N --zone Z --from-local | --repo-url URL
  python3 launch/tpu.py run     --name N --zone Z --workdir gs://B/run --module xlingo.train \\
                                --config configs/tpu_1b.py [-- --config.KEY=VALUE ...]
  python3 launch/tpu.py logs    --name N --zone Z [--worker 0] [--follow]
  python3 launch/tpu.py watch   (create + install + run arguments) [--max-restarts K]
  python3 launch/tpu.py delete  --name N --zone Z [--queued]

Exit codes: 0 success, 1 a gcloud command failed or the watcher gave up, 2 invalid arguments.
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

# The trainers print this as their last line when training completes; the watcher stops on it.
FINISHED_MARKER = "xlingo: training finished"
# Printed by the remote status check when no trainer process is alive and the run is unfinished.
STOPPED_MARKER = "xlingo-launch: trainer not running"

MODULES = ("xlingo.train", "xlingo.adapt", "xlingo.distill")
DEFAULT_VERSION = "tpu-ubuntu2204-base"
# Where the TPU libtpu wheels are published (jax[tpu] pulls libtpu from it).
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# setup.py requires Python >= 3.11; TPU images ship an older system Python, so the remote
# environment is a uv-managed virtual environment with this interpreter.
PYTHON_VERSION = "3.11"
# Remote layout on every worker (shell syntax: expanded by the remote shell).
REMOTE_REPO = "$HOME/xlingo"
REMOTE_VENV = "$HOME/xlingo_venv"
REMOTE_LOGS = "$HOME/xlingo_logs"
REMOTE_TARBALL = "xlingo.tar.gz"  # relative to the remote home directory

# Node states: tpu-vm `state`, queued resource `state.state`.
READY_STATES = {"READY", "ACTIVE"}
PREEMPTED_STATES = {"tpu": {"PREEMPTED"}, "queued": {"SUSPENDED", "FAILED"}}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")
_ACCEL_RE = re.compile(r"^v\d+[a-z]*-\d+$")
_CONFIG_RE = re.compile(r"^[\w./-]+\.py(:.*)?$")
_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UsageError(Exception):
  """Invalid command-line arguments (exit 2)."""


class CommandFailed(Exception):
  """A gcloud (or git) command exited non-zero (exit 1)."""


def jax_version():
  """The jax version pinned in setup.py, so the TPU wheel matches the CPU one used in tests."""
  try:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
      m = re.search(r'"jax\[\w+\]==([\w.]+)"', f.read())
    return m.group(1) if m else None
  except OSError:
    return None


def pip_install_script(repo=REMOTE_REPO):
  """The one place that installs xlingo and the TPU jax wheel into the remote environment."""
  version = jax_version()
  jax_req = f"jax[tpu]=={version}" if version else "jax[tpu]"
  uv = "$HOME/.local/bin/uv"
  return " && ".join([
    "(python3 -m pip install --user -q -U uv"
    " || python3 -m pip install --user -q -U --break-system-packages uv)",
    f"([ -x {REMOTE_VENV}/bin/python ] || {uv} venv -q --python {PYTHON_VERSION} {REMOTE_VENV})",
    f"{uv} pip install -q --python {REMOTE_VENV}/bin/python -e {repo} "
    f"{shlex.quote(jax_req)} -f {LIBTPU_INDEX}",
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

  def g(self, args, **kw):
    return self.run([self.gcloud, *args], **kw)


def _scope(args):
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def ssh(runner, args, command, worker="all", **kw):
  return runner.g(["compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args),
                   f"--worker={worker}", f"--command={command}"], **kw)


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
  runner.g(cmd)
  if args.queued and not runner.dry_run:
    print(f"[tpu] queued resource {args.name} requested; it is usable once `status` says ACTIVE")


def _delete(runner, args, check=True):
  if args.queued:
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
  print(state or "UNKNOWN (describe failed)")
  return 0 if state else 1


def do_install(runner, args):
  if args.from_local:
    tmp = tempfile.mkdtemp(prefix="xlingo-tpu-")
    tarball = os.path.join(tmp, REMOTE_TARBALL)
    try:
      runner.run(["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", tarball, "HEAD"])
      runner.g(["compute", "tpus", "tpu-vm", "scp", "--recurse", tarball,
                f"{args.name}:{REMOTE_TARBALL}", *_scope(args), "--worker=all"])
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    fetch = (f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && "
             f"tar -xzf $HOME/{REMOTE_TARBALL} -C {REMOTE_REPO}")
  else:
    ref = f" --branch {shlex.quote(args.ref)}" if args.ref else ""
    fetch = (f"rm -rf {REMOTE_REPO} && "
             f"git clone -q --depth 1{ref} {shlex.quote(args.repo_url)} {REMOTE_REPO}")
  ssh(runner, args, f"set -e; {fetch} && {pip_install_script()}")


def run_name(args):
  return args.run_name or re.sub(r"[^A-Za-z0-9._-]", "_", args.workdir.rstrip("/").split("/")[-1])


def trainer_command(args):
  """The exact trainer command every worker runs (relative to the remote repository)."""
  argv = [f"{REMOTE_VENV}/bin/python", "-m", args.module, "--config", args.config,
          "--workdir", args.workdir, *args.extra]
  # The venv path stays unquoted so that the remote shell expands $HOME.
  return " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])


def run_script(args):
  """Remote script: refuse a second copy, record the command, start the trainer under nohup."""
  name = run_name(args)
  log, pid, cmd_file = (f"{REMOTE_LOGS}/{name}.{ext}" for ext in ("log", "pid", "cmd"))
  cmd = trainer_command(args)
  return "; ".join([
    f"mkdir -p {REMOTE_LOGS}",
    f"cd {REMOTE_REPO}",
    f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
    f"echo 'xlingo-launch: {name} is already running' >&2; exit 1; fi",
    f"echo {shlex.quote(cmd)} > {cmd_file}",
    f'{{ echo "=== $(date -u +%FT%TZ) $(hostname)"; cat {cmd_file}; }} >> {log}',
    f"nohup {cmd} >> {log} 2>&1 < /dev/null & echo $! > {pid}",
    f"echo \"xlingo-launch: started {name} on $(hostname), log {log}\"",
  ])


def do_run(runner, args):
  if not runner.dry_run:
    print(f"[tpu] on every worker of {args.name}: {trainer_command(args)}")
  ssh(runner, args, run_script(args))


def do_logs(runner, args):
  if args.run:
    log = f"{REMOTE_LOGS}/{args.run}.log"
  else:
    log = f'"$(ls -t {REMOTE_LOGS}/*.log | head -n 1)"'
  tail = "tail -F" if args.follow else "tail"
  ssh(runner, args, f"{tail} -n {args.lines} {log}", worker=args.worker)


def check_script(args):
  """Remote check on worker 0: prints FINISHED_MARKER, STOPPED_MARKER or 'running'."""
  name = run_name(args)
  log, pid = f"{REMOTE_LOGS}/{name}.log", f"{REMOTE_LOGS}/{name}.pid"
  return (f"if grep -qF {shlex.quote(FINISHED_MARKER)} {log} 2>/dev/null; then "
          f"echo {shlex.quote(FINISHED_MARKER)}; "
          f'elif [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo running; '
          f"else echo {shlex.quote(STOPPED_MARKER)}; tail -n 20 {log} 2>/dev/null; fi")


def run_status(runner, args):
  """'finished', 'stopped' or 'running' (also when the check itself fails)."""
  rc, out = ssh(runner, args, check_script(args), worker="0", capture=True, check=False)
  if rc != 0:
    return "running"
  if FINISHED_MARKER in out:
    return "finished"
  if STOPPED_MARKER in out:
    sys.stdout.write(out)
    return "stopped"
  return "running"


def _log(msg):
  print(f"[tpu watch {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def do_watch(runner, args):
  """The preemption watcher.

  Phases: 'monitor' (trainer launched; check for completion or a dead trainer),
  'recreate' (node preempted; delete it and create it again, retried until create succeeds), 'launch' (wait for READY/ACTIVE, then install + run).
  A preempted node is deleted and recreated, then the same run command is started again and
  the trainer resumes from the latest checkpoint in the workdir.
  """
  kind = "queued" if args.queued else "tpu"
  if runner.dry_run:
    print("# each poll:")
    get_state(runner, args)
    run_status(runner, args)
    print("# after a preemption (delete, create, then install and run once READY/ACTIVE):")
    do_delete(runner, args)
    do_create(runner, args)
    do_install(runner, args)
    do_run(runner, args)
    return 0

  phase = "launch" if args.launch else "monitor"
  restarts, polls = 0, 0
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
          if restarts >= args.max_restarts:
            _log(f"{args.name} is {state} and {restarts} restarts were used; giving up")
            return 1
          restarts += 1
          _log(f"{args.name} is {state}: recreating it (restart {restarts}/{args.max_restarts})")
          phase = "recreate"
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
        _log(f"{args.name} is {state}: installing and starting {run_name(args)}")
        do_install(runner, args)
        do_run(runner, args)
        phase = "monitor"
        continue
      status = run_status(runner, args)
      if status == "finished":
        _log(f"{run_name(args)} finished ({restarts} restarts)")
        return 0
      if status == "stopped":
        if restarts >= args.max_restarts:
          _log(f"trainer stopped unfinished and {restarts} restarts were used; giving up")
          return 1
        restarts += 1
        _log(f"trainer stopped unfinished: starting it again "
             f"(restart {restarts}/{args.max_restarts})")
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
  p.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                 help="print the gcloud commands instead of running them")


def _add_queued(p):
  p.add_argument("--queued", action="store_true",
                 help="the node belongs to a queued resource of the same name")


def _add_create(p):
  p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32")
  p.add_argument("--version", default=DEFAULT_VERSION, help="TPU runtime (software) version")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
  _add_queued(p)


def _add_install(p, required):
  g = p.add_mutually_exclusive_group(required=required)
  g.add_argument("--repo-url", help="git URL to clone on every worker")
  g.add_argument("--from-local", action="store_true",
                 help="copy `git archive HEAD` of this checkout to every worker")
  p.add_argument("--ref", default=None, help="branch or tag to clone (with --repo-url)")


def _add_run(p):
  p.add_argument("--workdir", required=True, help="gs://bucket/path shared by all workers")
  p.add_argument("--module", required=True, choices=MODULES)
  p.add_argument("--config", required=True, help="config file, e.g. configs/tpu_1b.py")
  p.add_argument("--run-name", default=None,
                 help="log name on the workers (default: last component of --workdir)")


def build_parser():
  parser = _Parser(prog="tpu.py", description="Run xlingo on Cloud TPU VMs with gcloud.")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands instead of running them")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("create", help="create a TPU VM (or a queued resource)")
  _add_common(p)
  _add_create(p)

  p = sub.add_parser("install", help="copy the repository and install it on every worker")
  _add_common(p)
  _add_install(p, required=True)

  p = sub.add_parser("run", help="start a trainer on every worker, in the background",
                     usage="tpu.py run [options] [-- --config.KEY=VALUE ...]")
  _add_common(p)
  _add_run(p)

  p = sub.add_parser("logs", help="tail a run's log on one worker")
  _add_common(p)
  p.add_argument("--worker", default="0", help="worker index (default 0)")
  p.add_argument("--run", default=None, help="run name (default: the newest log)")
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--follow", action="store_true", help="keep following the log")

  p = sub.add_parser("watch", help="relaunch a run after Spot preemptions until it finishes",
                     usage="tpu.py watch [options] [-- --config.KEY=VALUE ...]")
  _add_common(p)
  _add_create(p)
  _add_install(p, required=True)
  _add_run(p)
  p.add_argument("--launch", action="store_true",
                 help="install and start the run once the node is ready (default: the run "
                      "was already started with `run`)")
  p.add_argument("--max-restarts", type=int, default=10)
  p.add_argument("--poll-seconds", type=float, default=60.0)
  p.add_argument("--max-polls", type=int, default=0, help="stop after this many polls (0: never)")

  p = sub.add_parser("status", help="print the node (or queued resource) state")
  _add_common(p)
  _add_queued(p)

  p = sub.add_parser("delete", help="delete the TPU VM (or the queued resource)")
  _add_common(p)
  _add_queued(p)
  return parser


def validate(args):
  if not _NAME_RE.match(args.name):
    raise UsageError(f"invalid --name {args.name!r}: lowercase letters, digits and '-', "
                     "starting with a letter, at most 63 characters")
  if not _ZONE_RE.match(args.zone):
    raise UsageError(f"invalid --zone {args.zone!r}: expected a zone such as us-west4-a")
  accel = getattr(args, "accelerator_type", None)
  if accel is not None and not _ACCEL_RE.match(accel):
    raise UsageError(f"invalid --accelerator-type {accel!r}: expected e.g. v5litepod-16, v4-32")
  if getattr(args, "ref", None) and not getattr(args, "repo_url", None):
    raise UsageError("--ref needs --repo-url")
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
  if args.command == "logs" and (not re.match(r"^\d+$", args.worker) or args.lines < 1):
    raise UsageError("--worker must be a worker index and --lines positive")
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


COMMANDS = {"create": do_create, "install": do_install, "run": do_run, "logs": do_logs,
            "watch": do_watch, "status": do_status, "delete": do_delete}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    args = parse(argv)
  except UsageError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 2
  runner = Runner(dry_run=args.dry_run)
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
