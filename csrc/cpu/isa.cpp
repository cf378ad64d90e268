// Picks the micro-kernel build for the running CPU, once per process.
// LORA_EXT_CPU_ISA=default|avx2|avx512|avx512bf16 forces one (for tests and comparisons).
// Builds for other architectures have only `default`: ATen's vectors for the compiler's
// baseline there (NEON on aarch64).
#include "microkernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace lora_ext::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

Isa best_supported_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#if defined(LORA_EXT_HAS_ISA_AVX512BF16)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("avx512bf16"))
    return Isa::kAvx512Bf16;
#endif
#if defined(LORA_EXT_HAS_ISA_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
#endif
#if defined(LORA_EXT_HAS_ISA_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
#endif
  return Isa::kDefault;
}

// What LORA_EXT_CPU_ISA may name on this CPU with this build, for the error message.
std::string usable_isas(Isa best) {
  constexpr const char* kNames[] = {"default", "avx2", "avx512", "avx512bf16"};
  std::string names = kNames[0];
  for (int i = 1; i <= static_cast<int>(best); ++i) names += std::string(", ") + kNames[i];
  return names;
}

Isa selected_isa() {
  static const Isa isa = [] {
    const Isa best = best_supported_isa();
    const char* env = std::getenv("LORA_EXT_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    const std::string want(env);
    TORCH_CHECK(want == "default" || want == "avx2" || want == "avx512" || want == "avx512bf16",
                "LORA_EXT_CPU_ISA must be default, avx2, avx512 or avx512bf16, got '", want, "'");
    const Isa asked = want == "avx512bf16" ? Isa::kAvx512Bf16
                      : want == "avx512"   ? Isa::kAvx512
                      : want == "avx2"     ? Isa::kAvx2
                                           : Isa::kDefault;
    TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), "LORA_EXT_CPU_ISA=", want,
                " is not supported by this CPU or build (usable here: ", usable_isas(best), ")");
    return asked;
  }();
  return isa;
}

}  // namespace

template <typename T>
const MicroKernels<T>& micro_kernels() {
  switch (selected_isa()) {
#if defined(LORA_EXT_HAS_ISA_AVX512BF16)
    case Isa::kAvx512Bf16:
      return AVX512BF16::kernels<T>();
#endif
#if defined(LORA_EXT_HAS_ISA_AVX512)
    case Isa::kAvx512:
      return AVX512::kernels<T>();
#endif
#if defined(LORA_EXT_HAS_ISA_AVX2)
    case Isa::kAvx2:
      return AVX2::kernels<T>();
#endif
    default:
      return DEFAULT::kernels<T>();
  }
}

template const MicroKernels<double>& micro_kernels<double>();
template const MicroKernels<float>& micro_kernels<float>();
template const MicroKernels<c10::Half>& micro_kernels<c10::Half>();
template const MicroKernels<c10::BFloat16>& micro_kernels<c10::BFloat16>();

}  // namespace lora_ext::cpu
