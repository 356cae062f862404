#!/usr/bin/env bash
# Cloud TPU VM launcher: a thin wrapper around launch/tpu.py (see docs/TPU.md).
#   ./launch/tpu.sh create --name N --zone Z --accelerator-type v5litepod-16 --spot
# The project's environment ($XLINGO_VENV, else .venv, as launch/local.sh makes it) when there
# is one, so that the preflight can load --config; else the system python3.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${XLINGO_VENV:-$ROOT/.venv}
if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; else PY=python3; fi
exec "$PY" "$ROOT/launch/tpu.py" "$@"
