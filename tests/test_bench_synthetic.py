"""bench/bench_train.py --synthetic builds, compiles and runs the loop's train step with
TensorFlow and seqio unimportable: what a machine with only jax/flax/optax (a GPU box) has."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
for name in ("tensorflow", "seqio", "tensorflow_datasets", "tensorflow_text"):
  sys.modules[name] = None  # any import of them raises ImportError
sys.path.insert(0, "bench")
import bench_train
from xlingo.training import metrics, step  # what bench/tpu_aot.py needs besides
bench_train.main(sys.argv[1:])
"""


def test_synthetic_train_step_runs_without_tensorflow_or_seqio(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  args = ["--config", "configs/tiny.py", "--synthetic", "--steps", "2", "--warmup", "1",
          "--matmul_n", "128", "--matmul_repeats", "1", "--config.train.loss_chunk_size=16",
          "--config.train.batch_size=4"]
  r = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["synthetic"] and out["batch"] == 4 and out["seq_len"] == 64
  assert out["loss_chunk_size"] == 16 and out["tokens_per_s"] > 0
  assert 0 < out["loss"] < 20
