// Raw-pointer inner loops of the CPU kernels. microkernels.cpp is compiled once
// per instruction set (DEFAULT, AVX2, AVX512) into namespaces of those names;
// micro_kernels<T>() picks the best one the running CPU supports. The callers
// (multi_lora.cpp, merge.cpp) own the parallel loops and the bookkeeping.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace lora_ext::cpu {

// How merge_tile treats each weight element w, given d = scale * (B @ A)[o, k].
enum class MergeMode : int {
  kAdd,           // w = round(w + d)      (merge_, and unmerge_ with a negated scale)
  kExactMerge,    // w = round(w + d), and residual/overflow record how to undo it
  kExactUnmerge,  // w = round(w - d) corrected by residual (overflow applied by caller)
  kExactVerify,   // writes nothing: counts elements that kExactUnmerge would not restore
                  // to a value whose merge gives w back (the weight changed since)
};

// Accumulation type: fp32 for float/half/bfloat16, fp64 for double (used by gradcheck).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Row padding of the rank-r intermediate that expand_dot relies on (>= any vector width).
constexpr int64_t kXaPad = 64;

template <typename T>
struct MicroKernels {
  using Acc = acc_t<T>;
  const char* isa;
  // merge_tile takes bf16 factors as pairs (a_pairs/b_pairs) and uses the CPU's bf16
  // dot-product instructions (twice the fp32 FMA rate; products of bf16 are exact in fp32).
  bool bf16_pairs;
  // Outputs per expand call; the packed B tile is [rank][out_block] accumulator values.
  int out_block;
  // xa_rows[i][j] = sum_k x_rows[i][k] * a[j * in + k]  for i < nrows, j < rank.
  void (*shrink)(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows, const T* a,
                 int64_t rank, int64_t in);
  // bt[j * out_block + o] = b[o * ldb + j] for o < nout, j < rank; zero for nout <= o < out_block.
  void (*pack_bt)(const T* b, int64_t ldb, int64_t nout, int64_t rank, Acc* bt);
  // y_rows[i][o] = base_rows[i][o] (0 when base_rows is null) +
  //                scale * sum_j xa_rows[i][j] * bt[j * out_block + o]   for o < nout.
  // y_rows[i] and base_rows[i] may be the same row.
  void (*expand)(const Acc* const* xa_rows, const T* const* base_rows, T* const* y_rows,
                 int64_t nrows, const Acc* bt, int64_t rank, int64_t nout, Acc scale);
  // The same result for few rows without packing: reads b[o * ldb + j] (o < nout, j < rank)
  // in place, and may read (and ignore) any of the b_readable elements from b;
  // y_rows[i] and base_rows[i] point at the first of the nout outputs. Each xa row must
  // be readable, and zero, from rank up to the next multiple of kXaPad.
  void (*expand_dot)(const Acc* const* xa_rows, const T* const* base_rows, T* const* y_rows,
                     int64_t nrows, const T* b, int64_t ldb, int64_t b_readable, int64_t rank,
                     int64_t nout, Acc scale);
  // Rows [0, nrows) of w (row stride in) get d[o][k] = scale * sum_j b[o * rank + j] * a[j * in + k]
  // applied as `mode` says. a, b are in Acc. In kExactMerge, elements whose correction does
  // not fit in int8 get residual -128 and their flat offset from `w` and original value
  // written to overflow_offset/overflow_value (room for nrows * in); returns their count.
  // With bf16_pairs, a_pairs [ceil(rank/2)][in] and b_pairs [nrows][ceil(rank/2)] hold
  // the same factors as bf16 pairs along the rank (low half: the even rank index; an odd
  // rank is padded with a zero); otherwise both are null.
  // Weight rows are ldw apart (>= in); residual rows are in apart. Returns the number of
  // overflow elements (kExactMerge: their flat offsets row * in + col and original
  // values are written to overflow_offset/overflow_value) or, for kExactVerify, of
  // mismatching elements (overflow_offset/overflow_value then hold the merge's overflow
  // list, overflow_count entries sorted by offset, read only).
  int64_t (*merge_tile)(T* w, int64_t ldw, int8_t* residual, int64_t nrows, int64_t in,
                        const Acc* a, const Acc* b, int64_t rank, const uint32_t* a_pairs,
                        const uint32_t* b_pairs, Acc scale, MergeMode mode,
                        int64_t* overflow_offset, T* overflow_value, int64_t overflow_count);
  // Column granularity for splitting rank_outer's columns between threads.
  int outer_cols;
  // out[j * ldo + c] = scale * sum_t lhs[t * rank + j] * rhs[t * ldr + c]  for j < rank,
  // c < ncols, t < rows: a rank-r weight gradient (lhs is the fp32 [T, r]
  // intermediate), fp32 accumulation over all rows.
  void (*rank_outer)(const Acc* lhs, int64_t rank, const T* rhs, int64_t ldr, int64_t rows,
                     int64_t ncols, Acc scale, Acc* out, int64_t ldo);
  // The packed shrink for prefill-sized groups. panel_bytes(rank, in): the size of A
  // packed by pack_at, 0 when this build has no packed shrink for T or for this shape
  // (pack_at and shrink_panels are null where it never has one). shrink_panels
  // computes what shrink does from the packed A, and writes each xa row up to the
  // next multiple of 4 or 8 ranks (zeros past the rank).
  int64_t (*panel_bytes)(int64_t rank, int64_t in);
  void (*pack_at)(const T* a, int64_t rank, int64_t in, void* at);
  void (*shrink_panels)(const T* const* x_rows, Acc* const* xa_rows, int64_t nrows,
                        const void* at, int64_t rank, int64_t in);
};

template <typename T>
const MicroKernels<T>& micro_kernels();

#define LORA_EXT_DECLARE_ISA(ISA)                                  \
  namespace ISA {                                                  \
  template <typename T>                                            \
  const MicroKernels<T>& kernels();                                \
  }
LORA_EXT_DECLARE_ISA(DEFAULT)
LORA_EXT_DECLARE_ISA(AVX2)
LORA_EXT_DECLARE_ISA(AVX512)
LORA_EXT_DECLARE_ISA(AVX512BF16)
#undef LORA_EXT_DECLARE_ISA

}  // namespace lora_ext::cpu
