#!/usr/bin/env bash
# The GPU MFU runs of docs/PERFORMANCE.md ("GPU"): bench/bench_train.py --synthetic on the ~1B
# model of configs/tpu_1b.py at sequence 2048 in bf16, on one GPU, with cuDNN attention (what
# 'auto' picks on a GPU) and the chunked loss. Needs jax with CUDA, flax, optax, etils and
# ml_collections (wheels in .whl/ are installed first when present); writes one log per run to
# $OUT (or ./gpu_mfu_out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_mfu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run() {
  local name=$1; shift
  echo "== $name: $*"
  timeout "${RUN_TIMEOUT:-170}" python3 bench/bench_train.py --config configs/tpu_1b.py --synthetic \
    --config.mesh.fsdp=1 --config.mesh.data=-1 --steps 10 --warmup 3 --matmul_repeats 5 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "rc=$?"; tail -n 2 "$OUT/$name.log" | cut -c1-1500
}
for spec in "${@:-b16_none:16:none:512}"; do
  IFS=: read -r name batch remat chunk <<<"$spec"
  run "$name" --config.train.batch_size="$batch" --config.model.remat_policy="$remat" \
    --config.train.loss_chunk_size="$chunk"
done
