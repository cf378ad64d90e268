#!/usr/bin/env bash
# The README's test command: set up everything, build the C++ benchmark harness (so
# its smoke tests run too), then run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
bash scripts/build_bench.sh
"$PY" -m pytest -q -ra tests "$@"
