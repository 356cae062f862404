#!/usr/bin/env bash
# Local launcher. Creates (or reuses) a virtual environment in .venv, installs xlingo into it,
# then runs one of:
#   ./launch/local.sh demo        train configs/small.py on the embedded corpus (CPU, minutes)
#   ./launch/local.sh test        the test suite (8 fake CPU devices)
#   ./launch/local.sh test-fast   the fast subset (no end-to-end runs)
#   ./launch/local.sh gcs         a local GCS API to try gs:// workdirs (docs/TPU.md)
# Extra arguments go to the demo's trainer or to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${XLINGO_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

ensure_venv() {
  local stamp="$VENV/.xlingo-installed"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[local.sh] creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
  fi
  # Reinstall only when setup.py changed since the last install.
  if [[ ! -f "$stamp" ]] || [[ setup.py -nt "$stamp" ]]; then
    echo "[local.sh] installing xlingo and its pinned dependencies (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # pip's own progress, one line a package (the download bars and "already satisfied" lines
    # left out), so a first install of a few minutes is not minutes of silence.
    "$VENV/bin/python" -m pip install -e ".[test]" 2>&1 \
      | { grep --line-buffered -E "^(Collecting|Installing collected|Successfully installed|ERROR)" \
          || true; } | sed -u 's/^/[local.sh]   /'
    touch "$stamp"
  fi
}

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    ensure_venv
    exec "$VENV/bin/python" -m xlingo.demo "$@"
    ;;
  test)
    ensure_venv
    exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
    ;;
  test-fast)
    ensure_venv
    exec "$VENV/bin/python" -m pytest -q -m "not slow" "$@"
    ;;
  gcs)
    ensure_venv
    exec "$VENV/bin/python" launch/gcs_emulator.py "$@"
    ;;
  *)
    echo "usage: ./launch/local.sh demo|test|test-fast|gcs [args...]" >&2
    exit 2
    ;;
esac
