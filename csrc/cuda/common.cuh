// Shared pieces of the CUDA kernels: element conversions, float bit views, and
// one tiled fp32-accumulating GEMM kernel whose operands and epilogue are supplied
// by a small "problem" struct (shrink, expand, weight gradients and merge all use it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace lora_ext::cuda {

// ---------------------------------------------------------------------------
// Elements: c10::Half / c10::BFloat16 convert on the device with round-to-nearest-even.

// Accumulation type: fp32 for float/half/bfloat16, fp64 for double (gradcheck).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
// Explicitly rounded operations: never contracted into an fma.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// Deterministic mode (torch.use_deterministic_algorithms(True)): every row's result must
// not depend on the rest of the batch, so the ops take the tiled kernels for every batch
// size (each output sums k in ascending order, one block per output, no split over rows).
inline bool rows_invariant() { return at::globalContext().deterministicAlgorithms(); }

// The scalar type of acc_t<T> for allocating intermediates and scales.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Loads 16 bytes (kVec<T> elements) through the read-only path and widens them.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&out)[kVec<T>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_acc(e[i]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Order-preserving integer view of a float's bits (as on the CPU): neighbouring
// representable values differ by one; +0 and -0 stay distinct.
template <typename T>
struct Bits {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static constexpr U kSign = U(1) << (8 * sizeof(T) - 1);
  static __device__ __forceinline__ U raw(T v) {
    if constexpr (sizeof(T) == 8) {
      return static_cast<U>(__double_as_longlong(v));
    } else if constexpr (sizeof(T) == 4) {
      return __float_as_uint(v);
    } else {
      return v.x;
    }
  }
  static __device__ __forceinline__ T from_raw(U u) {
    if constexpr (sizeof(T) == 8) {
      return __longlong_as_double(static_cast<long long>(u));
    } else if constexpr (sizeof(T) == 4) {
      return __uint_as_float(u);
    } else {
      return T(static_cast<uint16_t>(u), T::from_bits());
    }
  }
  static __device__ __forceinline__ int64_t ord(T v) {
    const U u = raw(v);
    return (u & kSign) ? -static_cast<int64_t>(u & ~kSign) - 1 : static_cast<int64_t>(u);
  }
  static __device__ __forceinline__ T from_ord(int64_t o) {
    const U u = o >= 0 ? static_cast<U>(o) : (static_cast<U>(-(o + 1)) | kSign);
    return from_raw(u);
  }
};

// An index read from user data: anything outside [0, n) counts as "none" (-1), so a
// bad value that slipped past the host check (CUDA-graph capture) reads nothing.
template <typename I>
__device__ __forceinline__ int sanitize_index(I v, int64_t n) {
  return (v >= 0 && static_cast<int64_t>(v) < n) ? static_cast<int>(v) : -1;
}

// Rank of adapter i, clamped into [0, max_rank]; all of max_rank when ranks is null.
__device__ __forceinline__ int adapter_rank(const int* ranks, int i, int max_rank) {
  if (ranks == nullptr) return max_rank;
  return min(max(ranks[i], 0), max_rank);
}

// ---------------------------------------------------------------------------
// The tiled GEMM. A block computes a BM x BN tile of C[m, n] = sum_k P(m, k) Q(k, n)
// in Prob::Acc (fp32, or fp64 for double; operands staged through shared memory as Acc, k in ascending order, so
// every output's sum is the same sequence of fmaf whatever the tile shapes), then
// hands each in-range element to the problem's epilogue.
//
// A Problem provides:
//   struct Tile { int64_t K; int M, N; ... };   M, N: valid extent of this tile (<= BM, BN)
//   static constexpr bool kPKContig, kQKContig;  which index is contiguous in memory
//                                                (decides the coalesced load order)
//   static constexpr bool kReadsOut; using Old;  epilogue needs the old output value
//   using Acc;                                   accumulation type
//   bool setup(int64_t block, int BM, int BN, Tile&) const;   false: nothing to do
//   Acc p(const Tile&, int m, int64_t k) const;               m < M, k < K
//   Acc q(const Tile&, int64_t k, int n) const;               k < K, n < N
//   Old load_out(const Tile&, int m, int n) const;            (if kReadsOut)
//   void store(const Tile&, int m, int n, Acc acc, Old old) const;

template <int BM, int BN, int BK, int TM, int TN>
struct TileShape {
  static constexpr int kBM = BM, kBN = BN, kBK = BK, kTM = TM, kTN = TN;
  static constexpr int kTX = BN / TN, kTY = BM / TM, kThreads = kTX * kTY;
  static_assert(BM % TM == 0 && BN % TN == 0, "tile must split evenly into thread tiles");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
};

template <class S, class Prob>
__global__ void __launch_bounds__(S::kThreads) tiled_gemm_kernel(const Prob prob) {
  constexpr int BM = S::kBM, BN = S::kBN, BK = S::kBK, TM = S::kTM, TN = S::kTN;
  constexpr int kTX = S::kTX, kTY = S::kTY, kThreads = S::kThreads;
  typename Prob::Tile tile;
  // Uniform per block, so returning before the barriers below is safe.
  if (!prob.setup(static_cast<int64_t>(blockIdx.x), BM, BN, tile)) return;

  using Acc = typename Prob::Acc;
  __shared__ Acc ps[BK][BM + 1];
  __shared__ Acc qs[BK][BN + 1];
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kTX, ty = tid / kTX;

  // Thread (tx, ty) owns rows ty + i * kTY and columns tx + j * kTX: a warp's
  // epilogue then touches consecutive columns (coalesced).
  using Old = typename Prob::Old;
  Old old[TM][TN];
  if constexpr (Prob::kReadsOut) {
    // Issued before the main loop so this memory traffic overlaps the arithmetic.
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int m = ty + i * kTY, n = tx + j * kTX;
        if (m < tile.M && n < tile.N) old[i][j] = prob.load_out(tile, m, n);
      }
  } else {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) old[i][j] = Old();
  }

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  for (int64_t k0 = 0; k0 < tile.K; k0 += BK) {
    const int kc = static_cast<int>(min(static_cast<int64_t>(BK), tile.K - k0));
    for (int e = tid; e < BM * BK; e += kThreads) {
      int m, k;
      if constexpr (Prob::kPKContig) {
        k = e % BK, m = e / BK;
      } else {
        m = e % BM, k = e / BM;
      }
      ps[k][m] = (m < tile.M && k < kc) ? prob.p(tile, m, k0 + k) : Acc(0);
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      int n, k;
      if constexpr (Prob::kQKContig) {
        k = e % BK, n = e / BK;
      } else {
        n = e % BN, k = e / BN;
      }
      qs[k][n] = (n < tile.N && k < kc) ? prob.q(tile, k0 + k, n) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      Acc a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = ps[k][ty + i * kTY];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = qs[k][tx + j * kTX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma_acc(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int m = ty + i * kTY, n = tx + j * kTX;
      if (m < tile.M && n < tile.N) prob.store(tile, m, n, acc[i][j], old[i][j]);
    }
}

// Launches one block per tile on the current stream; a no-op for an empty grid.
template <class S, class Prob>
void launch_tiled(const Prob& prob, int64_t num_blocks) {
  if (num_blocks <= 0) return;
  TORCH_CHECK(num_blocks <= std::numeric_limits<int32_t>::max(),
              "lora_ext: problem too large for one launch (", num_blocks, " tiles)");
  tiled_gemm_kernel<S, Prob><<<static_cast<unsigned>(num_blocks), S::kThreads, 0,
                               at::cuda::getCurrentCUDAStream()>>>(prob);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lora_ext::cuda
