// Vectorised inner loops, compiled once per instruction set (see CMakeLists.txt:
// CPU_CAPABILITY is DEFAULT, AVX2 or AVX512, and ATen's Vectorized<float> follows it;
// vec_default.h stands in for it where ATen has only its scalar fallback).
// Everything accumulates in fp32 and rounds once when it stores.
//
// Keep this file free of parallel loops, allocation and standard-library containers:
// the same inline code compiled with different -m flags must not meet at link time.
//
// No floating-point contraction: GCC would otherwise fuse a multiply and an add written
// apart (an epilogue's acc * scale + base) into one FMA where it sees fit, and it sees
// fit differently in the one-row and the four-row instances of a template, so a row's
// bits would depend on how many rows shared its block. The hot loops call FMAs by name.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "microkernels.h"
#include "vec_default.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace lora_ext::cpu::CPU_CAPABILITY {
namespace {

// The loops for one storage type T; Acc is fp32 (fp64 for double).
template <typename T>
struct Impl {
  using Acc = acc_t<T>;
  using Vec = vec_t<Acc>;  // ATen's Vectorized, or PortableVec where ATen has none (vec_default.h)
  static constexpr bool kPortable = is_portable_vec_v<Acc>;
  static constexpr int64_t kVL = Vec::size();
  // Four vectors of outputs per expand call: enough independent accumulators per row.
  static constexpr int64_t kOutBlock = 4 * kVL;
  // Register budget: AVX512 has 32 vector registers, AVX2 16.
  static constexpr int kMaxRows = Vec::size() * sizeof(Acc) >= 64 ? 4 : 2;
  // expand's rows per block: ROWS * 4 accumulators plus ROWS broadcasts and a B vector
  // (AVX2: 3 rows fill the 16 registers; 2 left half the FMA pipes' latency uncovered).
  static constexpr int kExpandRows = kMaxRows == 2 && std::is_same_v<Acc, float> ? 3 : kMaxRows;
  // bf16 in the AVX512BF16 build: the CPU's bf16 dot products (products of bf16 are
  // exact in fp32, at twice the fp32 FMA rate) in shrink and merge_tile.
#if defined(__AVX512BF16__)
  static constexpr bool kBf16Pairs = std::is_same_v<T, c10::BFloat16>;
#else
  static constexpr bool kBf16Pairs = false;
#endif

  static Acc to_acc(T v) { return static_cast<Acc>(v); }

  static Vec load(const T* p) {
    if constexpr (std::is_same_v<T, Acc>) {
      return Vec::loadu(p);
    } else if constexpr (kPortable) {
      return Vec::load_from(p);
    } else {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }

  // Loads `count` (< kVL) elements, zero-filling the rest.
  static Vec load(const T* p, int64_t count) {
    if constexpr (std::is_same_v<T, Acc>) {
      return Vec::loadu(p, count);
    } else if constexpr (kPortable) {
      return Vec::load_from(p, count);
    } else {
      const auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, count));
      return lo;
    }
  }

  // Two vectors' worth (2 * kVL elements): one full vector of a 16-bit T.
  static void load2(const T* p, Vec& v0, Vec& v1) {
    if constexpr (std::is_same_v<T, Acc>) {
      v0 = Vec::loadu(p);
      v1 = Vec::loadu(p + kVL);
    } else if constexpr (kPortable) {
      v0 = Vec::load_from(p);
      v1 = Vec::load_from(p + kVL);
    } else {
      at::vec::load_to_float<T>(p, v0, v1);
    }
  }

  static void store2(T* p, const Vec& v0, const Vec& v1) {
    if constexpr (std::is_same_v<T, Acc>) {
      v0.store(p);
      v1.store(p + kVL);
    } else if constexpr (kPortable) {
      v0.store_to(p);
      v1.store_to(p + kVL);
    } else {
      at::vec::convert_from_float<T>(v0, v1).store(p);
    }
  }

  // Rounds and stores the expand's outputs: 2 kVL values, or kVL. bf16 goes through the
  // CPU's conversion instruction where the build has it (one instruction instead of
  // ATen's emulation, about twenty; the same round-to-nearest-even, but results below
  // bf16's normal range, |y| < 1.2e-38, are stored as zero). The merge keeps store2:
  // torch's rounding bit for bit.
  static void store_out(T* p, const Vec& v0, const Vec& v1) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
      return;
    }
#endif
    store2(p, v0, v1);
  }

  static void store_out(T* p, const Vec& v) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
      return;
    }
#endif
    if constexpr (std::is_same_v<T, Acc>) {
      v.store(p);
    } else if constexpr (kPortable) {
      v.store_to(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, kVL);
    }
  }

  // -------------------------------------------------------------------------
  // shrink: ROWS rows of x against JB rows of a at once (ROWS * JB accumulators).
  //
  // Two ways to form the dot products, one block loop for both. FmaDot: fp32 FMAs on
  // x and a converted to Acc. Bf16Dot (bf16 in the AVX512BF16 build): the CPU's bf16
  // dot products, 32 elements per instruction (twice the FMA rate, no conversions),
  // each product exact in fp32 and summed in fp32 like FmaDot: only the order differs.

  struct FmaDot {
    using Accum = Vec;
    static constexpr int64_t kStep = kVL;
    static Accum zero() { return Vec(Acc(0)); }
    // acc[r][jj] += x_rows[r][k..] * ap[jj][k..] over `count` (<= kStep) elements.
    template <int ROWS, int JB>
    C10_ALWAYS_INLINE static void step(Accum (&acc)[ROWS][JB], const T* const* x_rows,
                                       const T* const (&ap)[JB], int64_t k, int64_t count) {
      Vec av[JB];
      for (int jj = 0; jj < JB; ++jj)
        av[jj] = count == kStep ? load(ap[jj] + k) : load(ap[jj] + k, count);
      for (int r = 0; r < ROWS; ++r) {
        const Vec xv = count == kStep ? load(x_rows[r] + k) : load(x_rows[r] + k, count);
        for (int jj = 0; jj < JB; ++jj) acc[r][jj] = fmadd(xv, av[jj], acc[r][jj]);
      }
    }
    static Acc reduce(const Accum& v) {
      if constexpr (kPortable) {
        return reduce_add(v);
      } else {
        return at::vec::vec_reduce_all<Acc>([](const Vec& p, const Vec& q) { return p + q; }, v);
      }
    }
  };

#if defined(__AVX512BF16__)
  struct Bf16Dot {
    using Accum = __m512;
    static constexpr int64_t kStep = 32;
    static Accum zero() { return _mm512_setzero_ps(); }
    template <int ROWS, int JB>
    C10_ALWAYS_INLINE static void step(Accum (&acc)[ROWS][JB], const T* const* x_rows,
                                       const T* const (&ap)[JB], int64_t k, int64_t count) {
      // An all-ones mask compiles to plain loads.
      const __mmask32 mask =
          count == kStep ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << count) - 1);
      __m512bh av[JB];
#pragma GCC unroll 8
      for (int jj = 0; jj < JB; ++jj) av[jj] = (__m512bh)_mm512_maskz_loadu_epi16(mask, ap[jj] + k);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x_rows[r] + k);
#pragma GCC unroll 8
        for (int jj = 0; jj < JB; ++jj) acc[r][jj] = _mm512_dpbf16_ps(acc[r][jj], xv, av[jj]);
      }
    }
    static Acc reduce(const Accum& v) { return _mm512_reduce_add_ps(v); }
  };
#endif

  template <typename Dot, int ROWS, int JB>
  static void shrink_block(const T* const* x_rows, Acc* const* xa_rows, const T* a, int64_t rank,
                           int64_t in) {
    using Accum = typename Dot::Accum;
    for (int64_t j0 = 0; j0 < rank; j0 += JB) {
      // Past the last rank row, alias it: computed, never stored.
      const T* ap[JB];
      for (int jj = 0; jj < JB; ++jj) ap[jj] = a + std::min<int64_t>(j0 + jj, rank - 1) * in;
      Accum acc[ROWS][JB];
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
        for (int jj = 0; jj < JB; ++jj) acc[r][jj] = Dot::zero();
      int64_t k = 0;
      for (; k + Dot::kStep <= in; k += Dot::kStep)
        Dot::template step<ROWS, JB>(acc, x_rows, ap, k, Dot::kStep);
      if (k < in) Dot::template step<ROWS, JB>(acc, x_rows, ap, k, in - k);
      // Reduce with constant indices only: a run-time index into acc would make the
      // compiler keep it in memory inside the hot loop.
      Acc sums[ROWS][JB];
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
        for (int jj = 0; jj < JB; ++jj) sums[r][jj] = Dot::reduce(acc[r][jj]);
      const int64_t jn = std::min<int64_t>(JB, rank - j0);
      for (int r = 0; r < ROWS; ++r)
        for (int64_t jj = 0; jj < jn; ++jj) xa_rows[r][j0 + jj] = sums[r][jj];
    }
  }

  template <typename Dot>
  static void shrink_rows(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows, const T* a,
                          int64_t rank, int64_t in) {
    int64_t i = 0;
    for (; i + kMaxRows <= nrows; i += kMaxRows)
      shrink_block<Dot, kMaxRows, 4>(x_rows + i, xa_rows + i, a, rank, in);
    if constexpr (kMaxRows > 2) {
      if (i + 2 <= nrows) {
        shrink_block<Dot, 2, 4>(x_rows + i, xa_rows + i, a, rank, in);
        i += 2;
      }
    }
    // One row (decode): eight rank rows at once to keep enough loads in flight.
    for (; i < nrows; ++i) shrink_block<Dot, 1, 8>(x_rows + i, xa_rows + i, a, rank, in);
  }

  static void shrink(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows, const T* a,
                     int64_t rank, int64_t in) {
#if defined(__AVX512BF16__)
    if constexpr (kBf16Pairs) return shrink_rows<Bf16Dot>(x_rows, xa_rows, nrows, a, rank, in);
#endif
    shrink_rows<FmaDot>(x_rows, xa_rows, nrows, a, rank, in);
  }

  // -------------------------------------------------------------------------
  // Packed shrink (prefill): A transposed into panels, so each step of k is one vector
  // of a panel times one broadcast of x per row, accumulated along the rank (a GEMM
  // micro-kernel; the dot-product form above reads both operands along k and reduces
  // every (row, rank) pair). AVX-512: fp32 and bf16 (AVX512BF16 build); AVX2 has its own below.
  //
  // A's rows are read as 32-bit units: one fp32 k, or a bf16 pair of k. A panel step
  // is 64 bytes: U consecutive units of each of the panel's 16 / U ranks, side by side.
  // Per step, a row's U units of x (one broadcast) meet each panel in one instruction:
  // an FMA per lane (fp32) or the CPU's bf16 dot product, which sums a unit's pair
  // (bf16); the U units of each rank are summed when a chunk of steps ends. The
  // broadcast feeds one instruction per panel: two to four panels go together, since
  // with one the broadcasts, not the FMAs, set the pace. U = 4 (4-rank panels) for
  // ranks up to 8, so that they still have two panels; U = 2 (8-rank panels) above,
  // where four 4-rank panels per pass stream 64 KB of panels from L2 per row block
  // (r = 16 was 5-12% slower with them).

#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kHasPanels = std::is_same_v<T, float> || kBf16Pairs;
  static constexpr int64_t kUnitK = 4 / sizeof(T);  // k per 32-bit unit
  static constexpr int64_t kPanelChunk = 256;       // steps per pass (L1/L2 blocking)

  static int units_per_rank(int64_t rank) { return rank <= 8 ? 4 : 2; }

  // at: ceil(rank / (16 / U)) panels of in / (U kUnitK) steps; ranks past `rank` zero.
  template <int U>
  static void pack_panels(const T* a, int64_t rank, int64_t in, float* out) {
    constexpr int64_t kRanks = 16 / U;
    const int64_t units = in / kUnitK, steps = units / U;
    // A as [rank][units] 32-bit values: moved, never converted (bf16 pairs keep their bits).
    const auto* src = reinterpret_cast<const float*>(a);
    if constexpr (U == 4) {
      // Each step: a 16-byte piece of each of the panel's 4 rows.
      for (int64_t j0 = 0; j0 < rank; j0 += kRanks) {
        float* panel = out + (j0 / kRanks) * steps * 16;
        for (int64_t s = 0; s < steps; ++s) {
          __m128 piece[kRanks];
          for (int64_t j = 0; j < kRanks; ++j)
            piece[j] = j0 + j < rank ? _mm_loadu_ps(src + (j0 + j) * units + s * U) : _mm_setzero_ps();
          __m512 v = _mm512_castps128_ps512(piece[0]);
          v = _mm512_insertf32x4(v, piece[1], 1);
          v = _mm512_insertf32x4(v, piece[2], 2);
          v = _mm512_insertf32x4(v, piece[3], 3);
          _mm512_storeu_ps(panel + s * 16, v);
        }
      }
    } else {
      // 16 ranks x 16 units at a time: transposed (lanes = ranks), then each pair of
      // units interleaved into the two 8-rank panels.
      const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
      alignas(64) float tile[16][16];
      for (int64_t j0 = 0; j0 < rank; j0 += 16) {
        const int m = static_cast<int>(std::min<int64_t>(16, rank - j0));
        float* panel_lo = out + (j0 / kRanks) * steps * 16;
        float* panel_hi = panel_lo + steps * 16;  // only when m > 8
        for (int64_t u0 = 0; u0 < units; u0 += 16) {
          const int n = static_cast<int>(std::min<int64_t>(16, units - u0));
          if (m < 16) std::memset(tile, 0, sizeof(tile));
          at::vec::transpose_mxn<float>(src + j0 * units + u0, units, &tile[0][0], 16, m, n);
          for (int q = 0; q < n / 2; ++q) {
            const __m512 v0 = _mm512_load_ps(tile[2 * q]), v1 = _mm512_load_ps(tile[2 * q + 1]);
            const int64_t step = u0 / 2 + q;
            _mm512_storeu_ps(panel_lo + step * 16, _mm512_permutex2var_ps(v0, lo, v1));
            if (m > 8) _mm512_storeu_ps(panel_hi + step * 16, _mm512_permutex2var_ps(v0, hi, v1));
          }
        }
      }
    }
  }

  static void pack_at(const T* a, int64_t rank, int64_t in, void* at) {
    auto* out = static_cast<float*>(at);
    if (units_per_rank(rank) == 4) {
      pack_panels<4>(a, rank, in, out);
    } else {
      pack_panels<2>(a, rank, in, out);
    }
  }

  // acc[r][gg] += (x_rows[r]'s units at step s) * panel gg's step s, steps [s0, s1).
  template <int ROWS, int G, int U>
  C10_ALWAYS_INLINE static void panel_steps(__m512 (&acc)[ROWS][G], const T* const* x_rows,
                                            const float* const (&panels)[G], int64_t s0,
                                            int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      __m512 pv[G];
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) pv[gg] = _mm512_loadu_ps(panels[gg] + s * 16);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        // The row's U units at step s, repeated across the vector.
        const T* xs = x_rows[r] + U * kUnitK * s;
        __m512 xb;
        if constexpr (U == 4) {
          xb = _mm512_broadcast_f32x4(_mm_loadu_ps(reinterpret_cast<const float*>(xs)));
        } else {
          double units;
          std::memcpy(&units, xs, sizeof(units));
          xb = _mm512_castpd_ps(_mm512_set1_pd(units));
        }
#pragma GCC unroll 4
        for (int gg = 0; gg < G; ++gg) {
          if constexpr (std::is_same_v<T, float>) {
            acc[r][gg] = _mm512_fmadd_ps(xb, pv[gg], acc[r][gg]);
          } else {
#if defined(__AVX512BF16__)
            acc[r][gg] = _mm512_dpbf16_ps(acc[r][gg], (__m512bh)_mm512_castps_si512(xb),
                                          (__m512bh)_mm512_castps_si512(pv[gg]));
#endif
          }
        }
      }
    }
  }

  // ROWS rows x G panels over steps [s0, s1), added to the partial sums in xa (written,
  // with `first`).
  template <int ROWS, int G, int U>
  static void panel_block(const T* const* x_rows, Acc* const* xa_rows, const float* at,
                          int64_t steps, int64_t g0, int64_t s0, int64_t s1, bool first) {
    constexpr int64_t kRanks = 16 / U;
    const float* panels[G];
    for (int gg = 0; gg < G; ++gg) panels[gg] = at + (g0 + gg) * steps * 16;
    __m512 acc[ROWS][G];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) acc[r][gg] = _mm512_setzero_ps();
    panel_steps<ROWS, G, U>(acc, x_rows, panels, s0, s1);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) {
        Acc* xa = xa_rows[r] + (g0 + gg) * kRanks;
        // Sum each rank's U lanes into the first of them, keep those: the panel's ranks.
        const __m512 pairs = _mm512_add_ps(acc[r][gg], _mm512_permute_ps(acc[r][gg], 0xB1));
        if constexpr (U == 4) {
          const __m512 quads = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0x4E));
          __m128 sums = _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, quads));
          if (!first) sums = _mm_add_ps(sums, _mm_loadu_ps(xa));
          _mm_storeu_ps(xa, sums);
        } else {
          __m256 sums = _mm512_castps512_ps256(_mm512_maskz_compress_ps(0x5555, pairs));
          if (!first) sums = _mm256_add_ps(sums, _mm256_loadu_ps(xa));
          _mm256_storeu_ps(xa, sums);
        }
      }
    }
  }

  // Rows in blocks of 16 / G (at most 16 accumulators), G panels at a time.
  template <int G, int U>
  static void panel_rows(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                         const float* at, int64_t steps, int64_t g0, int64_t s0, int64_t s1,
                         bool first) {
    constexpr int kRows = 16 / G;
    int64_t i = 0;
    const auto run = [&](auto rows_tag) {
      constexpr int R = decltype(rows_tag)::value;
      panel_block<R, G, U>(x_rows + i, xa_rows + i, at, steps, g0, s0, s1, first);
      i += R;
    };
    while (i + kRows <= nrows) run(std::integral_constant<int, kRows>{});
    if constexpr (kRows > 4) if (i + 4 <= nrows) run(std::integral_constant<int, 4>{});
    if constexpr (kRows > 2) if (i + 2 <= nrows) run(std::integral_constant<int, 2>{});
    while (i < nrows) run(std::integral_constant<int, 1>{});
  }

  template <int U>
  static void shrink_panels_of(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                               const float* at, int64_t rank, int64_t in) {
    constexpr int64_t kRanks = 16 / U;
    const int64_t steps = in / (U * kUnitK), groups = (rank + kRanks - 1) / kRanks;
    if (steps == 0) {
      for (int64_t i = 0; i < nrows; ++i) std::fill(xa_rows[i], xa_rows[i] + groups * kRanks, Acc(0));
      return;
    }
    for (int64_t s0 = 0; s0 < steps; s0 += kPanelChunk) {
      const int64_t s1 = std::min(steps, s0 + kPanelChunk);
      const bool first = s0 == 0;
      // Two to four panels at a time; five as three and two.
      for (int64_t g = 0; g < groups;) {
        const int64_t left = groups - g, take = left == 5 ? 3 : std::min<int64_t>(left, 4);
        if (take == 4) panel_rows<4, U>(x_rows, xa_rows, nrows, at, steps, g, s0, s1, first);
        if (take == 3) panel_rows<3, U>(x_rows, xa_rows, nrows, at, steps, g, s0, s1, first);
        if (take == 2) panel_rows<2, U>(x_rows, xa_rows, nrows, at, steps, g, s0, s1, first);
        if (take == 1) panel_rows<1, U>(x_rows, xa_rows, nrows, at, steps, g, s0, s1, first);
        g += take;
      }
    }
  }

  // xa_rows[i][j] = sum_k x_rows[i][k] a[j][k] from pack_at's panels; writes whole
  // panels (zeros past the rank): xa rows are padded (microkernels.h).
  static void shrink_panels(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                            const void* at_packed, int64_t rank, int64_t in) {
    const auto* at = static_cast<const float*>(at_packed);
    if (units_per_rank(rank) == 4) {
      shrink_panels_of<4>(x_rows, xa_rows, nrows, at, rank, in);
    } else {
      shrink_panels_of<2>(x_rows, xa_rows, nrows, at, rank, in);
    }
  }
#endif

#if defined(CPU_CAPABILITY_AVX2)
  // AVX2 (16 vector registers): 8-rank panels of fp32 A, one k per step, so a row's
  // broadcast x[k] meets each panel in one FMA and every lane is one rank's sum (no
  // reduction). Two panels x six rows (12 accumulators) per block; an odd last panel
  // runs twelve rows. fp32 only: 16-bit x would need a conversion per broadcast.
  static constexpr bool kHasPanels = std::is_same_v<T, float>;
  static constexpr int64_t kPanelRanks = 8;
  static constexpr int64_t kPanelChunk = 256;  // k per pass: two panels' 16 KB stay in L1

  static void pack_at(const T* a, int64_t rank, int64_t in, void* at) {
    auto* out = static_cast<float*>(at);
    for (int64_t j0 = 0; j0 < rank; j0 += kPanelRanks) {
      float* panel = out + (j0 / kPanelRanks) * in * kPanelRanks;
      const int64_t m = std::min<int64_t>(kPanelRanks, rank - j0);
      for (int64_t k = 0; k < in; ++k) {
        for (int64_t l = 0; l < m; ++l) panel[k * kPanelRanks + l] = a[(j0 + l) * in + k];
        for (int64_t l = m; l < kPanelRanks; ++l) panel[k * kPanelRanks + l] = 0.f;
      }
    }
  }

  // ROWS rows x G panels over k in [k0, k1), added to the partial sums in xa (written,
  // with `first`).
  template <int ROWS, int G>
  static void panel_block(const T* const* x_rows, Acc* const* xa_rows, const float* at, int64_t in,
                          int64_t g0, int64_t k0, int64_t k1, bool first) {
    const float* panels[G];
    for (int gg = 0; gg < G; ++gg) panels[gg] = at + (g0 + gg) * in * kPanelRanks;
    __m256 acc[ROWS][G];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) acc[r][gg] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      __m256 pv[G];
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) pv[gg] = _mm256_loadu_ps(panels[gg] + k * kPanelRanks);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x_rows[r] + k);
#pragma GCC unroll 4
        for (int gg = 0; gg < G; ++gg) acc[r][gg] = _mm256_fmadd_ps(xb, pv[gg], acc[r][gg]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
      for (int gg = 0; gg < G; ++gg) {
        Acc* xa = xa_rows[r] + (g0 + gg) * kPanelRanks;
        _mm256_storeu_ps(xa, first ? acc[r][gg] : _mm256_add_ps(acc[r][gg], _mm256_loadu_ps(xa)));
      }
    }
  }

  template <int G>
  static void panel_rows(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                         const float* at, int64_t in, int64_t g0, int64_t k0, int64_t k1,
                         bool first) {
    constexpr int kRows = 12 / G;
    int64_t i = 0;
    const auto run = [&](auto rows_tag) {
      constexpr int R = decltype(rows_tag)::value;
      panel_block<R, G>(x_rows + i, xa_rows + i, at, in, g0, k0, k1, first);
      i += R;
    };
    while (i + kRows <= nrows) run(std::integral_constant<int, kRows>{});
    if constexpr (kRows > 4) if (i + 4 <= nrows) run(std::integral_constant<int, 4>{});
    if constexpr (kRows > 2) if (i + 2 <= nrows) run(std::integral_constant<int, 2>{});
    while (i < nrows) run(std::integral_constant<int, 1>{});
  }

  // xa_rows[i][j] = sum_k x_rows[i][k] a[j][k] from pack_at's panels; writes whole
  // panels (zeros past the rank): xa rows are padded (microkernels.h).
  static void shrink_panels(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                            const void* at_packed, int64_t rank, int64_t in) {
    const auto* at = static_cast<const float*>(at_packed);
    const int64_t groups = (rank + kPanelRanks - 1) / kPanelRanks;
    for (int64_t k0 = 0; k0 < in; k0 += kPanelChunk) {
      const int64_t k1 = std::min(in, k0 + kPanelChunk);
      for (int64_t g = 0; g + 2 <= groups; g += 2)
        panel_rows<2>(x_rows, xa_rows, nrows, at, in, g, k0, k1, k0 == 0);
      if (groups % 2 == 1) panel_rows<1>(x_rows, xa_rows, nrows, at, in, groups - 1, k0, k1, k0 == 0);
    }
  }
#endif

  // Bytes of pack_at's panels for (rank, in), or 0 where this build has no packed
  // shrink for T, for an `in` that is not a whole number of steps (the last would read
  // past x's row), or for a single panel (a broadcast per FMA: slower than the
  // dot-product shrink).
  static int64_t panel_bytes(int64_t rank, int64_t in) {
#if defined(CPU_CAPABILITY_AVX2)
    // One panel (rank <= 8) does one FMA per broadcast: the dot-product shrink is faster.
    if constexpr (kHasPanels) {
      const int64_t groups = (rank + kPanelRanks - 1) / kPanelRanks;
      return groups >= 2 ? groups * in * kPanelRanks * 4 : 0;
    }
#endif
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kHasPanels) {
      const int64_t units = units_per_rank(rank), step_k = units * kUnitK;
      const int64_t groups = (rank + 16 / units - 1) / (16 / units);
      return in % step_k == 0 && groups >= 2 ? groups * (in / step_k) * 64 : 0;
    }
#endif
    return 0;
  }

  // -------------------------------------------------------------------------
  // expand: ROWS rows times kOutBlock outputs, accumulated over the rank.

  static void pack_bt(const T* b, int64_t ldb, int64_t nout, int64_t rank, Acc* bt) {
    if constexpr (std::is_same_v<Acc, float> && kVL == 16) {
      // 16 x 16 tiles through ATen's in-register transpose (AVX-512), 16-bit B converted
      // to fp32 on the way: several times faster than element by element, and the
      // pack is a third of a decode-sized call's time (W2).
      alignas(64) float tile[16][16];
      for (int64_t o = 0; o < nout; o += 16) {
        const int m = static_cast<int>(std::min<int64_t>(16, nout - o));
        for (int64_t j = 0; j < rank; j += 16) {
          const int n = static_cast<int>(std::min<int64_t>(16, rank - j));
          const float* src = nullptr;
          int64_t ld = ldb;
          if constexpr (std::is_same_v<T, float>) {
            src = b + o * ldb + j;
          } else {
            for (int q = 0; q < m; ++q) {
              const T* row = b + (o + q) * ldb + j;
              (n == 16 ? load(row) : load(row, n)).store(tile[q]);
            }
            src = &tile[0][0];
            ld = 16;
          }
          at::vec::transpose_mxn<float>(src, ld, bt + j * kOutBlock + o, kOutBlock, m, n);
        }
      }
    } else {
      for (int64_t o = 0; o < nout; ++o) {
        const T* row = b + o * ldb;
        for (int64_t j = 0; j < rank; ++j) bt[j * kOutBlock + o] = to_acc(row[j]);
      }
    }
    for (int64_t j = 0; j < rank; ++j)
      std::fill(bt + j * kOutBlock + nout, bt + (j + 1) * kOutBlock, Acc(0));
  }

  template <int ROWS>
  static void expand_block(const Acc* const* xa_rows, const T* const* base_rows,
                           T* const* y_rows, const Acc* bt, int64_t rank, int64_t nout,
                           Acc scale) {
    constexpr int NV = kOutBlock / kVL;
    // The base and y rows continue past this block (the caller walks blocks left to
    // right): prefetch a few blocks ahead so their DRAM latency hides behind the FMAs.
    constexpr int64_t kAhead = 4 * kOutBlock;
    constexpr int64_t kLine = 64 / sizeof(T);
    if (nout == kOutBlock) {
      for (int r = 0; r < ROWS; ++r) {
        for (int64_t c = 0; c < kOutBlock; c += kLine) {
          if (base_rows != nullptr) __builtin_prefetch(base_rows[r] + kAhead + c, 0, 0);
          __builtin_prefetch(y_rows[r] + kAhead + c, 1, 0);
        }
      }
    }
    Vec acc[ROWS][NV];
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec(Acc(0));
    for (int64_t j = 0; j < rank; ++j) {
      Vec xv[ROWS];
      for (int r = 0; r < ROWS; ++r) xv[r] = Vec(xa_rows[r][j]);
      for (int v = 0; v < NV; ++v) {
        const Vec bv = Vec::loadu(bt + j * kOutBlock + v * kVL);
        for (int r = 0; r < ROWS; ++r) acc[r][v] = fmadd(xv[r], bv, acc[r][v]);
      }
    }
    // Index acc with constants only (see merge_block).
    const Vec vscale(scale);
    if (nout == kOutBlock) {
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; v += 2) {
          Vec out0 = acc[r][v] * vscale, out1 = acc[r][v + 1] * vscale;
          if (base_rows != nullptr) {
            Vec b0, b1;
            load2(base_rows[r] + v * kVL, b0, b1);
            out0 = out0 + b0;
            out1 = out1 + b1;
          }
          store_out(y_rows[r] + v * kVL, out0, out1);
        }
      }
      return;
    }
    alignas(64) Acc tile[ROWS][kOutBlock];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) (acc[r][v] * vscale).store(tile[r] + v * kVL);
    for (int r = 0; r < ROWS; ++r)
      for (int64_t o = 0; o < nout; ++o)
        y_rows[r][o] = static_cast<T>(tile[r][o] + (base_rows ? to_acc(base_rows[r][o]) : Acc(0)));
  }

#if defined(CPU_CAPABILITY_AVX512)
  // u[k], per 128-bit lane L: the sums of v[4k], ..., v[4k + 3] over L's four elements.
  template <int N>
  C10_ALWAYS_INLINE static void lane_sums(const __m512 (&v)[N], __m512 (&u)[N / 4]) {
    // Per lane L, for vectors a, b: [a0+a2, b0+b2, a1+a3, b1+b3].
    __m512 t[N / 2];
#pragma GCC unroll 8
    for (int k = 0; k < N / 2; ++k)
      t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                           _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
#pragma GCC unroll 4
    for (int k = 0; k < N / 4; ++k)
      u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }

  // Lane q of the result: the sum of v[q]'s sixteen lanes.
  C10_ALWAYS_INLINE static __m512 reduce16(const __m512 (&v)[16]) {
    __m512 u[4];
    lane_sums<16>(v, u);
    // Sum over the four 128-bit lanes, keeping u[k]'s four sums in lane k.
    const auto fold = [](__m512 p, __m512 q) {
      return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(p, q, _MM_SHUFFLE(3, 1, 3, 1)));
    };
    return fold(fold(u[0], u[1]), fold(u[2], u[3]));
  }
#endif

#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int64_t kPairRows = 4;

  // expand_dot for B rows of eight (R = 8, the common decode stack): one vector holds
  // two B rows, so sixteen outputs take eight aligned loads, shared by all rows, and a
  // reduction of eight vectors; lanes past the rank are cleared (B may hold anything
  // there). Returns how many outputs it wrote (a multiple of 16) for every row.
  static int64_t expand_pairs(const Acc* const* xa_rows, const T* const* base_rows,
                              T* const* y_rows, int64_t nrows, const T* b, int64_t rank,
                              int64_t nout, Acc scale) {
    static_assert(kVL == 16);
    const __mmask16 half = static_cast<__mmask16>((1u << rank) - 1);
    const __m512 lane_mask =
        _mm512_castsi512_ps(_mm512_maskz_set1_epi32(static_cast<__mmask16>(half | (half << 8)), -1));
    __m512 xx[kPairRows];
    for (int64_t i = 0; i < nrows; ++i) {
      const __m512 lo = _mm512_castps256_ps512(_mm256_loadu_ps(xa_rows[i]));
      xx[i] = _mm512_shuffle_f32x4(lo, lo, _MM_SHUFFLE(1, 0, 1, 0));  // [xa[:8], xa[:8]]
    }
    // w's lanes hold outputs 0 2 4 6 | 1 3 5 7 | 8 10 12 14 | 9 11 13 15 (see below).
    const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    const __m512 vscale = _mm512_set1_ps(scale);
    int64_t o = 0;
    for (; o + 16 <= nout; o += 16) {
      __m512 bv[8];
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q)
        bv[q] = _mm512_and_ps(__m512(load(b + (o + 2 * q) * 8)), lane_mask);  // rows o+2q, o+2q+1
      for (int64_t i = 0; i < nrows; ++i) {
        __m512 pr[8];
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) pr[q] = _mm512_mul_ps(bv[q], xx[i]);
        // As reduce16, but each vector holds two sums of eight (its 256-bit halves).
        __m512 u[2];
        lane_sums<8>(pr, u);
        // 128-bit lanes 0+1 of u[k] are the first row of each pair, 2+3 the second.
        const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
        Vec sums = Vec(_mm512_mul_ps(_mm512_permutexvar_ps(order, w), vscale));
        if (base_rows != nullptr) sums = sums + load(base_rows[i] + o);
        store_out(y_rows[i] + o, sums);
      }
    }
    return o;
  }
#endif

  // acc[q] = b[q * ldb + j] * xa_pad[j] summed over j < rank, lane by lane (the caller
  // reduces); b_readable: elements readable from b.
  template <int kRows>
  C10_ALWAYS_INLINE static void dot_rows(Vec (&acc)[kRows], const T* b, int64_t ldb,
                                         int64_t b_readable, const Acc* xa_pad, int64_t rank) {
    const Vec zero(Acc(0));
#pragma GCC unroll 16
    for (int q = 0; q < kRows; ++q) acc[q] = zero;
    int64_t j = 0;
    for (; j + kVL <= rank; j += kVL) {
      const Vec xv = Vec::loadu(xa_pad + j);
#pragma GCC unroll 16
      for (int q = 0; q < kRows; ++q) acc[q] = fmadd(load(b + q * ldb + j), xv, acc[q]);
    }
    if (j == rank) return;
    const int64_t count = rank - j;
    const Vec xv = Vec::loadu(xa_pad + j);
    if ((kRows - 1) * ldb + j + kVL <= b_readable) {
      // Load whole vectors (past the rank they see padding or the next row) and clear
      // the extra lanes (they may hold anything, NaN included) with a bitwise AND.
      // Masked loads are several times slower here (Zen 4, measured), and GCC folds a
      // blend with zero into one, hence the AND.
      const Vec lane_mask = Vec::set(zero, zero == zero /* every bit set */, count);
#pragma GCC unroll 16
      for (int q = 0; q < kRows; ++q)
        acc[q] = fmadd(load(b + q * ldb + j) & lane_mask, xv, acc[q]);
    } else {
#pragma GCC unroll 16
      for (int q = 0; q < kRows; ++q)
        acc[q] = fmadd(load(b + q * ldb + j, count), xv, acc[q]);
    }
  }

  // Few rows: y[o] = base[o] + scale * dot(b[o, :rank], xa), reading B rows in place
  // (packing B would cost more than the arithmetic it saves). Four outputs at a time.
  static void expand_dot(const Acc* const* xa_rows, const T* const* base_rows, T* const* y_rows,
                         int64_t nrows, const T* b, int64_t ldb, int64_t b_readable,
                         int64_t rank, int64_t nout, Acc scale) {
    constexpr int kOuts = 4;
    const auto reduce = [](const Vec& v) {
      if constexpr (kPortable) {
        return reduce_add(v);
      } else {
        return at::vec::vec_reduce_all<Acc>([](const Vec& p, const Vec& q) { return p + q; }, v);
      }
    };
    int64_t o_paired = 0;  // outputs [0, o_paired) done for every row by expand_pairs
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<Acc, float>) {
      if (ldb == kVL / 2 && nrows <= kPairRows)
        o_paired = expand_pairs(xa_rows, base_rows, y_rows, nrows, b, rank, nout, scale);
    }
#endif
    for (int64_t i = 0; i < nrows; ++i) {
      const Acc* xa_pad = xa_rows[i];  // zero past the rank (see microkernels.h)
      int64_t o = o_paired;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<Acc, float>) {
        // Sixteen outputs at once, reduced together (reduce16): about three shuffles or
        // adds per output instead of eight for one reduction each.
        constexpr int kWide = 16;
        for (; o + kWide <= nout; o += kWide) {
          Vec acc[kWide];
          dot_rows<kWide>(acc, b + o * ldb, ldb, b_readable - o * ldb, xa_pad, rank);
          __m512 v[kWide];
#pragma GCC unroll 16
          for (int q = 0; q < kWide; ++q) v[q] = acc[q];
          Vec sums = Vec(reduce16(v)) * Vec(scale);
          if (base_rows != nullptr) sums = sums + load(base_rows[i] + o);
          store_out(y_rows[i] + o, sums);
        }
      }
#endif
      for (; o + kOuts <= nout; o += kOuts) {
        Vec acc[kOuts];
        dot_rows<kOuts>(acc, b + o * ldb, ldb, b_readable - o * ldb, xa_pad, rank);
        Acc sums[kOuts];
#pragma GCC unroll 4
        for (int q = 0; q < kOuts; ++q) sums[q] = reduce(acc[q]);
        for (int q = 0; q < kOuts; ++q)
          y_rows[i][o + q] = static_cast<T>(scale * sums[q] + (base_rows ? to_acc(base_rows[i][o + q]) : Acc(0)));
      }
      for (; o < nout; ++o) {
        Acc sum = 0;
        for (int64_t j = 0; j < rank; ++j) sum += to_acc(b[o * ldb + j]) * xa_pad[j];
        y_rows[i][o] = static_cast<T>(scale * sum + (base_rows ? to_acc(base_rows[i][o]) : Acc(0)));
      }
    }
  }

  static void expand(const Acc* const* xa_rows, const T* const* base_rows, T* const* y_rows,
                     int64_t nrows, const Acc* bt, int64_t rank, int64_t nout, Acc scale) {
    int64_t i = 0;
    for (; i + kExpandRows <= nrows; i += kExpandRows)
      expand_block<kExpandRows>(xa_rows + i, base_rows ? base_rows + i : nullptr, y_rows + i, bt,
                                rank, nout, scale);
    if constexpr (kExpandRows > 2) {
      for (; i + 2 <= nrows; i += 2)
        expand_block<2>(xa_rows + i, base_rows ? base_rows + i : nullptr, y_rows + i, bt, rank,
                        nout, scale);
    }
    for (; i < nrows; ++i)
      expand_block<1>(xa_rows + i, base_rows ? base_rows + i : nullptr, y_rows + i, bt, rank,
                      nout, scale);
  }

  // -------------------------------------------------------------------------
  // merge: ROWS weight rows times two vectors of columns, accumulated over the rank.

  // Order-preserving integer view of T's bits: consecutive representable values
  // differ by one; +0 and -0 stay distinct.
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static constexpr Bits kSign = Bits(1) << (8 * sizeof(T) - 1);
  static int64_t ord(T v) {
    Bits u;
    std::memcpy(&u, &v, sizeof(T));
    return (u & kSign) ? -int64_t(u & ~kSign) - 1 : int64_t(u);
  }
  static T from_ord(int64_t o) {
    const Bits u = o >= 0 ? Bits(o) : Bits(Bits(-(o + 1)) | kSign);
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
  }

  // The exact modes work element by element on d (already scaled); merge and
  // unmerge compute d with the same code, so unmerge sees the same bits.
  static int64_t apply_exact(T* w, int8_t* res, const Acc* d, int64_t count, MergeMode mode,
                             int64_t base_offset, int64_t* overflow_offset, T* overflow_value,
                             int64_t overflow_count) {
    int64_t overflows = 0;
    for (int64_t i = 0; i < count; ++i) {
      if (mode == MergeMode::kExactVerify) {
        // Undo, then redo the merge: only the weight merge_exact_ left gives itself back.
        const T back = static_cast<T>(to_acc(w[i]) - d[i]);
        T original = from_ord(ord(back) + res[i]);
        if (res[i] == -128) {
          const int64_t* begin = overflow_offset;
          const int64_t* end = begin + overflow_count;
          const int64_t* hit = std::lower_bound(begin, end, base_offset + i);
          if (hit == end || *hit != base_offset + i) {
            ++overflows;
            continue;
          }
          original = overflow_value[hit - begin];
        }
        overflows += ord(static_cast<T>(to_acc(original) + d[i])) != ord(w[i]);
      } else if (mode == MergeMode::kExactMerge) {
        const T old = w[i];
        const T merged = static_cast<T>(to_acc(old) + d[i]);
        const T back = static_cast<T>(to_acc(merged) - d[i]);
        const int64_t corr = ord(old) - ord(back);
        if (corr >= -127 && corr <= 127) {
          res[i] = static_cast<int8_t>(corr);
        } else {
          res[i] = -128;
          overflow_offset[overflows] = base_offset + i;
          overflow_value[overflows] = old;
          ++overflows;
        }
        w[i] = merged;
      } else {
        const T back = static_cast<T>(to_acc(w[i]) - d[i]);
        w[i] = res[i] == -128 ? back : from_ord(ord(back) + res[i]);
      }
    }
    return overflows;
  }

  // acc[r][h] = sum_j b[r][j] * a[j][k + kVL h .. +kVL] from bf16 pairs (microkernels.h);
  // only bf16 in the AVX512BF16 build does anything here.
  template <int ROWS>
  C10_ALWAYS_INLINE static void pair_block(const uint32_t* a_pairs, const uint32_t* b_pairs, int64_t pair_rank,
                         int64_t in, int64_t k, Vec (&acc)[ROWS][2]) {
#if defined(__AVX512BF16__)
    if constexpr (kBf16Pairs) {
      __m512 s[ROWS][2];
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
      for (int64_t jp = 0; jp < pair_rank; ++jp) {
        const __m512bh a0 = (__m512bh)_mm512_loadu_si512(a_pairs + jp * in + k);
        const __m512bh a1 = (__m512bh)_mm512_loadu_si512(a_pairs + jp * in + k + kVL);
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
          const __m512bh bv =
              (__m512bh)_mm512_set1_epi32(static_cast<int>(b_pairs[r * pair_rank + jp]));
          s[r][0] = _mm512_dpbf16_ps(s[r][0], bv, a0);
          s[r][1] = _mm512_dpbf16_ps(s[r][1], bv, a1);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        acc[r][0] = Vec(s[r][0]);
        acc[r][1] = Vec(s[r][1]);
      }
    }
#endif
  }

  // The same in the accumulation type, for ncols (<= 2 kVL) columns. Both are inlined
  // so that acc stays in registers.
  template <int ROWS>
  C10_ALWAYS_INLINE static void fma_block(const Acc* a, const Acc* b, int64_t rank, int64_t in, int64_t k,
                        int64_t ncols, Vec (&acc)[ROWS][2]) {
    for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = Vec(Acc(0));
    if (ncols == 2 * kVL) {
      for (int64_t j = 0; j < rank; ++j) {
        const Vec a0 = Vec::loadu(a + j * in + k), a1 = Vec::loadu(a + j * in + k + kVL);
        for (int r = 0; r < ROWS; ++r) {
          const Vec bv(b[r * rank + j]);
          acc[r][0] = fmadd(bv, a0, acc[r][0]);
          acc[r][1] = fmadd(bv, a1, acc[r][1]);
        }
      }
      return;
    }
    const int64_t n0 = std::min<int64_t>(kVL, ncols), n1 = ncols - n0;
    for (int64_t j = 0; j < rank; ++j) {
      const Vec a0 = Vec::loadu(a + j * in + k, n0);
      const Vec a1 = n1 > 0 ? Vec::loadu(a + j * in + k + kVL, n1) : Vec(Acc(0));
      for (int r = 0; r < ROWS; ++r) {
        const Vec bv(b[r * rank + j]);
        acc[r][0] = fmadd(bv, a0, acc[r][0]);
        acc[r][1] = fmadd(bv, a1, acc[r][1]);
      }
    }
  }

  template <int ROWS>
  static int64_t merge_block(T* w, int64_t ldw, int8_t* residual, int64_t in, const Acc* a,
                             const Acc* b, int64_t rank, const uint32_t* a_pairs,
                             const uint32_t* b_pairs, Acc scale, MergeMode mode, int64_t row0,
                             int64_t* overflow_offset, T* overflow_value,
                             int64_t overflow_count) {
    const bool verify = mode == MergeMode::kExactVerify;
    constexpr int64_t kCols = 2 * kVL;
    const Vec vscale(scale);
    int64_t overflows = 0;
    alignas(64) Acc d[ROWS][kCols];
    for (int64_t k = 0; k < in; k += kCols) {
      const int64_t ncols = std::min<int64_t>(kCols, in - k);
      // The weight rows' lines a few blocks ahead: their DRAM latency hides behind this
      // block's FMAs (the hardware prefetcher alone left merge_ compute + memory).
      constexpr int64_t kAhead = 8 * kCols;
      if (k + kAhead < in) {
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) __builtin_prefetch(w + r * ldw + k + kAhead, 1, 0);
      }
      Vec acc[ROWS][2];
      if (kBf16Pairs && ncols == kCols && a_pairs != nullptr) {
        pair_block<ROWS>(a_pairs, b_pairs, (rank + 1) / 2, in, k, acc);
      } else {
        fma_block<ROWS>(a, b, rank, in, k, ncols, acc);
      }
      // Index acc with constants only (fully unrolled loops): a run-time index would make
      // GCC keep it in memory, storing it on every iteration of the loops above.
      if (mode == MergeMode::kAdd && ncols == kCols) {
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
          T* wr = w + r * ldw + k;
          Vec w0, w1;
          load2(wr, w0, w1);
          store2(wr, fmadd(acc[r][0], vscale, w0), fmadd(acc[r][1], vscale, w1));
        }
        continue;
      }
      // Tails and the exact modes go element by element through d.
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        (acc[r][0] * vscale).store(d[r]);
        (acc[r][1] * vscale).store(d[r] + kVL);
      }
      for (int r = 0; r < ROWS; ++r) {
        T* wr = w + r * ldw + k;
        if (mode == MergeMode::kAdd) {
          for (int64_t c = 0; c < ncols; ++c) wr[c] = static_cast<T>(to_acc(wr[c]) + d[r][c]);
        } else {
          // Verification reads the whole overflow list; the merge appends to its slice.
          overflows += apply_exact(wr, residual + r * in + k, d[r], ncols, mode,
                                   (row0 + r) * in + k,
                                   verify ? overflow_offset : overflow_offset + overflows,
                                   verify ? overflow_value : overflow_value + overflows,
                                   overflow_count);
        }
      }
    }
    return overflows;
  }

  static int64_t merge_tile(T* w, int64_t ldw, int8_t* residual, int64_t nrows, int64_t in,
                            const Acc* a, const Acc* b, int64_t rank, const uint32_t* a_pairs,
                            const uint32_t* b_pairs, Acc scale, MergeMode mode,
                            int64_t* overflow_offset, T* overflow_value,
                            int64_t overflow_count) {
    const bool verify = mode == MergeMode::kExactVerify;
    // Eight rows share each load of `a` with 32 vector registers (16 accumulators); six
    // with 16 (12 accumulators: four rows' 8 leave the two FMA pipes waiting on latency).
    // (Not the portable build: without FMA a product needs a register of its own, and
    // six rows spill there: 15% slower.)
    constexpr int kRows = kMaxRows == 2 && std::is_same_v<Acc, float> && !kPortable ? 6 : kMaxRows * 2;
    int64_t overflows = 0;
    int64_t r = 0;
    auto step = [&](auto rows_tag) {
      constexpr int R = decltype(rows_tag)::value;
      overflows += merge_block<R>(w + r * ldw, ldw, residual ? residual + r * in : nullptr, in,
                                  a, b + r * rank, rank, a_pairs,
                                  b_pairs ? b_pairs + r * ((rank + 1) / 2) : nullptr, scale, mode,
                                  r, verify ? overflow_offset : overflow_offset + overflows,
                                  verify ? overflow_value : overflow_value + overflows,
                                  overflow_count);
      r += R;
    };
    while (r + kRows <= nrows) step(std::integral_constant<int, kRows>{});
    if constexpr (kRows > 4) while (r + 4 <= nrows) step(std::integral_constant<int, 4>{});
    while (r + 2 <= nrows) step(std::integral_constant<int, 2>{});
    while (r < nrows) step(std::integral_constant<int, 1>{});
    return overflows;
  }

  // -------------------------------------------------------------------------
  // rank_outer: kOuterRows rows of rhs at a time across the whole column range
  // (sequential streams the prefetcher follows), partial sums kept in `out` between
  // chunks; per block of NV vectors of columns, the ranks JB at a time (JB * NV = 16
  // accumulators, JB broadcasts and NV loads per 16 FMAs; the block's rows stay in L1
  // across rank groups).

  static constexpr int64_t kOuterRows = 16;
  static constexpr int kOuterJB = 4, kOuterNV = 4;

  static void outer_rows(const Acc* lhs, int64_t rank, const T* rhs, int64_t ldr, int64_t t0,
                         int64_t tn, int64_t ncols, Acc* out, int64_t ldo) {
    constexpr int JB = kOuterJB, NV = kOuterNV;
    constexpr int64_t kCols = NV * kVL;
    const Acc* l = lhs + t0 * rank;
    for (int64_t c = 0; c < ncols; c += kCols) {
      const int64_t nc = std::min<int64_t>(kCols, ncols - c);
      for (int64_t j0 = 0; j0 < rank; j0 += JB) {
        const int64_t jn = std::min<int64_t>(JB, rank - j0);
        const bool whole = nc == kCols && jn == JB;
        alignas(64) Acc tile[JB][kCols];
        Vec acc[JB][NV];
        if (t0 == 0) {
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v] = Vec(Acc(0));
        } else if (whole) {
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v] = Vec::loadu(out + (j0 + jj) * ldo + c + v * kVL);
        } else {
          for (int jj = 0; jj < JB; ++jj) {
            std::fill(tile[jj], tile[jj] + kCols, Acc(0));
            if (jj < jn) std::copy(out + (j0 + jj) * ldo + c, out + (j0 + jj) * ldo + c + nc, tile[jj]);
          }
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v] = Vec::loadu(tile[jj] + v * kVL);
        }
        for (int64_t t = 0; t < tn; ++t) {
          const T* r = rhs + (t0 + t) * ldr + c;
          Vec xv[NV];
          if (nc == kCols) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) xv[v] = load(r + v * kVL);
          } else {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              const int64_t left = nc - v * kVL;
              xv[v] = left >= kVL ? load(r + v * kVL) : left > 0 ? load(r + v * kVL, left) : Vec(Acc(0));
            }
          }
          const Acc* lt = l + t * rank + j0;
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj) {
            // Past the rank, alias its last row: computed, never stored.
            const Vec b(lt[jj < jn ? jj : jn - 1]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v] = fmadd(b, xv[v], acc[jj][v]);
          }
        }
        if (whole) {
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v].store(out + (j0 + jj) * ldo + c + v * kVL);
        } else {
#pragma GCC unroll 4
          for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[jj][v].store(tile[jj] + v * kVL);
          for (int64_t jj = 0; jj < jn; ++jj) std::copy(tile[jj], tile[jj] + nc, out + (j0 + jj) * ldo + c);
        }
      }
    }
  }

  static void rank_outer(const Acc* lhs, int64_t rank, const T* rhs, int64_t ldr, int64_t rows,
                         int64_t ncols, Acc scale, Acc* out, int64_t ldo) {
    if (rows == 0)
      for (int64_t j = 0; j < rank; ++j) std::fill(out + j * ldo, out + j * ldo + ncols, Acc(0));
    // The first chunk starts from zero; later ones add to the partial sums in out.
    for (int64_t t0 = 0; t0 < rows; t0 += kOuterRows)
      outer_rows(lhs, rank, rhs, ldr, t0, std::min(kOuterRows, rows - t0), ncols, out, ldo);
    const Vec vscale(scale);
    for (int64_t j = 0; j < rank; ++j) {
      Acc* o = out + j * ldo;
      int64_t c = 0;
      for (; c + kVL <= ncols; c += kVL) (Vec::loadu(o + c) * vscale).store(o + c);
      for (; c < ncols; ++c) o[c] *= scale;
    }
  }

  static MicroKernels<T> table() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    constexpr bool panels = kHasPanels;
#else
    constexpr bool panels = false;
#endif
    MicroKernels<T> t{C10_STRINGIZE(CPU_CAPABILITY), kBf16Pairs, kOutBlock, &shrink,
                      &pack_bt, &expand, &expand_dot, &merge_tile, static_cast<int>(2 * kVL),
                      &rank_outer, &panel_bytes, nullptr, nullptr};
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (panels) {
      t.pack_at = &pack_at;
      t.shrink_panels = &shrink_panels;
    }
#endif
    return t;
  }
};

}  // namespace

template <typename T>
const MicroKernels<T>& kernels() {
  static const MicroKernels<T> table = Impl<T>::table();
  return table;
}

template const MicroKernels<double>& kernels<double>();
template const MicroKernels<float>& kernels<float>();
template const MicroKernels<c10::Half>& kernels<c10::Half>();
template const MicroKernels<c10::BFloat16>& kernels<c10::BFloat16>();

}  // namespace lora_ext::cpu::CPU_CAPABILITY
