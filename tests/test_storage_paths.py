"""xlingo.paths and the workdir lock, on a local disk and on a real GCS API (the emulator)."""

import dataclasses
import json
import os
import threading
import time

import pytest

from xlingo import paths
from xlingo.errors import CheckpointError, ConfigError
from xlingo.training import workdir as workdir_lib


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, monkeypatch):
  """A fresh directory: local, or a new bucket on the emulator. The cwd is a scratch directory,
  so a stray local 'gs:' directory would show."""
  monkeypatch.chdir(tmp_path)
  if request.param == "local":
    return str(tmp_path / "root")
  emu = request.getfixturevalue("gcs_emulator")
  return f"gs://{emu.bucket('paths')}/root"


def _no_local_gs_dir(tmp_path):
  assert not any(n.startswith("gs:") for n in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_files_and_directories(root, tmp_path):
  a = paths.join(root, "sub", "a.txt")
  assert not paths.exists(a) and paths.listdir(root) == []
  paths.makedirs(paths.join(root, "sub"))
  paths.write_text(a, "hello")
  assert paths.read_text(a) == "hello" and paths.isfile(a) and not paths.isdir(a)
  assert paths.isdir(paths.join(root, "sub")) and paths.listdir(root) == ["sub"]
  paths.write_bytes(a, b"\x00\x01")  # replaced whole
  assert paths.read_bytes(a) == b"\x00\x01" and paths.size(a) == 2
  paths.append_text(paths.join(root, "log"), "1\n")
  paths.append_text(paths.join(root, "log"), "2\n")
  assert paths.read_text(paths.join(root, "log")) == "1\n2\n"
  paths.write_text(paths.join(root, "sub", "b.json"), "{}")
  assert paths.glob(paths.join(root, "sub", "*.json")) == [paths.join(root, "sub", "b.json")]
  assert paths.tree_size(root) == 2 + 4 + 2
  paths.copy_tree(paths.join(root, "sub"), paths.join(root, "copy"))
  assert paths.listdir(paths.join(root, "copy")) == ["a.txt", "b.json"]
  paths.rename(paths.join(root, "copy"), paths.join(root, "moved"))
  assert sorted(paths.listdir(root)) == ["log", "moved", "sub"]
  paths.remove(paths.join(root, "log"))
  paths.remove(paths.join(root, "log"))  # already gone: nothing
  paths.rmtree(paths.join(root, "moved"))
  assert paths.listdir(root) == ["sub"]
  if paths.is_remote(root):
    with pytest.raises(ValueError, match="append_text"):
      paths.open(a, "a")
  _no_local_gs_dir(tmp_path)


def test_create_new_has_one_winner(root):
  target = paths.join(root, "lock", "1.json")
  results = []
  barrier = threading.Barrier(6)

  def contend(i):
    barrier.wait()
    results.append((paths.create_new(target, f"{i}".encode()), i))

  threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [i for ok, i in results if ok]
  assert len(winners) == 1
  assert paths.read_text(target) == str(winners[0])
  assert paths.create_new(target, b"again") is False


def test_remote_listing_sees_other_writers(gcs_emulator, monkeypatch, tmp_path):
  """Another process's file shows at once, though this process listed the directory before
  (gcsfs would otherwise answer from its listing cache)."""
  import gcsfs

  bucket = gcs_emulator.bucket("fresh")
  root = f"gs://{bucket}/run"
  paths.write_text(paths.join(root, "a"), "1")
  assert paths.listdir(root) == ["a"]
  other = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
  other.pipe_file(f"{bucket}/run/b", b"2")
  assert paths.listdir(root) == ["a", "b"]
  assert paths.exists(paths.join(root, "b"))


def test_disk_full_is_recognised_through_chains():
  import errno

  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as e:
    assert paths.is_disk_full(e)
  assert paths.is_disk_full(ValueError("Error writing local file: No space left on device"))
  assert not paths.is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --- the workdir lock -------------------------------------------------------------------------


def _lock_files(workdir):
  return sorted(paths.listdir(paths.join(workdir, "lock")))


def _read_holder(workdir, name):
  return json.loads(paths.read_text(paths.join(workdir, "lock", name)))


def _plant(workdir, n, **fields):
  """A lock file as another trainer would have left it."""
  h = dataclasses.asdict(workdir_lib.Holder.this_process()) | fields
  paths.write_text(paths.join(workdir, "lock", f"{n:08d}.json"), json.dumps(h))


def test_second_trainer_refused_then_lock_released(root):
  with workdir_lib.WorkdirLock(root) as first:
    with pytest.raises(ConfigError) as e:
      with workdir_lib.WorkdirLock(root):
        pass
    msg = str(e.value)
    assert "\n" not in msg and "in use by another trainer" in msg
    assert f"pid {os.getpid()}" in msg and first.me.host in msg
  assert _lock_files(root) == ["00000001.json"]
  assert _read_holder(root, "00000001.json")["released"] is True
  with workdir_lib.WorkdirLock(root):  # a released lock is free; the number grows
    assert _lock_files(root) == ["00000002.json"]


def test_stale_locks_are_taken_over(root, capsys):
  import subprocess
  import sys

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _plant(root, 3, pid=dead.pid, pid_start="1")  # this host, this boot, process gone
  with workdir_lib.WorkdirLock(root):
    assert _lock_files(root) == ["00000004.json"]
  out = capsys.readouterr().out
  assert "taking over the lock of a trainer that is gone" in out
  assert f"pid {dead.pid} is not running" in out
  # Another host: judged by its heartbeat.
  _plant(root, 9, host="other-vm", heartbeat=time.time() - workdir_lib.STALE_S - 5)
  with workdir_lib.WorkdirLock(root):
    pass
  assert "no heartbeat for" in capsys.readouterr().out
  _plant(root, 12, host="other-vm", heartbeat=time.time() - 5)
  with pytest.raises(ConfigError, match="host other-vm"):
    with workdir_lib.WorkdirLock(root):
      pass
  # A recreated VM with the same host name but another boot: the old process is gone.
  _plant(root, 13, boot_id="another-boot", heartbeat=time.time() - workdir_lib.STALE_S - 5)
  with workdir_lib.WorkdirLock(root):
    pass


def test_contenders_one_winner(root):
  got, refused = [], []
  barrier = threading.Barrier(5)

  def contend():
    lock = workdir_lib.WorkdirLock(root)
    barrier.wait()
    try:
      lock.acquire()
      got.append(lock)
    except ConfigError:
      refused.append(1)

  threads = [threading.Thread(target=contend) for _ in range(5)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(got) == 1 and len(refused) == 4
  got[0].release()


def test_failed_start_leaves_no_workdir(root):
  with pytest.raises(ConfigError):
    with workdir_lib.WorkdirLock(paths.join(root, "new", "wd")):
      raise ConfigError("bad config")
  assert not paths.exists(root)  # nor the parents it made
  # An existing workdir stays, released.
  paths.write_text(paths.join(root, "metrics.jsonl"), "")
  with pytest.raises(ConfigError):
    with workdir_lib.WorkdirLock(root):
      raise ConfigError("bad config")
  assert paths.exists(paths.join(root, "metrics.jsonl"))
  assert all(_read_holder(root, n)["released"] for n in _lock_files(root))


def test_heartbeat_and_taken_over_holder_stops(root):
  lock = workdir_lib.WorkdirLock(root, heartbeat_s=0.05)
  with lock:
    first = _read_holder(root, "00000001.json")["heartbeat"]
    time.sleep(0.5)
    assert _read_holder(root, "00000001.json")["heartbeat"] > first
    lock.check()  # still ours
    _plant(root, 2, host="other-vm")  # someone took it over while we stalled
    with pytest.raises(CheckpointError, match="taken over by another trainer"):
      lock.check()
  # The taker's lock is left alone.
  assert _read_holder(root, "00000002.json")["host"] == "other-vm"


def test_check_workdir_refuses_without_creating(gcs_emulator, tmp_path):
  from xlingo.training import loop

  with pytest.raises(ConfigError, match="is not writable") as e:
    loop.check_workdir("gs://no-such-bucket-here/run")
  assert "\n" not in str(e.value)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    loop.check_workdir(str(blocker))
  with pytest.raises(ConfigError, match="a_file is a file"):
    loop.check_workdir(str(blocker / "wd"))
  loop.check_workdir(str(tmp_path / "new" / "wd"))
  assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["a_file"]
  bucket = gcs_emulator.bucket("probe")
  loop.check_workdir(f"gs://{bucket}/run")
  assert paths.listdir(f"gs://{bucket}") == []


# --- storage calls that fail or stall -------------------------------------------------------


def test_transient_storage_errors_are_retried_others_raised_at_once():
  calls, retries = [], []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise OSError("upload failed") from ConnectionResetError("Connection reset by peer")
    return 7

  r = paths.Retrying(30, remote=True, on_retry=lambda *a: retries.append(a))
  assert r.run(flaky, "saving") == 7 and len(calls) == 3 and len(retries) == 2
  assert retries[0][0] == "saving" and "upload failed" in retries[0][1]

  def denied():
    calls.append(1)
    raise PermissionError("403 Forbidden")

  calls.clear()
  with pytest.raises(PermissionError):
    r.run(denied, "saving")
  assert len(calls) == 1
  calls.clear()  # a local disk does not come back by itself: no retry
  with pytest.raises(OSError):
    paths.Retrying(30, remote=False).run(flaky, "saving")
  assert len(calls) == 1


def test_a_stalled_call_gives_up_in_bounded_time_or_at_a_stop_request(monkeypatch):
  import threading
  import time

  release = threading.Event()
  t0 = time.monotonic()
  with pytest.raises(paths.StorageGaveUp) as e:
    paths.Retrying(1.5, remote=True).run(lambda: release.wait(60), "uploading")
  assert time.monotonic() - t0 < 5 and not e.value.stopped
  assert "StorageStall" in e.value.cause and e.value.since <= time.time()

  monkeypatch.setattr(paths.Retrying, "GRACE_S", 0.5)
  stop_at = time.monotonic() + 0.5
  t0 = time.monotonic()
  with pytest.raises(paths.StorageGaveUp) as e:
    paths.Retrying(600, remote=True, abort=lambda: time.monotonic() > stop_at).run(
        lambda: release.wait(60), "saving")
  assert time.monotonic() - t0 < 4 and e.value.stopped
  release.set()
