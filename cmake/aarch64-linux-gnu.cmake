# Cross-compiles lora_ext for 64-bit Arm Linux on an x86-64 Debian/Ubuntu host with the
# distribution's cross compiler (apt-get install g++-aarch64-linux-gnu), against an
# unpacked aarch64 torch wheel. scripts/aarch64_check.sh drives it:
#   cmake -S . -B build/aarch64/build -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DLORA_EXT_TORCH_DIR=<wheel>/torch -DLORA_EXT_AARCH64_SYSROOT=<unpacked arm64 .debs>
# LORA_EXT_TORCH_DIR is read by CMakeLists.txt (the host's Python cannot import an aarch64
# torch). LORA_EXT_AARCH64_SYSROOT holds Debian's libpython3.11-dev:arm64 unpacked with
# dpkg -x: its Python.h and pyconfig.h for the module's init function (pass also
# -DPython_INCLUDE_DIR=<it>/usr/include/python3.11 and, for the module's file name,
# -DPython_SOABI=cpython-311-aarch64-linux-gnu: FindPython cannot ask the interpreter).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# try_compile projects get a fresh cache: hand them the variables this file reads.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES LORA_EXT_AARCH64_SYSROOT LORA_EXT_TORCH_DIR)

# Libraries and headers come from the cross toolchain's tree, the unpacked .debs and the
# unpacked wheel (torch's config looks up its libraries there), never from the x86-64
# host; programs (cmake's helpers) from the host. Packages: torch's config is found by
# its absolute path in the wheel.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu ${LORA_EXT_AARCH64_SYSROOT} ${LORA_EXT_TORCH_DIR})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# -Wno-psabi: GCC notes on every ATen vector pair that GCC 10.1 changed how aarch64
# passes them; everything here is built by one compiler, so it does not apply.
set(CMAKE_CXX_FLAGS_INIT "-Wno-psabi")
if(LORA_EXT_AARCH64_SYSROOT)
  # Debian's pyconfig.h is a switch over architectures that includes
  # <aarch64-linux-gnu/python3.11/pyconfig.h>: that path is relative to usr/include.
  string(APPEND CMAKE_CXX_FLAGS_INIT " -isystem ${LORA_EXT_AARCH64_SYSROOT}/usr/include")
endif()
