#!/usr/bin/env bash
# The README's main-job command: set up everything, then run the multi-adapter demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# Same as `lora-ext demo`, without relying on the environment's bin being on PATH.
exec "$PY" -m lora_ext.apps.cli demo "$@"
