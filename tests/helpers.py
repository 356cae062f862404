"""Helpers that several test files share: running an entry point in a subprocess the way the
tests run jax (8 fake CPU devices, a shared compilation cache), and reading what a run left.
The ``cache_dir`` fixture is conftest.py's."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from xlingo import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir, vm_dir=None, **extra) -> dict:
  """os.environ for a child run: 8 fake CPU devices, TensorFlow quiet, compiled programs shared
  through ``cache_dir`` between the runs of a test file, this checkout importable. With
  ``vm_dir``, everything a run could leave on its machine (TMPDIR) goes there."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  if vm_dir is not None:
    os.makedirs(os.path.join(vm_dir, "tmp"), exist_ok=True)
    env["TMPDIR"] = os.path.join(vm_dir, "tmp")
  return env


def run_module(module, args, cache_dir, vm_dir=None, *, cwd=ROOT, check=True, timeout=600):
  """``python -m module args`` under :func:`subprocess_env`; with ``check`` a non-zero exit is
  an AssertionError showing the end of its output."""
  p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=vm_dir or cwd,
                     env=subprocess_env(cache_dir, vm_dir), capture_output=True, text=True,
                     timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{module} exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def metrics_rows(workdir) -> list[dict]:
  """The rows of a workdir's metrics.jsonl (local or gs://)."""
  text = paths.read_text(paths.join(str(workdir), "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines()]


def checkpoint_params(workdir, step):
  """The parameter tree of checkpoint ``step``, read with Orbax itself (tensorstore for gs://),
  not through xlingo's restore."""
  import orbax.checkpoint as ocp

  workdir = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
  return ocp.StandardCheckpointer().restore(
      paths.join(workdir, "checkpoints", str(step), "state"))["params"]


def final_params(workdir, step) -> dict:
  """keystr(path) -> array of :func:`checkpoint_params`."""
  import jax

  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(checkpoint_params(workdir, step))}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
