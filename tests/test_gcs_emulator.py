"""gs:// workdirs end to end against a real GCS API (fake-gcs-server), through the command line.

One preempted-then-resumed gs:// training run (a "recreated VM" in between: a new working
directory and temporary directory, the old ones deleted) is compared with an uninterrupted local
run, and its bucket checkpoints then feed evaluate, generate, adapt (init_from=gs://) and distill
(teacher on gs://); the adapt run also reads its vocabulary from the bucket (data.vocab_path).
Compiled programs are shared through the persistent compilation cache.
"""

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, final_params, metrics_rows, run_module, subprocess_env

from xlingo import paths

STEPS = 8
TRAIN = ["--config", os.path.join(ROOT, "configs", "tiny.py"), f"--config.train.steps={STEPS}",
         "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
         "--config.train.log_every=2", f"--config.train.eval_every={STEPS}"]

pytestmark = pytest.mark.slow


def _event_steps(data: bytes, tag: str) -> list[int]:
  """Steps of the scalar ``tag`` in a TensorBoard event file (TFRecord framing, Event protos)."""
  from tensorboard.compat.proto import event_pb2

  steps, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    if any(v.tag == tag for v in event.summary.value):
      steps.append(event.step)
  return steps


@pytest.fixture(scope="module")
def gs_run(gcs_emulator, cache_dir, tmp_path_factory):
  """An uninterrupted local run, and the same run on gs:// stopped by SIGTERM after a
  checkpoint and resumed on a 'new VM'."""
  base = tmp_path_factory.mktemp("local")
  run_module("xlingo.train", [*TRAIN, f"--workdir={base / 'run'}"], cache_dir, base)

  workdir = f"gs://{gcs_emulator.bucket('run')}/run"
  vm1 = tmp_path_factory.mktemp("vm1")
  proc = subprocess.Popen([sys.executable, "-m", "xlingo.train", *TRAIN, f"--workdir={workdir}"],
                          cwd=vm1, env=subprocess_env(cache_dir, vm1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith("step      4/"):  # the step-4 checkpoint is being written
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  first = "".join(out) + rest
  assert proc.returncode == 0, first[-3000:]
  left_on_vm1 = [os.path.relpath(os.path.join(d, f), vm1)
                 for d, _, files in os.walk(vm1) for f in files]
  shutil.rmtree(vm1)  # the VM is gone, and everything it had with it
  vm2 = tmp_path_factory.mktemp("vm2")
  second = run_module("xlingo.train", [*TRAIN, f"--workdir={workdir}"], cache_dir, vm2)
  return {"local": str(base / "run"), "gs": workdir, "first": first, "second": second.stdout,
          "left_on_vm1": left_on_vm1, "vm2": vm2}


def test_preempted_gs_run_resumes_on_a_new_vm(gs_run):
  first, second, wd = gs_run["first"], gs_run["second"], gs_run["gs"]
  assert "preempted (SIGTERM)" in first and "training finished" not in first
  assert gs_run["left_on_vm1"] == [], gs_run["left_on_vm1"]
  assert not any(n.startswith("gs:") for n in os.listdir(gs_run["vm2"]))
  stopped = int(first.split("preempted (SIGTERM) at step ")[1].split(";")[0])
  assert 4 <= stopped < STEPS
  assert f"resumed from {wd}/checkpoints step {stopped}" in second
  assert "training finished" in second

  # The same result as the uninterrupted local run, one continuous history in the bucket.
  gs_rows = metrics_rows(wd)
  local_rows = metrics_rows(gs_run["local"])
  assert [r["step"] for r in gs_rows if "loss" in r] == list(range(2, STEPS + 1, 2))
  # (A logged loss is the mean over its log window, which a stop at an odd step splits; the
  # last window and the state are whole again.)
  last = [r for r in gs_rows if r["step"] == STEPS and "loss" in r][0]
  assert last["loss"] == [r for r in local_rows if r["step"] == STEPS and "loss" in r][0]["loss"]
  val = [r for r in gs_rows if "val/bpb" in r]
  assert [r["step"] for r in val] == [0, STEPS]
  assert val[-1]["val/bpb"] == [r for r in local_rows if "val/bpb" in r][-1]["val/bpb"]
  a, b = final_params(wd, STEPS), final_params(gs_run["local"], STEPS)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # Everything else a run writes is in the bucket too.
  names = paths.listdir(wd)
  assert {"checkpoints", "metrics.jsonl", "tensorboard", "languages.png", "lock"} <= set(names)
  assert paths.read_bytes(paths.join(wd, "languages.png"))[:4] == b"\x89PNG"
  events = [paths.join(wd, "tensorboard", n) for n in paths.listdir(paths.join(wd, "tensorboard"))]
  assert len(events) == 2  # one file per run
  steps = sorted(s for e in events for s in _event_steps(paths.read_bytes(e), "loss"))
  assert set(steps) == set(range(2, STEPS + 1, 2)) and steps[-1] == STEPS
  ckpts = paths.listdir(paths.join(wd, "checkpoints"))
  assert str(STEPS) in ckpts and len([c for c in ckpts if c.isdigit()]) <= 3
  data_state = paths.join(wd, "checkpoints", str(STEPS), "data", "process_0")
  assert {"layout.json", "state.json"} <= set(paths.listdir(data_state))
  locks = paths.listdir(paths.join(wd, "lock"))
  assert all(json.loads(paths.read_text(paths.join(wd, "lock", n)))["released"] for n in locks)


def test_second_trainer_on_a_busy_bucket_is_refused(gcs_emulator, capsys):
  """The lock on gs:// (create-if-absent through a GCS precondition) refuses a second trainer
  while a live one holds it; the refusal comes before anything is built (here in-process)."""
  import dataclasses

  from xlingo import train
  from xlingo.training import workdir as workdir_lib

  wd = f"gs://{gcs_emulator.bucket('busy')}/run"
  holder = workdir_lib.Holder.this_process()
  holder.host = "another-vm"  # alive, heartbeating, elsewhere
  paths.write_text(paths.join(wd, "lock", "00000001.json"),
                   json.dumps(dataclasses.asdict(holder)))
  with pytest.raises(SystemExit) as e:
    train.main(["xlingo.train", *TRAIN, f"--workdir={wd}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("xlingo: error:") and "in use by another trainer (host another-vm" in err
  assert paths.listdir(wd) == ["lock"]


def test_evaluate_from_bucket(gs_run, cache_dir, tmp_path):
  out = paths.join(gs_run["gs"], "eval.json")
  run_module("xlingo.evaluate", ["--config", os.path.join(ROOT, "configs", "tiny.py"),
                           f"--workdir={gs_run['gs']}", f"--output={out}"], cache_dir, tmp_path)
  logged = [r for r in metrics_rows(gs_run["gs"]) if "val/bpb" in r][-1]
  report = json.loads(paths.read_text(out))
  (result,) = report["results"].values()
  assert result["step"] == STEPS
  assert result["metrics"]["val/bpb/de"] == pytest.approx(logged["val/bpb/de"], rel=1e-5)


def test_generate_from_bucket(gs_run, cache_dir, tmp_path):
  p = run_module("xlingo.generate", ["--config", os.path.join(ROOT, "configs", "tiny.py"),
                               f"--workdir={gs_run['gs']}", "--lang=de", "--prompt=Das ist",
                               "--max_len=4"], cache_dir, tmp_path)
  assert p.stdout.strip().splitlines()[-1].startswith("[de] Das ist")


def test_adapt_init_from_bucket_with_vocab_in_bucket(gs_run, gcs_emulator, cache_dir, tmp_path):
  """adapt from a bucket checkpoint, its vocabulary read from the bucket too (data.vocab_path):
  the checkpoint's vocabulary fingerprint must match the one of the bucket's copy."""
  from xlingo.data import vocab as xvocab

  bucket = gcs_emulator.bucket("adapt")
  vocab = f"gs://{bucket}/vocab/xlingo_8k.model"
  paths.copy_file(xvocab.embedded_vocab_path(), vocab)
  wd = f"gs://{bucket}/adapt"
  p = run_module("xlingo.adapt", ["--config", os.path.join(ROOT, "configs", "adapt_tiny.py"),
                            f"--workdir={wd}", f"--config.checkpoint.init_from={gs_run['gs']}",
                            f"--config.data.vocab_path={vocab}",
                            "--config.train.steps=2", "--config.train.eval_every=2",
                            "--config.checkpoint.every_steps=2", "--config.adapt.bleu_examples=1"],
           cache_dir, tmp_path)
  assert f"initialised parameters from {gs_run['gs']}" in p.stdout
  names = paths.listdir(wd)
  assert {"checkpoints", "metrics.jsonl", "adapt_report.json", "best"} <= set(names), names
  # best/ records its step in its metadata, like every step directory
  best_meta = json.loads(paths.read_text(paths.join(wd, "best", "meta", "metadata")))
  assert best_meta["step"] == 2
  meta = json.loads(paths.read_text(paths.join(wd, "checkpoints", "2", "meta", "metadata")))
  assert meta["vocab_sha1"] == hashlib.sha1(paths.read_bytes(vocab)).hexdigest()
  assert not any(n.startswith("gs:") for n in os.listdir(tmp_path))


def test_distill_teacher_in_bucket(gs_run, gcs_emulator, cache_dir, tmp_path):
  wd = f"gs://{gcs_emulator.bucket('distill')}/student"
  p = run_module("xlingo.distill", ["--config", os.path.join(ROOT, "configs", "distill_tiny.py"),
                              f"--workdir={wd}", f"--config.distill.teacher_workdir={gs_run['gs']}",
                              "--config.train.steps=2", "--config.train.eval_every=2",
                              "--config.checkpoint.every_steps=2"], cache_dir, tmp_path)
  assert "training finished" in p.stdout
  assert "2" in paths.listdir(paths.join(wd, "checkpoints"))


def test_emulator_answers_quickly(gcs_emulator):
  """The fixture's environment avoids gcsfs's credential probing (~15 s per process)."""
  t = time.perf_counter()
  subprocess.run([sys.executable, "-c", "from xlingo import paths; "
                  f"assert not paths.exists('gs://{gcs_emulator.bucket('quick')}/x')"],
                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True, timeout=120)
  assert time.perf_counter() - t < 10
