"""Multi-host start-up (cli.maybe_initialize_distributed) in simulated environments, and stop
requests (SIGTERM/SIGINT) as the loop sees them.

The TPU environments are simulated under JAX's own cluster classes: the Cloud TPU VM flag and
the GCE metadata server are replaced, the classes' logic is JAX's, and ``initialize`` records
what would have been called.
"""

import os
import signal

import pytest
from jax._src.clusters import cloud_tpu_cluster

from xlingo import cli, preemption

TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY",
            "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_COORDINATOR_ADDRESS",
            "XLINGO_COORDINATOR", "XLINGO_NUM_PROCESSES", "XLINGO_PROCESS_ID",
            "XLINGO_DISTRIBUTED", "JAX_COORDINATOR_PORT")


def _gce_metadata(workers, tpu_env="", worker=0):
  """A GCE metadata server for a TPU VM slice: ``workers`` endpoints, this VM's number."""
  values = {"agent-worker-number": str(worker), "worker-network-endpoints": ",".join(workers),
            "tpu-env": tpu_env}
  asked = []

  def get_metadata(key):
    asked.append(key)
    return values[key], 200

  return get_metadata, asked


@pytest.fixture
def sim(monkeypatch):
  """Simulate a machine: ``sim(tpu_vm=..., metadata=..., env={...})`` -> (returned, calls)."""
  def run(tpu_vm=False, metadata=None, env=None):
    for k in TPU_VARS:
      monkeypatch.delenv(k, raising=False)
    # The tests' JAX_PLATFORMS=cpu would mark a CPU-only process; a simulated TPU VM has none.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", tpu_vm)

    def no_metadata_server(key):
      raise AssertionError(f"metadata server asked for {key!r} off a TPU VM")

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", metadata or no_metadata_server)
    for k, v in (env or {}).items():
      monkeypatch.setenv(k, v)
    calls = []

    def slice_workers():  # the guard's own query, answered by the same simulated server
      if metadata is None:
        return None
      return len([w for w in metadata("worker-network-endpoints")[0].split(",") if w]) or None

    got = cli.maybe_initialize_distributed(initialize=lambda **kw: calls.append(kw),
                                           slice_workers=slice_workers)
    return got, calls

  return run


def test_plain_cpu_machine_is_one_process(sim):
  # Not a TPU VM: a stray TPU_WORKER_HOSTNAMES (the old trigger) does not start anything.
  assert sim(env={"TPU_WORKER_HOSTNAMES": "a,b"}) == (False, [])


def test_gce_tpu_vm_single_host(sim):
  md, asked = _gce_metadata(["t1v-n-abc-w-0"])
  assert sim(tpu_vm=True, metadata=md) == (False, [])
  assert "worker-network-endpoints" in asked


def test_gce_tpu_vm_multi_host_uses_jax_detection(sim):
  # The old format of worker-network-endpoints: name:id:ip triples, as on v4-32 (4 hosts).
  workers = [f"t1v-n-abc-w-{i}:{i}:10.130.0.{i + 2}" for i in range(4)]
  md, _ = _gce_metadata(workers, worker=2)
  got, calls = sim(tpu_vm=True, metadata=md)
  assert got is True and calls == [{"cluster_detection_method": "gcetpu"}]
  # What JAX itself then derives from the same machine (its code, our simulated machine).
  from jax._src import clusters

  addr, num, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, "gcetpu", 5)
  assert (addr, num, pid) == ("10.130.0.2:8482", 4, 2)


def test_gce_multislice_of_single_hosts(sim):
  md, _ = _gce_metadata(["t1v-n-abc-w-0"], tpu_env="MEGASCALE_NUM_SLICES: '2'\n")
  got, calls = sim(tpu_vm=True, metadata=md)
  assert got is True and calls == [{"cluster_detection_method": "gcetpu"}]


def test_gke_multi_and_single_host(sim):
  # GKE nodes have a metadata server too (JAX reads the slice count from it), without the TPU
  # VM's worker list.
  md, asked = _gce_metadata([])
  got, calls = sim(tpu_vm=True, metadata=md,
                   env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "1"})
  assert got is True and calls == [{"cluster_detection_method": "gketpu"}]
  assert "worker-network-endpoints" not in asked
  # One host on GKE: JAX would pick GKE first too, and there is no one to join.
  assert sim(tpu_vm=True, metadata=md,
             env={"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}) == (False, [])


def test_tpu_vm_that_skips_the_metadata_server(sim):
  assert sim(tpu_vm=True, env={"TPU_SKIP_MDS_QUERY": "1"}) == (False, [])


@pytest.mark.parametrize("env, culprit", [
  ({"TPU_SKIP_MDS_QUERY": "1"}, "TPU_SKIP_MDS_QUERY"),
  # bench/tpu_aot.py's own setting, copied into a profile: JAX takes it for a 1-host GKE slice.
  ({"TPU_WORKER_HOSTNAMES": "localhost"}, "TPU_WORKER_HOSTNAMES"),
])
def test_multi_worker_slice_refuses_a_silent_single_process_start(sim, capsys, env, culprit):
  workers = [f"t1v-n-abc-w-{i}:{i}:10.130.0.{i + 2}" for i in range(4)]
  md, _ = _gce_metadata(workers, worker=1)
  with pytest.raises(SystemExit) as e:
    sim(tpu_vm=True, metadata=md, env=env)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert "has 4 workers" in err[0] and f"unset {culprit}" in err[0] and "1-process" in err[0]
  # On purpose: one host alone.
  assert sim(tpu_vm=True, metadata=md, env={**env, "XLINGO_DISTRIBUTED": "0"}) == (False, [])
  # A CPU-only process on the VM uses no slice; a single-worker slice is what it says.
  assert sim(tpu_vm=True, metadata=md, env={**env, "JAX_PLATFORMS": "cpu"}) == (False, [])
  md1, _ = _gce_metadata(["t1v-n-abc-w-0"])
  assert sim(tpu_vm=True, metadata=md1, env=env) == (False, [])


def test_metadata_worker_count_reads_the_server_and_gives_up_fast(monkeypatch):
  import http.server
  import socket
  import threading
  import time

  class Server(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
      ok = (self.path.endswith("/attributes/worker-network-endpoints")
            and self.headers.get("Metadata-Flavor") == "Google")
      body = b"w-0:0:10.0.0.2,w-1:1:10.0.0.3,w-2:2:10.0.0.4,w-3:3:10.0.0.5"
      self.send_response(200 if ok else 404)
      self.end_headers()
      self.wfile.write(body if ok else b"")

    def log_message(self, *a):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Server)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    assert cli.metadata_worker_count() == 4
  finally:
    server.shutdown()
  with socket.socket() as s:  # a port nothing listens on: refused at once
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{port}")
  start = time.monotonic()
  assert cli.metadata_worker_count() is None
  assert time.monotonic() - start < cli.METADATA_TIMEOUT_S + 1


def test_explicit_coordinator_and_opt_in(sim):
  got, calls = sim(env={"XLINGO_COORDINATOR": "127.0.0.1:1234", "XLINGO_NUM_PROCESSES": "2",
                        "XLINGO_PROCESS_ID": "1"})
  assert got is True
  assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                    "process_id": 1}]
  assert sim(env={"XLINGO_DISTRIBUTED": "1"}) == (True, [{}])


def test_bad_environment_is_one_line(sim, capsys):
  with pytest.raises(SystemExit) as e:
    sim(env={"XLINGO_COORDINATOR": "127.0.0.1:1234", "XLINGO_NUM_PROCESSES": "two"})
  assert e.value.code == 2
  assert "XLINGO_NUM_PROCESSES" in capsys.readouterr().err

  def unreachable(key):
    raise ConnectionError("metadata.google.internal: Name or service not known")

  with pytest.raises(SystemExit) as e:
    sim(tpu_vm=True, metadata=unreachable)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "TPU_SKIP_MDS_QUERY" in err[0]


# --- stop requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_a_stop_request_and_handlers_are_restored(sig):
  before = signal.getsignal(sig)
  with preemption.handling() as req:
    assert not req.should_stop(1)
    os.kill(os.getpid(), sig)
    assert req.should_stop(2) and req.requested_locally()
    assert req.label == {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}[sig]
  assert signal.getsignal(sig) == before
  assert preemption.REQUEST.name is None  # the next run starts clean


def test_second_ctrl_c_aborts():
  with preemption.handling():
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


# --- two real processes: a SIGTERM to one host stops both, with no per-step host sync -----------

# Runs the trainer with every blocking device->host read counted per training step (the count of
# compiled-step calls so far), written to PROBE_OUT at exit: np.asarray / np.array of a
# jax.Array (what device_get and process_allgather end in; on CPU it reads through the buffer
# protocol, not jax.Array._value), _value (float(), int(), bool(), .item()) and
# block_until_ready.
PROBE = '''
import atexit, collections, json, os, sys
import jax
import numpy as np
from jax._src import array as _array
from jax._src import stages as _stages

reads = collections.Counter()
step = [0]

def _counting(fn):
  def wrapped(x, *a, **k):
    if isinstance(x, jax.Array):
      reads.update([step[0]])
    return fn(x, *a, **k)
  return wrapped

np.asarray, np.array = _counting(np.asarray), _counting(np.array)
_value = _array.ArrayImpl._value
_array.ArrayImpl._value = property(lambda self: (reads.update([step[0]]), _value.fget(self))[1])
_ready = _array.ArrayImpl.block_until_ready
_array.ArrayImpl.block_until_ready = lambda self: (reads.update([step[0]]), _ready(self))[1]
_call = _stages.Compiled.__call__
def _counted_call(self, *a, **k):
  step[0] += 1
  return _call(self, *a, **k)
_stages.Compiled.__call__ = _counted_call
atexit.register(lambda: open(os.environ["PROBE_OUT"], "w").write(json.dumps(reads)))
from xlingo import train
train.main(["xlingo.train", *sys.argv[1:]])
'''


@pytest.mark.slow
def test_two_hosts_stop_together_without_per_step_sync(tmp_path):
  import json
  import re
  import socket
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  steps, log_every = 60, 4
  cmd = [sys.executable, str(probe), "--config", "configs/tiny.py",
         "--workdir", str(tmp_path / "run"), f"--config.train.steps={steps}",
         f"--config.train.log_every={log_every}", "--config.train.eval_every=1000",
         "--config.checkpoint.every_steps=1000"]
  procs, logs = [], []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               XLINGO_COORDINATOR=f"127.0.0.1:{port}", XLINGO_NUM_PROCESSES="2",
               XLINGO_PROCESS_ID=str(i), PROBE_OUT=str(tmp_path / f"reads{i}.json"),
               PYTHONPATH=root)
    logs.append(tmp_path / f"out{i}.txt")
    procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=open(logs[i], "w"),
                                  stderr=subprocess.STDOUT))
  deadline = time.time() + 400
  while f"step {2 * log_every:>6}/" not in logs[0].read_text() and time.time() < deadline:
    assert procs[0].poll() is None and procs[1].poll() is None, logs[0].read_text()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
  for p in procs:
    p.wait(timeout=300)
  outs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  stop = re.search(r"preempted \(SIGTERM\) at step (\d+)", outs[0])
  assert stop, outs[0][-3000:]
  stopped = int(stop.group(1))
  assert 2 * log_every < stopped < steps
  assert os.listdir(tmp_path / "run" / "checkpoints") == [str(stopped)]
  for i in range(2):
    reads = {int(k): v for k, v in json.loads((tmp_path / f"reads{i}.json").read_text()).items()}
    quiet = [s for s in range(1, stopped) if s % log_every]
    assert [s for s in quiet if reads.get(s)] == [], (i, reads)
    assert all(reads.get(s) for s in range(log_every, stopped, log_every)), (i, reads)
