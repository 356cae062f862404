#!/usr/bin/env bash
# Cloud TPU VM launcher: a thin wrapper around launch/tpu.py (see docs/TPU.md).
#   ./launch/tpu.sh create --name N --zone Z --accelerator-type v5litepod-16 --spot
exec python3 "$(dirname "$0")/tpu.py" "$@"
