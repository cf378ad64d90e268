#!/usr/bin/env bash
# The README's test command: set up everything (vLLM's CPU build included, for the
# plugin's tests), build the C++ benchmark harness (so its smoke tests run too), then
# run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh  # runs scripts/setup.sh, then adds vLLM to the same environment
source scripts/env.sh
bash scripts/build_bench.sh
"$PY" -m pytest -q -ra tests "$@"
