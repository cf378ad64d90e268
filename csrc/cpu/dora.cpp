// CPU kernels of DoRA (weight-decomposed LoRA):
// - dora_weight_norm: ||W[o] + scale * B[o] @ A|| per output row in one pass over W,
//   the rank-r update of each tile of W formed on the fly in a cache-sized buffer with
//   the expand micro-kernel (B @ A is never formed whole);
// - multi_dora_add_: multi_lora_add_ followed, row by row, by DoRA's epilogue
//   y = row_scale[i] * (W x + update) + bias.
#include "cpu/microkernels.h"
#include "cpu/parallel.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lora_ext::cpu {
namespace {

// Rows of W per task; each task walks its rows' columns in blocks of the micro-kernel's width.
constexpr int64_t kNormRows = 16;

template <typename T>
void weight_norm_kernel(const at::Tensor& weight, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, double scale, at::Tensor& norm) {
  using Acc = acc_t<T>;
  const MicroKernels<T>& mk = micro_kernels<T>();
  const int64_t out = weight.size(0), in = weight.size(1), rank = lora_a.size(0);
  const int64_t ldw = out > 1 ? weight.stride(0) : in;
  const int64_t ob = mk.out_block, num_blocks = (in + ob - 1) / ob;
  // A as expand's packed operand: per column block, [rank][ob] in Acc, zero padded.
  std::vector<Acc> a_packed(num_blocks * rank * ob, Acc(0));
  const T* a = lora_a.const_data_ptr<T>();
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t k0 = blk * ob, nk = std::min(ob, in - k0);
    for (int64_t j = 0; j < rank; ++j)
      for (int64_t k = 0; k < nk; ++k)
        a_packed[(blk * rank + j) * ob + k] = static_cast<Acc>(a[j * in + k0 + k]);
  }
  // B rows in Acc, each padded to kXaPad (what the micro-kernels may read).
  const int64_t b_ld = (rank + kXaPad - 1) / kXaPad * kXaPad;
  std::vector<Acc> b_acc(out * b_ld, Acc(0));
  const T* b = lora_b.const_data_ptr<T>();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t j = 0; j < rank; ++j) b_acc[o * b_ld + j] = static_cast<Acc>(b[o * rank + j]);

  const T* w = weight.const_data_ptr<T>();
  Acc* result = norm.mutable_data_ptr<Acc>();
  const int64_t num_tasks = (out + kNormRows - 1) / kNormRows;
  at::parallel_for(0, num_tasks, grain_for(num_tasks, num_tasks * kNormRows * in * rank),
                   [&](int64_t lo, int64_t hi) {
    // The merged tile W + scale * B A, rounded to T as a merged weight would be.
    std::vector<T> tile(kNormRows * ob);
    const Acc* b_rows[kNormRows];
    const T* w_rows[kNormRows];
    T* tile_rows[kNormRows];
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t o0 = task * kNormRows, n = std::min(kNormRows, out - o0);
      Acc sums[kNormRows] = {};
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t k0 = blk * ob, nk = std::min(ob, in - k0);
        for (int64_t i = 0; i < n; ++i) {
          b_rows[i] = b_acc.data() + (o0 + i) * b_ld;
          w_rows[i] = w + (o0 + i) * ldw + k0;
          tile_rows[i] = tile.data() + i * ob;
        }
        mk.expand(b_rows, w_rows, tile_rows, n, a_packed.data() + blk * rank * ob, rank, nk,
                  static_cast<Acc>(scale));
        for (int64_t i = 0; i < n; ++i) {
          Acc s = 0;
          const T* v = tile_rows[i];
          for (int64_t k = 0; k < nk; ++k) {
            const Acc e = static_cast<Acc>(v[k]);
            s += e * e;
          }
          sums[i] += s;
        }
      }
      for (int64_t i = 0; i < n; ++i) result[o0 + i] = std::sqrt(sums[i]);
    }
  });
}

}  // namespace

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale) {
  check_dora_weight_norm_args(weight, lora_a, lora_b);
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor norm = at::empty({weight.size(0)}, weight.options().dtype(acc));
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  LORA_EXT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dora_weight_norm", [&] {
    weight_norm_kernel<scalar_t>(weight, a, b, scale, norm);
  });
  return norm;
}

void multi_dora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,
                     const at::Tensor& b_stack, const at::Tensor& indices,
                     const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                     const at::Tensor& row_scale, const std::optional<at::Tensor>& bias) {
  check_multi_dora_add_args(y, x, a_stack, b_stack, indices, scales, ranks, row_scale, bias);
  // Validates indices and ranks before writing y: an error leaves y unchanged.
  multi_lora_add_(y, x, a_stack, b_stack, indices, scales, ranks);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor g = row_scale.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t rows = y.size(0), out = y.size(1), ldy = rows > 1 ? y.stride(0) : out;
  LORA_EXT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "multi_dora_add_", [&] {
    using Acc = acc_t<scalar_t>;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const Acc* gp = g.const_data_ptr<Acc>();
    const scalar_t* bp = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    at::parallel_for(0, rows, grain_for(rows, rows * out), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        scalar_t* row = yp + t * ldy;
        const Acc* gs = ip[t] >= 0 ? gp + ip[t] * out : nullptr;  // -1: the base row, g = 1
        if (gs == nullptr && bp == nullptr) continue;
        for (int64_t o = 0; o < out; ++o) {
          Acc v = static_cast<Acc>(row[o]);
          if (gs != nullptr) v *= gs[o];
          if (bp != nullptr) v += static_cast<Acc>(bp[o]);
          row[o] = static_cast<scalar_t>(v);
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_weight_norm", &dora_weight_norm);
  m.impl("multi_dora_add_", &multi_dora_add_);
}

}  // namespace lora_ext::cpu
