#!/usr/bin/env bash
# The aarch64 check, from nothing, on an x86-64 Debian/Ubuntu machine: cross-compiles
# lora_ext (the _C module and lora_ext_op_check) for 64-bit Arm with the distribution's
# g++-aarch64-linux-gnu against torch's aarch64 wheel (cmake/aarch64-linux-gnu.cmake),
# checks that the binaries are aarch64 and that the micro-kernels were vectorized for
# NEON, then runs lora_ext_op_check under qemu-aarch64: every op, in float32, bfloat16,
# float16 and float64, on small shapes, against float64 ATen references. Any failure
# fails the script.
# Installs what is missing with apt-get (as root); downloads are cached in build/aarch64.
#   scripts/aarch64_check.sh [--compile-only]     (env: JOBS, default 2; PYTHON, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/versions.sh
compile_only=0
[ "${1:-}" = --compile-only ] && compile_only=1
jobs=${JOBS:-2}
work=$root/build/aarch64
# Python of the aarch64 module: the wheel's tag and Debian's headers must agree.
pyver=3.11
start=$(date +%s)
step() { echo "[aarch64] $* ($(( $(date +%s) - start )) s)"; }

# --- tools: the cross compiler, user-mode emulation, and arm64 in apt (for the Python
# headers, downloaded and unpacked below, never installed into the host).
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || [ $compile_only = 1 ] || missing+=(qemu-user)
command -v file >/dev/null || missing+=(file)
command -v cmake >/dev/null || missing+=(cmake)
need_arm64=0
dpkg --print-foreign-architectures | grep -qx arm64 || need_arm64=1
if [ ${#missing[@]} -gt 0 ] || [ $need_arm64 = 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "[aarch64] error: needs ${missing[*]} and the arm64 apt architecture; run as root or install them" >&2; exit 1; }
  step "installing ${missing[*]:-nothing}, adding arm64 to apt"
  [ $need_arm64 = 1 ] && dpkg --add-architecture arm64
  apt-get update -qq
  [ ${#missing[@]} -gt 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- torch's aarch64 wheel, unpacked (the CMake config, headers and libraries).
mkdir -p "$work/wheels"
wheel_tag="cp${pyver/./}-cp${pyver/./}-manylinux_2_28_aarch64"
wheel="$work/wheels/torch-$LORA_EXT_TORCH_VERSION-$wheel_tag.whl"
if [ ! -f "$wheel" ]; then
  step "downloading torch $LORA_EXT_TORCH_VERSION for aarch64"
  "${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version "$pyver" -d "$work/wheels" "torch==$LORA_EXT_TORCH_VERSION"
fi
site=$work/site-$LORA_EXT_TORCH_VERSION
if [ ! -f "$site/.unpacked" ]; then
  step "unpacking $(basename "$wheel")"
  rm -rf "$site"
  "${PYTHON:-python3}" -m zipfile -e "$wheel" "$site"
  touch "$site/.unpacked"
fi
torch_dir=$site/torch

# --- Python's headers for aarch64: Debian's libpython3.X-dev:arm64, unpacked.
sysroot=$work/sysroot
if [ ! -f "$sysroot/usr/include/aarch64-linux-gnu/python$pyver/pyconfig.h" ]; then
  step "downloading libpython$pyver-dev:arm64"
  mkdir -p "$work/debs" && rm -rf "$sysroot"
  # As root into build/, which apt's sandbox user may not reach: download as root.
  (cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "libpython$pyver-dev:arm64")
  dpkg -x "$work"/debs/libpython"$pyver"-dev_*_arm64.deb "$sysroot"
fi

# --- build
build=$work/build
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
step "configuring"
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DLORA_EXT_TORCH_DIR="$torch_dir" -DLORA_EXT_AARCH64_SYSROOT="$sysroot" \
  -DPython_INCLUDE_DIR="$sysroot/usr/include/python$pyver" -DPython_SOABI="cpython-${pyver/./}-aarch64-linux-gnu" \
  -DLORA_EXT_OP_CHECK=ON >/dev/null
step "building _C and lora_ext_op_check with $jobs jobs"
cmake --build "$build" -j "$jobs" --target _C lora_ext_op_check

# --- what was built
module=$(ls "$build"/_C*.so)
for bin in "$module" "$build/lora_ext_op_check"; do
  file -b "$bin" | grep -q "ARM aarch64" || { echo "[aarch64] error: $bin is not aarch64: $(file -b "$bin")" >&2; exit 1; }
done
aarch64-linux-gnu-readelf --dyn-syms -W "$module" | grep -qw PyInit__C ||
  { echo "[aarch64] error: $module does not export PyInit__C" >&2; exit 1; }
# NEON: 4-lane fp32 fused multiply-adds in the micro-kernels (ATen's Vectorized<float>
# is a pair of float32x4_t there); zero would mean a scalar build.
micro=$(find "$build" -path "*lora_ext_micro_DEFAULT.dir*" -name "microkernels.cpp.o")
neon_fmla=$(aarch64-linux-gnu-objdump -d "$micro" | grep -cE $'\tfmla\tv[0-9]+\\.4s' || true)
[ "$neon_fmla" -gt 0 ] || { echo "[aarch64] error: no NEON fmla v.4s in $micro" >&2; exit 1; }
step "built: $(basename "$module") and lora_ext_op_check (aarch64), $neon_fmla NEON fmla .4s in the micro-kernels"
[ $compile_only = 1 ] && exit 0

# --- run under emulation. libtorch_cpu.so names the CUDA runtime and CUPTI (for the
# profiler), which the wheel gets from pip's nvidia packages; the CPU ops never call
# them, so stubs with the same names and symbol versions stand in (each symbol an
# error-returning function), instead of downloading the CUDA libraries.
stubs=$work/stubs
mkdir -p "$stubs"
for lib in $(aarch64-linux-gnu-readelf -d "$torch_dir/lib/libtorch_cpu.so" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
  [ -e "$torch_dir/lib/$lib" ] || [ -e "/usr/aarch64-linux-gnu/lib/$lib" ] || [ -e "$stubs/$lib" ] && continue
  aarch64-linux-gnu-readelf --dyn-syms -W "$torch_dir/lib/libtorch_cpu.so" |
    awk -v v="@$lib" '$7 == "UND" && index($8, v) { sub(/@.*/, "", $8); print "int " $8 "(void) { return 1; }" }' \
    > "$stubs/${lib%%.so*}.c"
  echo "$lib { global: *; };" > "$stubs/${lib%%.so*}.map"
  aarch64-linux-gnu-gcc -shared -fPIC -o "$stubs/$lib" -Wl,-soname,"$lib" \
    -Wl,--version-script="$stubs/${lib%%.so*}.map" "$stubs/${lib%%.so*}.c"
  echo "[aarch64] stub $lib: $(grep -c . "$stubs/${lib%%.so*}.c") functions"
done
# qemu-aarch64 7.x passes the host's /proc/cpuinfo through, and torch's CPU detection
# (cpuinfo) crashes on an x86 one (NULL dereference at the first ATen op). qemu looks up
# absolute paths under its -L prefix first: a prefix holding the cross libc and an Arm
# Neoverse-N1's /proc/cpuinfo (NEON, no SVE: the DEFAULT build's target) fixes that.
qroot=$work/qemu-root
mkdir -p "$qroot/proc"
ln -sfn /usr/aarch64-linux-gnu/lib "$qroot/lib"
for cpu in 0 1; do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' $cpu
done > "$qroot/proc/cpuinfo"
step "running lora_ext_op_check under qemu-aarch64"
OMP_NUM_THREADS=2 LD_LIBRARY_PATH="$torch_dir/lib:$stubs" \
  qemu-aarch64 -cpu neoverse-n1 -L "$qroot" "$build/lora_ext_op_check"
step "aarch64 check passed"
