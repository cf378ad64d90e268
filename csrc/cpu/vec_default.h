// The vector type of microkernels.cpp: ATen's Vectorized<A> where ATen has a vector
// class for A (AVX2, AVX-512, NEON, VSX, ...), else PortableVec<A>, one 16-byte vector
// built on GCC/Clang vector extensions.
//
// Why: ATen's fallback Vectorized<float> (what the DEFAULT build gets on x86-64, where
// SSE2 is the baseline) is an array of eight floats worked on in loops, and GCC keeps
// the kernels' accumulator blocks of them in memory: every multiply-add loaded and
// stored its accumulator, and the DEFAULT build ran 4-20x its floors. PortableVec is one
// SSE2 register (one NEON register on aarch64, scalars where there is no SIMD), so the
// same blocked loops keep their accumulators in registers.
//
// Only what microkernels.cpp uses. Included there, inside each build's CPU_CAPABILITY
// namespace, so the builds' copies never meet at link time.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lora_ext::cpu::CPU_CAPABILITY {

// The raw vector types (GCC drops vector_size on a type that depends on a template
// parameter, so they are spelled out here).
namespace portable_vec {
typedef float F32x4 __attribute__((vector_size(16)));
typedef double F64x2 __attribute__((vector_size(16)));
typedef uint32_t U32x4 __attribute__((vector_size(16)));
typedef uint64_t U64x2 __attribute__((vector_size(16)));
typedef uint16_t U16x4 __attribute__((vector_size(8)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
}  // namespace portable_vec

template <typename A>
class PortableVec {
  static_assert(std::is_same_v<A, float> || std::is_same_v<A, double>);
  static constexpr bool kF32 = std::is_same_v<A, float>;
  using Raw = std::conditional_t<kF32, portable_vec::F32x4, portable_vec::F64x2>;
  using Bits = std::conditional_t<kF32, portable_vec::U32x4, portable_vec::U64x2>;
  Raw v_;

  C10_ALWAYS_INLINE static PortableVec of(Raw v) {
    PortableVec r;
    r.v_ = v;
    return r;
  }
  C10_ALWAYS_INLINE Bits bits() const { return reinterpret_cast<Bits>(v_); }
  C10_ALWAYS_INLINE static PortableVec of_bits(Bits b) { return of(reinterpret_cast<Raw>(b)); }

 public:
  using value_type = A;
  static constexpr int size() { return 16 / sizeof(A); }

  C10_ALWAYS_INLINE PortableVec() : v_{} {}
  C10_ALWAYS_INLINE PortableVec(A x) {
    if constexpr (size() == 4) {
      v_ = Raw{x, x, x, x};
    } else {
      v_ = Raw{x, x};
    }
  }

  C10_ALWAYS_INLINE static PortableVec loadu(const void* p) {
    PortableVec r;
    std::memcpy(&r.v_, p, sizeof(Raw));
    return r;
  }
  // The first `count` (<= size()) elements; the rest zero.
  C10_ALWAYS_INLINE static PortableVec loadu(const void* p, int64_t count) {
    PortableVec r;
    std::memcpy(&r.v_, p, count * sizeof(A));
    return r;
  }
  C10_ALWAYS_INLINE void store(void* p) const { std::memcpy(p, &v_, sizeof(Raw)); }
  C10_ALWAYS_INLINE void store(void* p, int64_t count) const { std::memcpy(p, &v_, count * sizeof(A)); }

  // size() elements of a 16-bit T converted to fp32 (the first `count`; the rest zero).
  template <typename T>
  C10_ALWAYS_INLINE static PortableVec load_from(const T* p, int64_t count = size()) {
    static_assert(std::is_same_v<A, float> && sizeof(T) == 2);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // bf16 is fp32's top half: interleave zeros below (one unpack instruction on SSE2;
      // __builtin_convertvector and a shift compile to seven).
      // (Through a 64-bit integer: a partial copy into the vector would go through memory.)
      uint64_t four = 0;
      std::memcpy(&four, p, count * sizeof(T));
      const auto h = reinterpret_cast<portable_vec::U16x8>(portable_vec::U64x2{four, 0});
      return of_bits(reinterpret_cast<Bits>(
          __builtin_shufflevector(portable_vec::U16x8{}, h, 0, 8, 1, 9, 2, 10, 3, 11)));
    } else {
      alignas(16) A buf[size()] = {};
      for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<A>(p[i]);
      return loadu(buf);
    }
  }
  // The first `count` elements rounded to a 16-bit T as c10's conversion rounds them.
  template <typename T>
  C10_ALWAYS_INLINE void store_to(T* p, int64_t count = size()) const {
    static_assert(std::is_same_v<A, float> && sizeof(T) == 2);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // c10::BFloat16(float): round to nearest even; any NaN becomes 0x7FC0.
      const Bits u = bits();
      // The result in each lane's top half, whose 16-bit pieces are then gathered.
      const Bits rounded = u + ((u >> 16) & 1) + 0x7FFF;
      const Bits nan = reinterpret_cast<Bits>(v_ != v_);
      const auto halves = reinterpret_cast<portable_vec::U16x8>((rounded & ~nan) | (nan & 0x7FC00000));
      const portable_vec::U16x4 h = __builtin_shufflevector(halves, halves, 1, 3, 5, 7);
      std::memcpy(p, &h, count * sizeof(T));
    } else {
      alignas(16) A buf[size()];
      store(buf);
      for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(buf[i]);
    }
  }

  C10_ALWAYS_INLINE friend PortableVec operator+(const PortableVec& a, const PortableVec& b) { return of(a.v_ + b.v_); }
  C10_ALWAYS_INLINE friend PortableVec operator-(const PortableVec& a, const PortableVec& b) { return of(a.v_ - b.v_); }
  C10_ALWAYS_INLINE friend PortableVec operator*(const PortableVec& a, const PortableVec& b) { return of(a.v_ * b.v_); }
  C10_ALWAYS_INLINE friend PortableVec operator&(const PortableVec& a, const PortableVec& b) {
    return of_bits(a.bits() & b.bits());
  }
  // All bits set in the lanes that compare equal (as ATen's operator==).
  C10_ALWAYS_INLINE friend PortableVec operator==(const PortableVec& a, const PortableVec& b) {
    return of_bits(reinterpret_cast<Bits>(a.v_ == b.v_));
  }
  // Lanes below `count` from b, the rest from a.
  C10_ALWAYS_INLINE static PortableVec set(const PortableVec& a, const PortableVec& b, int64_t count) {
    PortableVec r = a;
    std::memcpy(&r.v_, &b.v_, count * sizeof(A));
    return r;
  }
  // a * b + c, rounded twice like ATen's fallback (this build has no FMA instruction,
  // and contraction is off in microkernels.cpp).
  C10_ALWAYS_INLINE friend PortableVec fmadd(const PortableVec& a, const PortableVec& b, const PortableVec& c) {
    return a * b + c;
  }
  // The sum of the lanes, always in the same order: (v0 + v2) + (v1 + v3).
  C10_ALWAYS_INLINE friend A reduce_add(const PortableVec& v) {
    if constexpr (size() == 4) {
      const Raw h = v.v_ + __builtin_shufflevector(v.v_, v.v_, 2, 3, 0, 1);
      return h[0] + h[1];
    } else {
      return v.v_[0] + v.v_[1];
    }
  }
};

template <typename A>
using vec_t = std::conditional_t<at::vec::is_vec_specialized_for_v<A>, at::vec::Vectorized<A>,
                                 PortableVec<A>>;

template <typename A>
constexpr bool is_portable_vec_v = std::is_same_v<vec_t<A>, PortableVec<A>>;

}  // namespace lora_ext::cpu::CPU_CAPABILITY
