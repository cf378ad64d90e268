# Sourced by the other scripts: picks the Python environment lora_ext is installed in and
# exports PY (its python) and VENV_BIN (its bin folder).
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment is used as it is;
#   - otherwise `.venv` in the checkout, created on first use with $PYTHON (default
#     python3) and reused later. This keeps pip away from a distribution's Python, which
#     Debian and Ubuntu mark "externally managed" (PEP 668).
# Needs Python 3.10 or newer.

_lora_ext_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_lora_ext_die() { echo "[setup] error: $*" >&2; exit 1; }

_lora_ext_check_version() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null ||
    _lora_ext_die "lora_ext needs Python 3.10 or newer; $1 is $("$1" --version 2>&1)"
}

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  VENV_BIN="$VIRTUAL_ENV/bin"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  VENV_BIN="$CONDA_PREFIX/bin"
else
  VENV_BIN="$_lora_ext_root/.venv/bin"
  if [ ! -x "$VENV_BIN/python" ]; then
    base_python="${PYTHON:-python3}"
    command -v "$base_python" >/dev/null 2>&1 || _lora_ext_die "no '$base_python' found; install Python 3.10+ or set PYTHON"
    _lora_ext_check_version "$base_python"
    # Debian/Ubuntu ship venv (with ensurepip) as a separate package.
    if ! "$base_python" -c "import venv, ensurepip" 2>/dev/null; then
      pkg="python3-venv"
      ver=$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing $pkg and python$ver-venv (venv is a separate Debian package)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" "python$ver-venv" >/dev/null ||
          _lora_ext_die "apt-get could not install $pkg"
      else
        _lora_ext_die "$base_python cannot create virtual environments; install the venv module (Debian/Ubuntu: sudo apt-get install python$ver-venv) or activate an environment first"
      fi
    fi
    echo "[setup] creating the virtual environment $_lora_ext_root/.venv with $base_python"
    rm -rf "$_lora_ext_root/.venv"
    "$base_python" -m venv "$_lora_ext_root/.venv" || _lora_ext_die "could not create $_lora_ext_root/.venv"
  fi
fi
PY="$VENV_BIN/python"
_lora_ext_check_version "$PY"
# Tools pip installs there (ninja, cmake) come first.
export PATH="$VENV_BIN:$PATH"
# The environment's CMake build folder: setup.sh's install, build_wheel.sh and
# build_bench.sh share it, so the kernels compile once per environment. Two
# environments must not share one (ABI, torch).
LORA_EXT_BUILD_DIR=build/cpu
[ "$VENV_BIN" = "$_lora_ext_root/.venv/bin" ] || LORA_EXT_BUILD_DIR="build/cpu-$(basename "$(dirname "$VENV_BIN")")"
export PY VENV_BIN LORA_EXT_BUILD_DIR
