#!/usr/bin/env bash
# CUDA compile check for machines without a GPU: builds the CUDA extension for sm_90
# against torch $LORA_EXT_TORCH_NEXT_VERSION (its CUDA build; scripts/versions.sh) with the
# CUDA $LORA_EXT_CUDA_TOOLKIT_VERSION toolkit, in its own venv and build directory,
# imports it, and asserts that every lora_ext op has a CUDA kernel registered.
# Skips (exit 0, with a notice) where nvcc is absent. Nothing CUDA runs here.
#
#   scripts/cuda_compile_check.sh            (env: CUDA_ROOT, TORCH_CUDA_ARCH_LIST)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/versions.sh"
CUDA_ROOT="${CUDA_ROOT:-/usr/local/cuda-$LORA_EXT_CUDA_TOOLKIT_VERSION}"
VENV="$ROOT/.venv-cu130"
BUILD_DIR="build/cu130"
TORCH_PIN="torch==$LORA_EXT_TORCH_NEXT_VERSION"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

if [[ ! -x "$CUDA_ROOT/bin/nvcc" ]]; then
  echo "cuda_compile_check: SKIPPED - no nvcc at $CUDA_ROOT/bin/nvcc (set CUDA_ROOT to a CUDA toolkit to run it)"
  exit 0
fi

cd "$ROOT"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "cuda_compile_check: creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "
import sys, torch, ninja, scikit_build_core
sys.exit(0 if torch.__version__.split('+')[0] == sys.argv[1] and torch.version.cuda else 1)" "$LORA_EXT_TORCH_NEXT_VERSION" 2>/dev/null; then
  echo "cuda_compile_check: installing $TORCH_PIN and the build tools into $VENV"
  "$VENV/bin/pip" install -q "$TORCH_PIN" ninja "scikit-build-core>=$LORA_EXT_SCIKIT_BUILD_CORE_MIN" pybind11 numpy
fi

echo "cuda_compile_check: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with $("$CUDA_ROOT/bin/nvcc" --version | tail -2 | head -1)"
start=$(date +%s)
# CUDA_PATH (not CUDA_HOME) steers torch's toolkit detection past the /usr/local/bin/nvcc wrapper.
PATH="$VENV/bin:$CUDA_ROOT/bin:$PATH" \
CUDA_PATH="$CUDA_ROOT" CUDACXX="$CUDA_ROOT/bin/nvcc" \
MAX_JOBS="${MAX_JOBS:-2}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -Cbuild-dir="$BUILD_DIR" \
  -Ccmake.define.LORA_EXT_CUDA=ON "$ROOT"
echo "cuda_compile_check: built in $(( $(date +%s) - start )) s"

# Import from outside the source tree so the installed package (with _C) is used.
cd /tmp
"$VENV/bin/python" - <<'EOF'
import torch
import lora_ext  # noqa: F401

ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_ext::"))
assert ops, "no lora_ext ops registered"
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
for n in ops:
    print(f"  {n:32s} CUDA kernel: {'yes' if n not in missing else 'MISSING'}")
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"cuda_compile_check: OK - torch {torch.__version__}, {len(ops)} ops, all with CUDA kernels")
EOF
