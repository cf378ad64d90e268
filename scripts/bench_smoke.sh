#!/usr/bin/env bash
# CI smoke test of the benchmarks: builds the C++ harness, runs it once at tiny
# sizes (every workload, JSON written and parsed), then the Python runner at tiny
# sizes for W1-W6. Exits non-zero when a build fails, a run fails, or lora_ext
# disagrees with a baseline. No timing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/build_bench.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
build/bench/lora_ext_bench --tiny --device cpu --json "$tmp/bench.json"
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))['results']; assert len(r) >= 8, r; print('harness JSON ok:', len(r), 'results')" "$tmp/bench.json"
"$PY" benchmarks/run.py --tiny --device cpu --workloads W1,W2,W3,W4,W5,W6 --out "$tmp/py"
test -s "$tmp/py/latest.json" && test -s "$tmp/py/latest.md" && test -s "$tmp/py/latest.png"
echo "bench smoke ok"
