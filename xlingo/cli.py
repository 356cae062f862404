"""The shared command line of the three loops: --config FILE[:arg] --workdir DIR [--config.K=V].

Bad input ends in one line on stderr naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import os
import sys

from xlingo.errors import XlingoError
from xlingo.stdio import native_stderr_silenced


def _one_line(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return msg[0] if msg else type(e).__name__


def parse_flags(argv, doc: str, define=None, workdir_help: str = "Run directory: checkpoints, "
                "metrics, plots."):
  """Parses --config FILE[:arg] [--config.K=V ...] --workdir DIR and the flags ``define(fl)``
  adds; returns the absl FlagValues. --help prints ``doc`` and every flag with its default; a
  missing or broken config file, a bad flag or override, or no --config exits 2 with one line.
  Only absl and ml_collections are imported here, so these errors come before jax/TensorFlow.
  """
  from absl import flags
  from ml_collections import config_flags

  fl = flags.FlagValues()
  # config_flags finds the config file's override flags by scanning sys.argv when parsing.
  sys.argv = list(argv)
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); override "
                                  "any key with --config.SECTION.KEY=VALUE.",
                                  lock_config=True, flag_values=fl)
  flags.DEFINE_string("workdir", None, workdir_help, flag_values=fl)
  if define is not None:
    define(fl)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flags_help(fl))
    sys.exit(0)
  path = None
  try:
    cfg_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if cfg_arg is None and "--config" in argv[:-1]:
      cfg_arg = argv[argv.index("--config") + 1]
    if cfg_arg is not None:
      path = cfg_arg.split(":", 1)[0]
      if not os.path.exists(path):
        fail(f"config file {path!r} does not exist; pass --config configs/<name>.py")
    fl(argv)
  except Exception as e:  # noqa: BLE001 - sorted below: the config file's own error, or a flag
    # config_flags wraps what the config file raised: look at the whole chain.
    chain = _chain(e)
    ours = next((x for x in reversed(chain) if isinstance(x, XlingoError)), None)
    if ours is not None:  # raised by the config file's get_config (e.g. a bad :arg)
      fail(_one_line(ours))
    syntax = next((x for x in chain if isinstance(x, SyntaxError)), None)
    if syntax is not None:
      fail(f"config file {syntax.filename} line {syntax.lineno}: {syntax.msg}; fix the file's "
           "Python syntax")
    where = next((w for w in (_frame_in(x, path) for x in chain) if w is not None), None)
    if where is not None:
      fail(f"config file {path} line {where}: {type(e).__name__}: {_one_line(e)}; fix the file "
           "(it must define get_config(arg=None) returning a ConfigDict)")
    if not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError)):
      raise
    key_error = next((x for x in reversed(chain) if isinstance(x, KeyError)), None)
    if key_error is not None:
      missing = str(key_error.args[0]).strip("'\"") if key_error.args else ""
      arg = next((a for a in argv[1:] if a.startswith("--config.") and missing and
                  missing in a.split("=", 1)[0].split(".")), None)
      if arg is not None:
        fail(f"unknown config key {arg.split('=', 1)[0][len('--config.'):]!r} in {arg}; only "
             "existing keys can be overridden (see the config file, e.g. --config.train.steps=10)")
    fail(f"bad flag or config override: {_one_line(e)} (see --help; only existing keys can be "
         "overridden, e.g. --config.train.steps=10)")
  if fl.config is None:
    fail("--config is required, e.g. --config configs/tiny.py")
  return fl


def flags_help(fl) -> str:
  """One line per flag: name, help, default (the ``--help`` listing of every xlingo command)."""
  lines = []
  for name in sorted(fl):
    flag = fl[name]
    if name != flag.name or name in ("help", "helpfull", "helpshort", "helpxml"):
      continue  # short aliases and absl's own help flags
    default = "" if flag.default is None else f" (default: {flag.default})"
    lines.append(f"  --{name}: {flag.help}{default}")
  return "\n".join(lines)


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _frame_in(e: BaseException, path: str | None) -> int | None:
  """The line of the innermost traceback frame that runs the config file ``path``, if any."""
  if not path:
    return None
  want = os.path.realpath(path)
  line = None
  tb = e.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == want:
      line = tb.tb_lineno
    tb = tb.tb_next
  return line


def parse(argv, doc: str):
  """Parses the loops' flags; returns (config, workdir). Exits 2 with one line on bad input."""
  fl = parse_flags(argv, doc)
  if not fl.workdir:
    fail("--workdir is required, e.g. --workdir workdirs/run1")
  return fl.config, fl.workdir


def fail(msg: str, code: int = 2):
  print(f"xlingo: error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def run_main(argv, doc: str, body) -> None:
  """Parse flags and call ``body(config, workdir)``, turning known errors into one line.

  SIGTERM and SIGINT are stop requests from here on (before the slow imports, the compile and
  the restore), so a signal at any point ends in a clean stop, never an exit 143.
  """
  from xlingo import preemption

  with preemption.handling():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    config, workdir = parse(argv, doc)
    distributed = maybe_initialize_distributed()
    run_body(lambda: body(config, workdir))
    if distributed:
      leave_distributed()


def leave_distributed() -> None:
  """Leave a multi-process run together: ``jax.distributed.shutdown`` holds every process at
  one barrier, so the coordinator (process 0) does not go away while the others are still
  tearing down their collectives, which otherwise may abort or hang a peer at exit."""
  import jax

  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def import_tensorflow_quietly() -> None:
  """Start JAX's backends, then load seqio and TensorFlow once, before a command's own output.

  JAX takes the accelerator before TensorFlow's import can look for one. The import itself is
  quiet wherever it happens (xlingo.stdio.hide_tensorflow_start_up: no start-up lines, no
  cuInit, GPUs hidden from TensorFlow, its TPU variables taken back). Called after the flags
  are parsed, so config errors still come before this heavy import.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _start_jax_backends()
  import seqio  # noqa: F401


# Device files of TPU chips (/dev/accel* on v4 and older, VFIO on v5e and later), NVIDIA and
# AMD GPUs: where none exists, JAX can only run on the CPU.
ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _start_jax_backends() -> None:
  """Initialise JAX's backends. On a machine with no accelerator, libtpu (installed with the
  test and tpu extras) still tries to start and prints five lines about unknown TPU workers;
  there its native output is silenced, since nothing but the CPU can come of it."""
  import glob

  import jax

  if os.environ.get("JAX_PLATFORMS") or any(glob.glob(p) for p in ACCELERATOR_FILES):
    jax.devices()
    return
  with native_stderr_silenced():
    jax.devices()


def run_tool(argv, doc: str, define, body, check=None) -> None:
  """The start-up of a tool that reads a checkpoint (evaluate, generate): parse --config,
  --workdir, --checkpoint and the tool's flags (``define(fl)``; ``check(fl)`` may refuse them
  with :func:`fail`), join a multi-process run, then ``body(fl)`` with one-line errors."""
  from absl import flags

  def define_all(fl):
    flags.DEFINE_string("checkpoint", None, "A checkpoint step directory instead of --workdir's "
                        "latest checkpoint.", flag_values=fl)
    define(fl)

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  fl = parse_flags(argv or sys.argv, doc, define_all,
                   workdir_help="Run directory (its latest checkpoint).")
  if check is not None:
    check(fl)
  maybe_initialize_distributed()
  run_body(lambda: body(fl))


def tool_checkpoint(fl) -> tuple[str | None, str]:
  """(the checkpoint a tool's flags name, the flag that names it): --checkpoint, else
  --workdir's latest."""
  return (fl.checkpoint, "--checkpoint") if fl.checkpoint else (fl.workdir, "--workdir")


def run_body(body) -> None:
  """Call ``body()``; an :class:`~xlingo.errors.XlingoError` becomes one line on stderr and
  its exit code (2, or 3 for a non-finite loss). Anything else is a bug: its traceback shows."""
  try:
    import_tensorflow_quietly()
    body()
  except XlingoError as e:
    if getattr(e, "abandons_threads", False):
      # A storage call may still be stuck in a thread (Orbax's, gcsfs's): the interpreter
      # would wait for it at exit, so leave now, after the one line.
      print(f"xlingo: error: {_one_line(e)}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(e.exit_code)
    fail(_one_line(e), e.exit_code)


def exit_when_done(main) -> None:
  """Run a command's ``main()``, then end the process without the interpreter's teardown.

  By the time a command returns, everything it writes is closed (checkpoints waited for,
  metrics and TensorBoard flushed), yet a normal exit still took 5-35 s on 2 CPU cores:
  garbage-collecting TensorFlow's and JAX's objects, each tf.data iterator's destructor
  waiting for its pipeline threads, then MLIR's thread-local caches (docs/PERFORMANCE.md,
  "Process exit"). So, in order: the interpreter's own first shutdown steps (wake
  concurrent.futures workers and join the non-daemon threads, e.g. Orbax's or gcsfs's), every
  ``atexit`` callback (logging, JAX, our input threads' halt), a flush of stdout and stderr,
  then ``os._exit`` with the command's code. Only for ``python -m`` runs: tests call ``main()``
  in-process. A traceback (a bug) still ends the ordinary way.
  """
  try:
    main()
    code = 0
  except SystemExit as e:
    code = e.code
  if code is None:
    code = 0
  elif not isinstance(code, int):  # sys.exit("message"): the interpreter prints it, exit 1
    print(code, file=sys.stderr)
    code = 1
  import atexit
  import threading

  threading._shutdown()  # noqa: SLF001 - what Py_FinalizeEx runs first, with no public name
  atexit._run_exitfuncs()  # noqa: SLF001
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing left to say there
      pass
  os._exit(code)


def maybe_initialize_distributed(initialize=None, slice_workers=None) -> bool:
  """Join a multi-process run (``jax.distributed.initialize``) when the environment is one.

  Must run before anything touches the devices. In order:
  - explicit: XLINGO_COORDINATOR=host:port with XLINGO_NUM_PROCESSES and XLINGO_PROCESS_ID
    (any platform; the CPU tests use it, their collectives through gloo);
  - XLINGO_DISTRIBUTED=1: JAX's own detection, whatever the cluster;
  - a Cloud TPU slice with more than one process, found the way JAX finds it (its
    ``GkeTpuCluster``: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES on GKE; its
    ``GceTpuCluster``: the GCE metadata server's worker list on a TPU VM made by gcloud; both
    times MEGASCALE_NUM_SLICES for multislice), then initialised with that same detection.
  A single-host TPU VM and a plain CPU or GPU machine run as one process.

  On a TPU VM, a process that would run alone although the metadata server lists several
  workers (TPU_SKIP_MDS_QUERY or TPU_WORKER_HOSTNAMES set by hand: JAX then never asks the
  server) stops with one line naming the variable, unless XLINGO_DISTRIBUTED=0 says so on
  purpose.

  ``initialize`` (called as ``initialize(**kwargs)``; default ``jax.distributed.initialize``)
  and ``slice_workers`` (called as ``slice_workers()``: the metadata server's worker count, or
  None; default :func:`metadata_worker_count`) are injectable, and the environment is read
  where JAX reads it (os.environ, JAX's metadata probe), so tests simulate each environment
  without starting anything. Returns True when this process is (now) part of a multi-process
  run.
  """
  import jax

  if initialize is None:
    if jax.distributed.is_initialized():
      return True
    initialize = _initialize_jax
  env = os.environ
  coordinator = env.get("XLINGO_COORDINATOR", "")
  if coordinator:
    try:
      num, pid = int(env["XLINGO_NUM_PROCESSES"]), int(env["XLINGO_PROCESS_ID"])
    except (KeyError, ValueError):
      fail("XLINGO_COORDINATOR is set, so XLINGO_NUM_PROCESSES and XLINGO_PROCESS_ID must be "
           "integers too")
    initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    return True
  if env.get("XLINGO_DISTRIBUTED") == "1":
    initialize()
    return True
  if env.get("XLINGO_DISTRIBUTED") == "0":
    return False
  cluster, count = _tpu_cluster()
  if cluster is not None and count > 1:
    # The same detection JAX would run, named so that no other cluster type (SLURM, MPI) wins.
    initialize(cluster_detection_method=cluster.name)
    return True
  _refuse_silent_single_process(slice_workers or metadata_worker_count)
  return False


# Set by hand on a GCE TPU VM, these make JAX's detection skip the metadata server's worker
# list (TPU_SKIP_MDS_QUERY) or take the GKE list instead (TPU_PROCESS_ADDRESSES,
# TPU_WORKER_HOSTNAMES): every host then trains alone. bench/tpu_aot.py sets two of them for
# its own process; copied into a profile they would be inherited by every run.
SINGLE_PROCESS_VARS = ("TPU_SKIP_MDS_QUERY", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
# The GCE metadata server by address (no DNS lookup to wait for), and how long to wait for it:
# it answers a VM in milliseconds.
METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints"
METADATA_TIMEOUT_S = 2.0


def metadata_worker_count() -> int | None:
  """How many workers the GCE metadata server lists for this TPU VM's slice; None when it does
  not answer within METADATA_TIMEOUT_S (not a GCE TPU VM, or no such attribute)."""
  import urllib.error
  import urllib.request

  host = os.environ.get("GCE_METADATA_IP", "169.254.169.254")
  req = urllib.request.Request(METADATA_URL.format(host=host),
                               headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(req, timeout=METADATA_TIMEOUT_S) as resp:
      text = resp.read().decode("utf-8", "replace")
  except (OSError, urllib.error.URLError, ValueError):
    return None
  return len([w for w in text.split(",") if w.strip()]) or None


def _refuse_silent_single_process(slice_workers) -> None:
  """Stop a TPU VM process that would run as a 1-process job while its slice has several
  workers, naming the variable that caused it. Asks the metadata server only on a TPU VM (JAX
  found libtpu and TPU chips) with one of SINGLE_PROCESS_VARS set, so other machines never
  wait on it."""
  from jax._src.clusters import cloud_tpu_cluster

  if not cloud_tpu_cluster.running_in_cloud_tpu_vm:
    return
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms:
    return  # a CPU-only process on a TPU VM (a compile, a tool) uses no slice
  culprits = [k for k in SINGLE_PROCESS_VARS if k in os.environ]
  if not culprits:
    return
  workers = slice_workers()
  if workers is None or workers <= 1:
    return
  named = " and ".join(f"{k}={os.environ[k]!r}" for k in culprits)
  fail(f"this TPU VM's slice has {workers} workers (GCE metadata server) but {named} is set, so "
       f"this process would train alone as a 1-process job; unset {' and '.join(culprits)} on "
       "every worker and start again (or set XLINGO_DISTRIBUTED=0 to run one host on purpose)")


def _tpu_cluster():
  """(JAX's TPU cluster class that is present, its process count) or (None, 1)."""
  from jax._src.clusters import cloud_tpu_cluster

  # JAX's own order: GKE's environment variables before the GCE metadata server.
  for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
    try:
      if cluster.is_env_present():
        return cluster, int(cluster.get_process_count())
    except Exception as e:  # noqa: BLE001 - the metadata server's failures come in many types
      fail(f"could not read this TPU VM's slice from {cluster.__name__} ({type(e).__name__}: "
           f"{_one_line(e)[:160]}); for one host set TPU_SKIP_MDS_QUERY=1, for several set "
           "XLINGO_COORDINATOR, XLINGO_NUM_PROCESSES and XLINGO_PROCESS_ID")
  return None, 1


def _initialize_jax(**kwargs) -> None:
  import jax

  if "coordinator_address" in kwargs:
    # Only the CPU client reads this; without it CPU collectives across processes fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
