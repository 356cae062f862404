"""One trainer per workdir: a lock kept in the workdir itself, local or ``gs://`` alike.

The lock is a numbered series of small JSON files, ``WORKDIR/lock/<n>.json``, each naming its
holder (host, pid, boot id, start time, a heartbeat refreshed every ``HEARTBEAT_S``). The
highest number is the lock's current state. To take the lock a trainer creates the next number
with the path layer's ``create_new`` (``O_EXCL`` locally; on GCS an upload with the precondition
``ifGenerationMatch=0``), so when several try at once exactly one succeeds; the others read the
winner and refuse. Releasing rewrites one's own file as released (numbers only grow, so a slow
reader can never create a number another trainer already holds).

Guarantee: at most one trainer holds a workdir, given (1) atomic create-if-absent (local
filesystems; GCS), (2) a listing that shows a file once its create returned (local; GCS lists
are strongly consistent), and (3) a live holder that heartbeats at least every ``STALE_S``. A
holder that stalls for longer (a suspended VM) can be taken over; it finds out at its next
heartbeat or checkpoint save, whichever comes first, and stops without writing another
checkpoint. Plain epath has no create-if-absent, so this goes through gcsfs for ``gs://``.

Stale locks: a holder on this host (same boot) whose process is gone is stale at once; a holder
elsewhere (or before a reboot, a recreated VM) is stale when its heartbeat is older than
``STALE_S``. A stale lock is taken over with a message naming the old holder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid

from xlingo import paths
from xlingo.errors import CheckpointError, ConfigError
from xlingo.training.layout import LOCK as LOCK_DIR

HEARTBEAT_S = 30.0
STALE_S = 300.0


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:  # local system file, not a user path
      return f.read().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """The kernel's start time of ``pid`` (clock ticks since boot), '' if unknown or gone: a pid
  reused by another process has another start time."""
  try:
    with open(f"/proc/{pid}/stat") as f:  # local system file, not a user path
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _alive(pid: int, start: str) -> bool:
  if start and os.path.exists("/proc/self/stat"):
    return _process_start(pid) == start
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@dataclasses.dataclass
class Holder:
  host: str
  pid: int
  boot_id: str
  pid_start: str
  started: float
  heartbeat: float
  token: str
  command: str = ""
  released: bool = False

  @classmethod
  def this_process(cls) -> Holder:
    now = time.time()
    return cls(host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(),
               pid_start=_process_start(os.getpid()), started=now, heartbeat=now,
               token=uuid.uuid4().hex, command=" ".join(sys.argv)[:300])

  def describe(self) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
    return f"host {self.host}, pid {self.pid}, started {started}"

  def stale_reason(self, now: float) -> str | None:
    """Why this holder is gone, or None while it may still be running."""
    if self.released:
      return None
    me = socket.gethostname()
    if self.host == me and self.boot_id and self.boot_id == _boot_id():
      return None if _alive(self.pid, self.pid_start) else f"pid {self.pid} is not running"
    age = now - self.heartbeat
    if age > STALE_S:
      return f"no heartbeat for {age:.0f} s (more than {STALE_S:.0f} s)"
    return None


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds the workdir for this trainer (process 0 takes it; the
  other processes of a multi-host run follow its answer). On leaving, the lock is released;
  when the block failed in a workdir that this run created and nothing but the lock was
  written, the workdir is removed again (a config error leaves nothing behind)."""

  def __init__(self, workdir: str, *, is_leader: bool = True, heartbeat_s: float = HEARTBEAT_S):
    self.workdir = paths.resolve(workdir)
    self.dir = paths.join(self.workdir, LOCK_DIR)
    self.is_leader = is_leader
    self.heartbeat_s = heartbeat_s
    self.me = Holder.this_process()
    self.number: int | None = None
    self.lost: str | None = None
    self._created: str | None = None  # the outermost directory this run created, if any
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # --- the files ----------------------------------------------------------------------------

  def _path(self, n: int) -> str:
    return paths.join(self.dir, f"{n:08d}.json")

  def _numbers(self) -> list[int]:
    return sorted(int(name[:-5]) for name in paths.listdir(self.dir)
                  if name.endswith(".json") and name[:-5].isdigit())

  def _read(self, n: int) -> Holder | None:
    """The holder in file ``n``; None while its creator is still writing it (or it vanished)."""
    try:
      data = json.loads(paths.read_text(self._path(n)))
      return Holder(**{f.name: data[f.name] for f in dataclasses.fields(Holder)
                       if f.name in data})
    except (OSError, ValueError, TypeError):
      return None

  def _write_own(self) -> None:
    paths.write_text(self._path(self.number), json.dumps(dataclasses.asdict(self.me)))

  # --- acquire / release ---------------------------------------------------------------------

  def acquire(self) -> None:
    if not paths.exists(self.workdir):
      self._created = self.workdir
      while not paths.is_remote(self._created) and not paths.exists(
          paths.dirname(self._created)):
        self._created = paths.dirname(self._created)
    unreadable = None
    for _ in range(20):
      numbers = self._numbers()
      taking_over = None
      if numbers:
        n = numbers[-1]
        holder = self._read(n)
        if holder is None:
          # Just created and not yet written, or unreadable: judge by the file's age.
          age = time.time() - _mtime_or_now(self._path(n))
          if age <= STALE_S:
            unreadable = self._path(n)
            time.sleep(0.5)
            continue
          taking_over = f"an unreadable lock file {self._path(n)} (untouched for {age:.0f} s)"
        elif not holder.released:
          reason = holder.stale_reason(time.time())
          if reason is None:
            age = time.time() - holder.heartbeat
            raise ConfigError(
                f"--workdir {self.workdir} is in use by another trainer ({holder.describe()}, "
                f"last heartbeat {age:.0f} s ago); wait for it to finish or stop it, or choose "
                f"another --workdir (a dead holder's lock is taken over: at once on its own "
                f"host, after {STALE_S:.0f} s without a heartbeat elsewhere)")
          taking_over = f"the lock of a trainer that is gone ({holder.describe()}: {reason})"
      nxt = numbers[-1] + 1 if numbers else 1
      self.me.heartbeat = time.time()
      if paths.create_new(self._path(nxt), json.dumps(dataclasses.asdict(self.me)).encode()):
        self.number = nxt
        if taking_over:
          print(f"xlingo: taking over {taking_over} in {self.workdir}", flush=True)
        for old in numbers:  # history only; the newest number is what counts
          _remove_quietly(self._path(old))
        return
      # Another trainer created that number first: look again (it will usually refuse us).
    if unreadable is not None:
      raise ConfigError(f"--workdir {self.workdir}: the lock file {unreadable} is empty or "
                        "unreadable (a trainer starting, or one killed while writing it); if no "
                        f"trainer is starting there, remove it, or wait {STALE_S:.0f} s")
    raise ConfigError(f"--workdir {self.workdir}: could not take the workdir lock in {self.dir} "
                      "(it keeps changing); is another trainer starting there?")

  def check(self) -> None:
    """Raise if another trainer took the lock over (this one stalled past STALE_S); called
    before every checkpoint save, so a taken-over trainer never writes another one."""
    if not self.is_leader or self.number is None:
      return
    if self.lost is None:
      newer = [n for n in self._numbers() if n > self.number]
      if newer:
        other = self._read(newer[-1])
        self.lost = other.describe() if other else f"lock file {self._path(newer[-1])}"
    if self.lost is not None:
      raise CheckpointError(
          f"--workdir {self.workdir} was taken over by another trainer ({self.lost}) after this "
          f"one sent no heartbeat for {STALE_S:.0f} s; stopping without saving")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.check()
        self.me.heartbeat = time.time()
        self._write_own()
      except CheckpointError:
        return
      except Exception:  # noqa: BLE001 - a failed heartbeat is retried; check() guards saves
        continue

  def release(self, failed: bool = False) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    if self.number is None or self.lost is not None:
      return
    if failed and self._created and paths.listdir(self.workdir) == [LOCK_DIR]:
      paths.rmtree(self._created)  # a run that failed before writing anything leaves nothing
    else:
      self.me.released = True
      self._write_own()
    self.number = None

  def __enter__(self) -> WorkdirLock:
    ok = True
    error = None
    if self.is_leader:
      try:
        self.acquire()
      except ConfigError as e:
        ok, error = False, e
    ok = _agree(ok)
    if error is not None:
      raise error
    if not ok:
      raise ConfigError(f"--workdir {self.workdir} is in use by another trainer (see process "
                        "0's message)")
    if self.is_leader:
      self._thread = threading.Thread(target=self._beat, name="xlingo-workdir-lock",
                                      daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb):
    if self.is_leader:
      self.release(failed=exc_type is not None)


def _agree(ok: bool) -> bool:
  """Process 0's answer, on every process of a multi-process run."""
  if "jax" not in sys.modules:
    return ok
  import jax

  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _mtime_or_now(path: str) -> float:
  try:
    return paths.mtime(path)
  except OSError:
    return time.time()


def _remove_quietly(path: str) -> None:
  try:
    paths.remove(path)
  except OSError:
    pass
