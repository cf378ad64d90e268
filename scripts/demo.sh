#!/usr/bin/env bash
# The README's main-job command: set up everything, then run the multi-adapter demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# Same as `lora-ext demo`, without relying on pip's script folder being on PATH.
exec "$PY" -m lora_ext.cli demo "$@"
