#!/usr/bin/env bash
# Builds the C++ benchmark harness into build/bench/lora_ext_bench against the
# installed torch (the one `python` imports). Usage: scripts/build_bench.sh [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
TORCH_PREFIX=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S . -B build/bench "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DLORA_EXT_BENCHMARKS=ON \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython_EXECUTABLE="$(command -v "$PY")" "$@" >/dev/null
cmake --build build/bench --target lora_ext_bench -j "$(nproc)"
echo "built build/bench/lora_ext_bench"
