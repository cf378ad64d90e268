#!/usr/bin/env bash
# Builds lora_ext with AddressSanitizer + UndefinedBehaviorSanitizer (host C++ code) and
# runs the op, error and property tests under it, the sanitizer runtimes preloaded into
# Python (which is not itself instrumented). Any report fails the run.
#   scripts/sanitize.sh [pytest args]        (env: LORA_EXT_SANITIZE, default address,undefined)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/env.sh
sanitize=${LORA_EXT_SANITIZE:-address,undefined}

# A scratch venv that sees the main environment's packages (torch, pytest, the build
# tools) through a .pth line, and holds its own, sanitized lora_ext.
venv=$root/build/sanitize-venv
rm -rf "$venv"
"$PY" -m venv --without-pip "$venv"
main_site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$main_site" > "$venv_site/_lora_ext_main_env.pth"
echo "[sanitize] building with -fsanitize=$sanitize"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  --target "$venv_site" -Cbuild-dir=build/sanitize -Ccmake.define.LORA_EXT_SANITIZE="$sanitize" \
  -Ccmake.build-type=RelWithDebInfo .

preload=()
[[ $sanitize == *address* ]] && preload+=("$(gcc -print-file-name=libasan.so)")
[[ $sanitize == *undefined* ]] && preload+=("$(gcc -print-file-name=libubsan.so)")
tests=$(mktemp -d)
trap 'rm -rf "$tests"' EXIT
cp tests/conftest.py tests/test_ops.py tests/test_errors.py tests/test_properties.py tests/test_merge_guards.py "$tests/"
cd "$tests"  # outside the checkout: import the sanitized build, not the source tree
# Leak checking is off: CPython and torch keep allocations alive until exit by design.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
LD_PRELOAD="${preload[*]}" "$venv/bin/python" -c "
import lora_ext, sys
assert lora_ext.__file__.startswith('$venv_site'), lora_ext.__file__
print('[sanitize] testing', lora_ext.__file__)"
LD_PRELOAD="${preload[*]}" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-.}"
echo "[sanitize] clean: no sanitizer reports"
