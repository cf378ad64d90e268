#!/usr/bin/env bash
# Builds the C++ benchmark harness against the installed torch (the one `python`
# imports) and links it as build/bench/lora_ext_bench. Where setup.sh's build folder
# exists, the harness is a target of it and reuses its compiled kernels; otherwise it
# gets a build folder of its own.   Usage: scripts/build_bench.sh [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
dir=$LORA_EXT_BUILD_DIR
cmake_args=(-DLORA_EXT_BENCHMARKS=ON "$@")
if [ ! -f "$dir/CMakeCache.txt" ]; then
  dir=build/bench-tree
  TORCH_PREFIX=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
  command -v ninja >/dev/null 2>&1 && cmake_args+=(-G Ninja)
  cmake_args+=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
               -DPython_EXECUTABLE="$(command -v "$PY")")
fi
cmake -S . -B "$dir" "${cmake_args[@]}" >/dev/null
cmake --build "$dir" --target lora_ext_bench -j "$(nproc)"
mkdir -p build/bench
ln -sf "$PWD/$dir/lora_ext_bench" build/bench/lora_ext_bench
echo "built build/bench/lora_ext_bench (in $dir)"
