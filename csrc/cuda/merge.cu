// CUDA merge_/unmerge_ and their bit-exact variants: one pass over weight, each block
// computing its tile of scale * B @ A in fp32 (tiled_gemm_kernel) and applying it to
// the weight tile it loaded before the arithmetic.
//
// Exact round trip (same algorithm as csrc/cpu/merge.cpp): with d = scale * (B @ A),
// merge stores w' = round(w + d) and the int8 c = ord(w) - ord(round(w' - d)); unmerge
// recomputes the same d and sets ord(round(w' - d)) + c. d, w' and w' - d are formed
// with explicitly rounded fp32 operations (no contraction into fma) by one shared
// code path, so merge and unmerge see the same bits. Elements with |c| > 127 get
// c = -128 and are returned as (flat index, original value). Unmerge first verifies,
// writing nothing, that redoing the merge from the restored values gives the weight back.
#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"

#include <torch/library.h>

namespace lora_ext::cuda {
namespace {

enum class Mode : int {
  kAdd,           // w = round(w + scale * (B @ A))         (merge_; unmerge_ negates scale)
  kExactResidual, // residual = correction only, weight untouched
  kExactMerge,    // w = w' (the same w' kExactResidual used)
  kExactUnmerge,  // w = from_ord(ord(round(w - d)) + residual)
  kExactVerify,   // writes nothing: counts elements kExactUnmerge would not restore to a
                  // value whose merge gives w back (the weight changed since the merge)
};

template <typename T, Mode kMode>
struct MergeProblem {
  T* w;        // [out, in], rows ldw apart
  const T* a;  // [r, in]
  const T* b;  // [out, r]
  int8_t* residual;  // [out, in], contiguous
  int64_t out, in, r, n_tiles;
  acc_t<T> scale;
  int64_t ldw;
  // kExactVerify: the merge's overflow list (flat offsets row * in + col, sorted) and
  // the count of mismatching elements.
  const int64_t* overflow_index;
  const T* overflow_values;
  int64_t overflow_count;
  unsigned long long* mismatches;

  static constexpr bool kPKContig = true, kQKContig = false, kReadsOut = true;
  using Acc = acc_t<T>;
  using Old = T;
  struct Tile {
    int64_t K, m0, n0;
    int M, N;
  };

  __device__ bool setup(int64_t blk, int BM, int BN, Tile& t) const {
    t.m0 = (blk / n_tiles) * BM;
    t.n0 = (blk % n_tiles) * BN;
    if (t.m0 >= out) return false;
    t.M = static_cast<int>(min(static_cast<int64_t>(BM), out - t.m0));
    t.N = static_cast<int>(min(static_cast<int64_t>(BN), in - t.n0));
    t.K = r;
    return true;
  }
  __device__ Acc p(const Tile& t, int m, int64_t k) const { return to_acc(b[(t.m0 + m) * r + k]); }
  __device__ Acc q(const Tile& t, int64_t k, int n) const { return to_acc(a[k * in + t.n0 + n]); }
  __device__ T load_out(const Tile& t, int m, int n) const { return w[(t.m0 + m) * ldw + t.n0 + n]; }

  __device__ void store(const Tile& t, int m, int n, Acc acc, T old) const {
    const int64_t woff = (t.m0 + m) * ldw + t.n0 + n;
    const int64_t off = (t.m0 + m) * in + t.n0 + n;  // residual / logical flat offset
    if constexpr (kMode == Mode::kAdd) {
      w[woff] = from_acc<T>(fma_acc(acc, scale, to_acc(old)));
    } else {
      const Acc d = mul_rn(acc, scale);
      if constexpr (kMode == Mode::kExactVerify) {
        // Undo, then redo the merge: only the weight merge_exact_ left gives itself back.
        const T back = from_acc<T>(sub_rn(to_acc(old), d));
        const int8_t c = residual[off];
        T original = Bits<T>::from_ord(Bits<T>::ord(back) + c);
        if (c == -128) {
          int64_t lo = 0, hi = overflow_count;  // binary search for off
          while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (overflow_index[mid] < off) lo = mid + 1; else hi = mid;
          }
          if (lo == overflow_count || overflow_index[lo] != off) {
            atomicAdd(mismatches, 1ull);
            return;
          }
          original = overflow_values[lo];
        }
        if (Bits<T>::ord(from_acc<T>(add_rn(to_acc(original), d))) != Bits<T>::ord(old)) {
          atomicAdd(mismatches, 1ull);
        }
      } else if constexpr (kMode == Mode::kExactUnmerge) {
        const T back = from_acc<T>(sub_rn(to_acc(old), d));
        const int8_t c = residual[off];
        w[woff] = c == -128 ? back : Bits<T>::from_ord(Bits<T>::ord(back) + c);
      } else {
        const T merged = from_acc<T>(add_rn(to_acc(old), d));
        if constexpr (kMode == Mode::kExactMerge) {
          w[woff] = merged;
        } else {
          const T back = from_acc<T>(sub_rn(to_acc(merged), d));
          const int64_t c = Bits<T>::ord(old) - Bits<T>::ord(back);
          residual[off] = (c >= -127 && c <= 127) ? static_cast<int8_t>(c) : int8_t(-128);
        }
      }
    }
  }
};

// Rows of 128 consecutive columns per warp: coalesced weight traffic.
using MergeShape = TileShape<32, 128, 16, 4, 4>;

// kExactVerify: `overflow` is the merge's (sorted index, values) list; returns the
// number of mismatching elements (a host sync). Other modes return 0.
template <Mode kMode>
int64_t merge_pass(at::Tensor& weight, const at::Tensor& lora_a_in, const at::Tensor& lora_b_in,
                   double scale, int8_t* residual,
                   const std::tuple<at::Tensor, at::Tensor>* overflow = nullptr) {
  const int64_t out = weight.size(0), in = weight.size(1), r = lora_a_in.size(0);
  if (out == 0 || in == 0) return 0;
  const at::Tensor a = lora_a_in.contiguous(), b = lora_b_in.contiguous();
  const int64_t n_tiles = ceil_div(in, MergeShape::kBN);
  const int64_t ldw = out > 1 ? weight.stride(0) : in;
  at::Tensor counter, ov_index, ov_values;
  if constexpr (kMode == Mode::kExactVerify) {
    counter = at::zeros({1}, weight.options().dtype(at::kLong));
    ov_index = std::get<0>(*overflow).contiguous();
    ov_values = std::get<1>(*overflow).contiguous();
  }
  LORA_EXT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "merge_", [&] {
    const bool verify = kMode == Mode::kExactVerify;
    const MergeProblem<scalar_t, kMode> prob{
        verify ? const_cast<scalar_t*>(weight.const_data_ptr<scalar_t>())
               : weight.mutable_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(),
        residual,
        out,
        in,
        r,
        n_tiles,
        static_cast<acc_t<scalar_t>>(scale),
        ldw,
        verify ? ov_index.const_data_ptr<int64_t>() : nullptr,
        verify ? ov_values.const_data_ptr<scalar_t>() : nullptr,
        verify ? ov_index.numel() : 0,
        verify ? reinterpret_cast<unsigned long long*>(counter.mutable_data_ptr<int64_t>())
               : nullptr};
    launch_tiled<MergeShape>(prob, ceil_div(out, MergeShape::kBM) * n_tiles);
  });
  return kMode == Mode::kExactVerify ? counter.item<int64_t>() : 0;
}

// weight.flatten()[index] for a weight whose rows may be strided.
at::Tensor gather_flat(const at::Tensor& weight, const at::Tensor& index) {
  if (weight.is_contiguous()) return weight.view({-1}).index_select(0, index);
  const int64_t in = weight.size(1);
  return weight.index({index.div(in, "floor"), index.remainder(in)});
}

}  // namespace

void merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
            double scale) {
  check_merge_args(weight, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(weight.device());
  merge_pass<Mode::kAdd>(weight, lora_a, lora_b, scale, nullptr);
}

void unmerge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
              double scale) {
  check_merge_args(weight, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(weight.device());
  merge_pass<Mode::kAdd>(weight, lora_a, lora_b, -scale, nullptr);
}

std::tuple<at::Tensor, at::Tensor> merge_exact_(at::Tensor& weight, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, double scale,
                                                at::Tensor& residual) {
  check_merge_args(weight, lora_a, lora_b);
  check_merge_residual(weight, residual);
  const c10::cuda::CUDAGuard guard(weight.device());
  // Pass 1 writes the corrections; the overflowing elements' original values are
  // gathered before pass 2 overwrites them (nonzero returns them sorted by index).
  merge_pass<Mode::kExactResidual>(weight, lora_a, lora_b, scale,
                                   residual.mutable_data_ptr<int8_t>());
  const at::Tensor index = at::nonzero(residual.view({-1}).eq(-128)).view({-1});
  const at::Tensor values = gather_flat(weight, index);
  merge_pass<Mode::kExactMerge>(weight, lora_a, lora_b, scale, nullptr);
  return {index, values};
}

void unmerge_exact_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scale, const at::Tensor& residual, const at::Tensor& overflow_index,
                    const at::Tensor& overflow_values) {
  check_unmerge_exact_args(weight, lora_a, lora_b, residual, overflow_index, overflow_values);
  const c10::cuda::CUDAGuard guard(weight.device());
  int8_t* res = const_cast<int8_t*>(residual.const_data_ptr<int8_t>());
  // Before writing anything: every element must still be what the merge produced.
  const auto [sorted_index, order] = overflow_index.sort();
  const std::tuple<at::Tensor, at::Tensor> overflow{sorted_index, overflow_values.index_select(0, order)};
  const int64_t mismatches =
      merge_pass<Mode::kExactVerify>(weight, lora_a, lora_b, scale, res, &overflow);
  TORCH_CHECK(mismatches == 0, "unmerge_exact_: ", mismatches, " of ", weight.numel(),
              " weight elements are not what merge_exact_ produced with these lora_a, lora_b, "
              "scale and residual (the weight, the factors or the residual changed since the "
              "merge, or it was made on another device or kernel variant); weight is unchanged");
  merge_pass<Mode::kExactUnmerge>(weight, lora_a, lora_b, scale, res);
  restore_overflow(weight, overflow_index, overflow_values);
}

// One variant for every GPU: the same tiles and explicitly rounded fp32 operations.
std::string merge_variant(const at::Tensor& weight) { return "cuda"; }

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("merge_", &merge_);
  m.impl("unmerge_", &unmerge_);
  m.impl("merge_exact_", &merge_exact_);
  m.impl("unmerge_exact_", &unmerge_exact_);
  m.impl("merge_variant", &merge_variant);
}

}  // namespace lora_ext::cuda
