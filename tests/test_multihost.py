"""Two processes x 4 CPU devices train like one process x 8, and resume each other's checkpoints.

The embedded corpus has one file per language, so with two processes every process packs the
global batch from the full stream and keeps its rows (``inputs.RowSlice``): the global batch,
hence the losses, and the data state are those of one process.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/tiny.py", "--config.train.log_every=1",
        "--config.train.eval_every=100", "--config.checkpoint.every_steps=2"]


def _start(workdir, steps, processes, cache_dir):
  # The continuation runs reuse the first runs' compiled programs from the persistent cache.
  base = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for k in ("XLINGO_COORDINATOR", "XLINGO_NUM_PROCESSES", "XLINGO_PROCESS_ID"):
    base.pop(k, None)
  cmd = [sys.executable, "-m", "xlingo.train", *ARGS, "--workdir", workdir,
         f"--config.train.steps={steps}"]
  if processes == 1:
    env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)]
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
               XLINGO_COORDINATOR=f"127.0.0.1:{port}", XLINGO_NUM_PROCESSES=str(processes),
               XLINGO_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=900) -> str:
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    outs.append(out)
    assert p.returncode == 0, out[-3000:]
  return outs[0]


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_each_other(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cache = tmp_path / "jax_cache"
  runs = [_start(one, 2, 1, cache), _start(two, 2, 2, cache)]
  out_one, out_two = _wait(runs[0]), _wait(runs[1])
  assert "2 process(es)" in out_two and "xlingo: training finished" in out_two
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == [1, 2]
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5)

  # 1 -> 2 processes: continue the single-process run with two; 2 -> 2: continue the other.
  cont = str(tmp_path / "one_then_two")
  shutil.copytree(one, cont)
  runs = [_start(cont, 4, 2, cache), _start(two, 4, 2, cache)]
  out_cont, out_two = _wait(runs[0]), _wait(runs[1])
  assert "resumed from" in out_cont and "resumed from" in out_two
  c, d = _losses(cont), _losses(two)
  assert sorted(c) == sorted(d) == [1, 2, 3, 4]
  for step in (3, 4):
    assert c[step] == pytest.approx(d[step], rel=1e-5)
  del out_one
