#!/usr/bin/env bash
# The README's test command: set up everything, then run the whole test suite
# (slow tests included) and the C++ benchmark harness smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m pytest -q -ra tests "$@"
if [ -f scripts/bench_smoke.sh ]; then
  bash scripts/bench_smoke.sh
fi
