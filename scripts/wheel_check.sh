#!/usr/bin/env bash
# Installs the lora_ext wheel into fresh virtual environments and checks it there, with
# no build step and no source tree on the path:
#   1. the torch release it was built for + pytest: the op tests
#      (tests/test_ops.py, tests/test_errors.py) pass against the installed wheel;
#   2. the next torch release (LORA_EXT_TORCH_NEXT_VERSION, scripts/versions.sh):
#      `import lora_ext` refuses with an ImportError that names both releases and what
#      to rebuild.
#   scripts/wheel_check.sh [WHEEL]     (default: build one with scripts/build_wheel.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/env.sh
source scripts/versions.sh
wheel=${1:-}
if [ -z "$wheel" ]; then
  bash scripts/build_wheel.sh
  wheel=$(ls -t dist/lora_ext-*manylinux*.whl | head -1)
fi
wheel=$(realpath "$wheel")
built_torch=$(unzip -p "$wheel" lora_ext/_build_info.py | sed -n 's/^TORCH_VERSION = "\(.*\)"$/\1/p')
echo "[wheel-check] $wheel (built against torch $built_torch)"
# Package data: the shipped adapters of lora_ext.apps; and the console script's target.
for f in lora_ext/apps/adapters/{upper,reverse,arith}/adapter_{config.json,model.safetensors}; do
  unzip -l "$wheel" "$f" >/dev/null || { echo "[wheel-check] $f is missing from the wheel" >&2; exit 1; }
done
unzip -p "$wheel" '*.dist-info/entry_points.txt' | grep -x 'lora-ext = lora_ext.apps.cli:main' >/dev/null ||
  { echo "[wheel-check] the lora-ext console script does not point at lora_ext.apps.cli:main" >&2; exit 1; }

fresh_venv() {  # fresh_venv DIR PACKAGES...: a new venv holding only the given packages
  rm -rf "$1"
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --disable-pip-version-check "${@:2}"
}

# 1. The release it was built for: op tests against the installed wheel.
venv=$root/build/wheel-venv-same
fresh_venv "$venv" "torch==${built_torch%%+*}" pytest
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
tests=$(mktemp -d)
trap 'rm -rf "$tests"' EXIT
cp tests/conftest.py tests/test_ops.py tests/test_errors.py "$tests/"
(
  cd "$tests"  # outside the checkout: `import lora_ext` must find the installed wheel
  "$venv/bin/python" -c "
import lora_ext, sys
assert '/site-packages/lora_ext/' in lora_ext.__file__, lora_ext.__file__
print('[wheel-check] imports from', lora_ext.__file__)"
  "$venv/bin/lora-ext" --help >/dev/null  # the console script imports (lora_ext.apps.cli)
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -x test_ops.py test_errors.py
)

# 2. Another torch release: a clear refusal at import.
other_torch=$LORA_EXT_TORCH_NEXT_VERSION
venv=$root/build/wheel-venv-other
fresh_venv "$venv" "torch==$other_torch"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$wheel"
(
  cd "$tests"
  "$venv/bin/python" - "$built_torch" "$other_torch" <<'PY'
import sys

import torch

built, other = sys.argv[1:]
assert torch.__version__.startswith(other), torch.__version__
try:
    import lora_ext  # noqa: F401
except ImportError as e:
    message = str(e)
    for needed in (f"built against torch {built}", f"torch {torch.__version__} is installed", "Rebuild lora_ext"):
        assert needed in message, f"{needed!r} missing from: {message}"
    print(f"[wheel-check] torch {torch.__version__} refused as expected: {message}")
else:
    sys.exit(f"[wheel-check] FAILED: the wheel for torch {built} imported under torch {torch.__version__}")
PY
)
rm -rf "$root/build/wheel-venv-same" "$root/build/wheel-venv-other"
echo "[wheel-check] OK"
