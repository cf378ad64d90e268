#!/usr/bin/env bash
# The README's main-job command: set up everything, then run the multi-adapter demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec lora-ext demo "$@"
