// Row-grouped LoRA GEMMs on top of tiled_gemm_kernel: shrink (rows x A_i^T into an
// fp32 [T, R] intermediate), expand (that intermediate x B_i^T into the output) and
// the per-adapter weight gradients. lora_linear uses them with one adapter and rows
// in order; multi_lora with rows grouped by adapter on the device.
#pragma once

#include "cuda/common.cuh"

namespace lora_ext::cuda {

// Rows per group: a tile of the grouped kernels never spans two adapters.
constexpr int kGroupRows = 64;

// The groups of a call. With perm == nullptr there is one adapter (0) and the rows
// 0..rows-1 in order, cut into groups of kGroupRows.
struct RowGroups {
  const int* perm = nullptr;        // row ids sorted by adapter
  const int* groups = nullptr;      // per group: first position in perm, row count, adapter
  const int* num_groups = nullptr;  // device scalar
  int64_t rows = 0;                 // T (identity case only)

  __device__ __forceinline__ bool get(int64_t g, int64_t& start, int& count, int& adapter) const {
    if (perm == nullptr) {
      start = g * kGroupRows;
      if (start >= rows) return false;
      count = static_cast<int>(min(static_cast<int64_t>(kGroupRows), rows - start));
      adapter = 0;
      return true;
    }
    if (g >= *num_groups) return false;
    start = groups[3 * g];
    count = groups[3 * g + 1];
    adapter = groups[3 * g + 2];
    return true;
  }
  __device__ __forceinline__ int64_t row(int64_t start, int m) const {
    return perm != nullptr ? static_cast<int64_t>(perm[start + m]) : start + m;
  }
};

// Q_i(k, n) = q[i * adapter_stride + n * sn + k * sk]: A_i, B_i or their transposes.
template <typename T>
struct AdapterOperand {
  const T* ptr;
  int64_t adapter_stride, sn, sk;
};

// H[row, n] = scale_i * sum_k P[row, k] Q_i(k, n) for n < rank_i, in acc_t<T>.
// P is [T, K] (row stride ldp); columns n >= rank_i of H are not written.
template <typename T, bool QKContig>
struct ShrinkProblem {
  RowGroups rows;
  const T* pp;
  int64_t ldp, K;
  AdapterOperand<T> qop;
  const int* ranks;  // null: all max_rank
  int max_rank;
  const acc_t<T>* scales;  // null: 1
  acc_t<T>* h;
  int64_t ldh, n_tiles;

  static constexpr bool kPKContig = true, kQKContig = QKContig, kReadsOut = false;
  using Acc = acc_t<T>;
  using Old = Acc;
  struct Tile {
    int64_t K, start;
    int M, N, n0;
    const T* q;
    Acc scale;
  };

  __device__ bool setup(int64_t b, int BM, int BN, Tile& t) const {
    int count, adapter;
    if (!rows.get(b / n_tiles, t.start, count, adapter)) return false;
    const int rank = adapter_rank(ranks, adapter, max_rank);
    t.n0 = static_cast<int>(b % n_tiles) * BN;
    if (t.n0 >= rank || count <= 0) return false;
    t.M = count;
    t.N = min(BN, rank - t.n0);
    t.K = K;
    t.q = qop.ptr + adapter * qop.adapter_stride + t.n0 * qop.sn;
    t.scale = scales != nullptr ? scales[adapter] : Acc(1);
    return true;
  }
  __device__ Acc p(const Tile& t, int m, int64_t k) const {
    return to_acc(pp[rows.row(t.start, m) * ldp + k]);
  }
  __device__ Acc q(const Tile& t, int64_t k, int n) const {
    return to_acc(t.q[n * qop.sn + k * qop.sk]);
  }
  __device__ void store(const Tile& t, int m, int n, Acc acc, Old) const {
    h[rows.row(t.start, m) * ldh + t.n0 + n] = acc * t.scale;
  }
};

// Y[row, n] = (Accumulate ? Y[row, n] : bias[n] or 0) + out_scale * sum_{k < rank_i} H[row, k] Q_i(k, n),
// rounded once into T.
template <typename T, bool QKContig, bool Accumulate>
struct ExpandProblem {
  RowGroups rows;
  const acc_t<T>* h;
  int64_t ldh;
  AdapterOperand<T> qop;
  const int* ranks;
  int max_rank;
  int64_t N;
  T* y;
  int64_t ldy;
  const T* bias;  // only without Accumulate; may be null
  acc_t<T> out_scale;
  int64_t n_tiles;

  static constexpr bool kPKContig = true, kQKContig = QKContig, kReadsOut = Accumulate;
  using Acc = acc_t<T>;
  using Old = T;
  struct Tile {
    int64_t K, start, n0;
    int M, N;
    const T* q;
  };

  __device__ bool setup(int64_t b, int BM, int BN, Tile& t) const {
    int count, adapter;
    if (!rows.get(b / n_tiles, t.start, count, adapter)) return false;
    t.n0 = (b % n_tiles) * BN;
    if (t.n0 >= N || count <= 0) return false;
    t.M = count;
    t.N = static_cast<int>(min(static_cast<int64_t>(BN), N - t.n0));
    t.K = adapter_rank(ranks, adapter, max_rank);
    t.q = qop.ptr + adapter * qop.adapter_stride + t.n0 * qop.sn;
    return true;
  }
  __device__ Acc p(const Tile& t, int m, int64_t k) const {
    return h[rows.row(t.start, m) * ldh + k];
  }
  __device__ Acc q(const Tile& t, int64_t k, int n) const {
    return to_acc(t.q[n * qop.sn + k * qop.sk]);
  }
  __device__ T load_out(const Tile& t, int m, int n) const {
    return y[rows.row(t.start, m) * ldy + t.n0 + n];
  }
  __device__ void store(const Tile& t, int m, int n, Acc acc, T old) const {
    Acc v;
    if constexpr (Accumulate) {
      v = fma_acc(out_scale, acc, to_acc(old));
    } else {
      v = out_scale * acc;
      if (bias != nullptr) v += to_acc(bias[t.n0 + n]);
    }
    y[rows.row(t.start, m) * ldy + t.n0 + n] = from_acc<T>(v);
  }
};

// Per adapter i, over its rows r (perm[offsets[i] .. offsets[i+1])):
// O_i[m, n] = scale * sum_r P[r, m] Q[r, n] for m < M_i, n < N_i, where M_i / N_i are
// either rank_i or a fixed size. Rows are summed in perm's order by one block (no split
// over rows), so the result is the same on every run. Adapters without rows are not
// written (callers zero O). With offsets == nullptr there is one adapter over rows
// 0..num_rows-1 in order (perm unused).
template <typename T, typename PT, typename QT>
struct WeightGradProblem {
  const int* perm;
  const int* offsets;  // [N + 1], or null
  const PT* pp;
  int64_t ldp;
  const QT* qp;
  int64_t ldq;
  T* o;
  int64_t o_adapter, ldo;
  const int* ranks;
  int max_rank;
  bool m_is_rank, n_is_rank;
  int64_t m_fixed, n_fixed, m_tiles, n_tiles;
  int64_t num_rows;  // with offsets == nullptr
  acc_t<T> scale;

  static constexpr bool kPKContig = false, kQKContig = false, kReadsOut = false;
  using Acc = acc_t<T>;
  using Old = Acc;
  struct Tile {
    int64_t K, start, m0, n0, out;
    int M, N;
  };

  __device__ bool setup(int64_t b, int BM, int BN, Tile& t) const {
    const int64_t per = m_tiles * n_tiles;
    const int i = static_cast<int>(b / per);
    const int64_t rem = b % per;
    t.m0 = (rem / n_tiles) * BM;
    t.n0 = (rem % n_tiles) * BN;
    t.start = offsets != nullptr ? offsets[i] : 0;
    t.K = (offsets != nullptr ? offsets[i + 1] : num_rows) - t.start;
    const int rank = adapter_rank(ranks, i, max_rank);
    const int64_t mi = m_is_rank ? rank : m_fixed, ni = n_is_rank ? rank : n_fixed;
    if (t.K <= 0 || t.m0 >= mi || t.n0 >= ni) return false;
    t.M = static_cast<int>(min(static_cast<int64_t>(BM), mi - t.m0));
    t.N = static_cast<int>(min(static_cast<int64_t>(BN), ni - t.n0));
    t.out = i * o_adapter + t.m0 * ldo + t.n0;
    return true;
  }
  __device__ int64_t row(const Tile& t, int64_t k) const {
    return offsets != nullptr ? static_cast<int64_t>(perm[t.start + k]) : t.start + k;
  }
  __device__ Acc p(const Tile& t, int m, int64_t k) const {
    return static_cast<Acc>(pp[row(t, k) * ldp + t.m0 + m]);
  }
  __device__ Acc q(const Tile& t, int64_t k, int n) const {
    return static_cast<Acc>(qp[row(t, k) * ldq + t.n0 + n]);
  }
  __device__ void store(const Tile& t, int m, int n, Acc acc, Old) const {
    o[t.out + m * ldo + n] = from_acc<T>(acc * scale);
  }
};

// Tile shapes. Grouped kernels need BM == kGroupRows.
using ShapeWide = TileShape<kGroupRows, 64, 16, 4, 4>;    // 256 threads
using ShapeNarrowN = TileShape<kGroupRows, 16, 16, 4, 1>; // 256 threads, N <= 16 (small rank)
using ShapeNarrowM = TileShape<16, 64, 16, 1, 4>;         // 256 threads, M <= 16 (small rank)

// Host helpers: build the problem, pick a shape, launch on the current stream.

// Upper bound on the number of groups: sum_i ceil(c_i / G) <= T / G + (adapters used).
inline int64_t max_groups(const RowGroups& g, int64_t T, int64_t num_adapters) {
  return g.perm == nullptr ? ceil_div(T, kGroupRows)
                           : ceil_div(T, kGroupRows) + std::min(T, num_adapters);
}

template <typename T, bool QKContig>
void launch_shrink(const RowGroups& g, int64_t num_rows, int64_t num_adapters, const T* p, int64_t ldp,
                   int64_t K, AdapterOperand<T> q, const int* ranks, int max_rank,
                   const acc_t<T>* scales, acc_t<T>* h, int64_t ldh) {
  auto run = [&](auto shape) {
    using S = decltype(shape);
    static_assert(S::kBM == kGroupRows, "grouped tiles hold one group");
    ShrinkProblem<T, QKContig> prob{g,      p,      ldp, K, q, ranks, max_rank, scales,
                                    h,      ldh,    ceil_div(max_rank, S::kBN)};
    launch_tiled<S>(prob, max_groups(g, num_rows, num_adapters) * prob.n_tiles);
  };
  if (max_rank <= 16) {
    run(ShapeNarrowN{});
  } else {
    run(ShapeWide{});
  }
}

template <typename T, bool QKContig, bool Accumulate>
void launch_expand(const RowGroups& g, int64_t num_rows, int64_t num_adapters, const acc_t<T>* h,
                   int64_t ldh, AdapterOperand<T> q, const int* ranks, int max_rank, int64_t N,
                   T* y, int64_t ldy, const T* bias, acc_t<T> out_scale) {
  using S = ShapeWide;
  ExpandProblem<T, QKContig, Accumulate> prob{g,    h,   ldh,  q,         ranks,
                                              max_rank, N, y, ldy, bias, out_scale,
                                              ceil_div(N, S::kBN)};
  launch_tiled<S>(prob, max_groups(g, num_rows, num_adapters) * prob.n_tiles);
}

// offsets == nullptr: one adapter over rows 0..num_rows-1 (perm unused).
template <typename T, typename PT, typename QT>
void launch_weight_grad(const int* perm, const int* offsets, int64_t num_adapters, const PT* p,
                        int64_t ldp, const QT* q, int64_t ldq, T* o, int64_t o_adapter,
                        int64_t ldo, const int* ranks, int max_rank, bool m_is_rank,
                        int64_t m_size, bool n_is_rank, int64_t n_size, int64_t num_rows = 0,
                        acc_t<T> scale = acc_t<T>(1)) {
  auto run = [&](auto shape) {
    using S = decltype(shape);
    const int64_t m_tiles = ceil_div(m_size, S::kBM), n_tiles = ceil_div(n_size, S::kBN);
    WeightGradProblem<T, PT, QT> prob{perm,     offsets,   p,         ldp,       q,
                                      ldq,      o,         o_adapter, ldo,       ranks,
                                      max_rank, m_is_rank, n_is_rank, m_size,    n_size,
                                      m_tiles,  n_tiles,   num_rows,  scale};
    launch_tiled<S>(prob, num_adapters * m_tiles * n_tiles);
  };
  if (m_size <= 16) {
    run(ShapeNarrowM{});
  } else if (n_size <= 16) {
    run(ShapeNarrowN{});
  } else {
    run(ShapeWide{});
  }
}

}  // namespace lora_ext::cuda
