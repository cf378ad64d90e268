// CPU lora_linear. Forward: the LoRA update (bias + scale * B @ (A @ x), fp32 [T, r]
// intermediate, B @ A never formed) is written into a fresh output, then the base GEMM
// accumulates onto it (ATen's addmm_, beta = 1), so the output is written once by the
// update and read once inside the GEMM. The intermediate is returned for the backward.
// Backward: grad_x the same way (scale * (g @ B) @ A, then += g @ W), with g @ B kept
// in fp32 and reused for grad_a; grad_b from the saved intermediate; both weight
// gradients by rank_outer, one pass over x or g each.
#include "cpu/lora_rows.h"
#include "cpu/microkernels.h"
#include "cpu/parallel.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lora_ext::cpu {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// y = [base row] + scale * (x @ a^T) @ b^T over every row of x, with the [T, r]
// intermediate written to xa (acc dtype, contiguous). a: [r, in], b: [out, r], both
// contiguous; base: null, or one row broadcast (a bias).
void rank_update(const at::Tensor& x2, const at::Tensor& a, const at::Tensor& b,
                 const std::optional<at::Tensor>& bias_row, double scale, at::Tensor& y,
                 at::Tensor& xa) {
  const int64_t in = x2.size(1), out = b.size(0), rank = a.size(0);
  LORA_EXT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "lora_linear", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc scale_acc = static_cast<Acc>(scale);
    RowsProblem<scalar_t> p{x2.const_data_ptr<scalar_t>(),
                            in,
                            a.const_data_ptr<scalar_t>(),
                            0,
                            b.const_data_ptr<scalar_t>(),
                            0,
                            rank,
                            out,
                            &scale_acc,
                            &rank,
                            bias_row ? bias_row->const_data_ptr<scalar_t>() : nullptr,
                            y.mutable_data_ptr<scalar_t>(),
                            out};
    p.base_ld = 0;
    p.xa_out = xa.mutable_data_ptr<Acc>();
    lora_rows_forward(p, single_group(x2.size(0)));
  });
}

// scale * lhs^T @ rhs as [r, n] in the acc dtype: a rank-r weight gradient in one pass
// over rhs (ATen's GEMM runs these 16-wide shapes at a third of its rate). lhs: [T, r]
// acc dtype, contiguous; rhs: [T, n] contiguous.
at::Tensor rank_outer(const at::Tensor& lhs, const at::Tensor& rhs, double scale) {
  const int64_t rows = rhs.size(0), n = rhs.size(1), rank = lhs.size(1);
  at::Tensor out = at::empty({rank, n}, lhs.options());
  LORA_EXT_DISPATCH_FLOATING_TYPES(rhs.scalar_type(), "lora_linear_backward", [&] {
    using Acc = acc_t<scalar_t>;
    const MicroKernels<scalar_t>& mk = micro_kernels<scalar_t>();
    const int64_t cols = mk.outer_cols, blocks = (n + cols - 1) / cols;
    const Acc* l = lhs.const_data_ptr<Acc>();
    const scalar_t* r = rhs.const_data_ptr<scalar_t>();
    Acc* o = out.mutable_data_ptr<Acc>();
    // One call per task: each thread streams its column range of every row once.
    at::parallel_for(0, blocks, grain_for(blocks, rows * rank * n), [&](int64_t lo, int64_t hi) {
      const int64_t c0 = lo * cols, c1 = std::min(hi * cols, n);
      mk.rank_outer(l, rank, r + c0, n, rows, c1 - c0, static_cast<Acc>(scale), o + c0, n);
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& lora_a_in,
                                               const at::Tensor& lora_b_in, double scale) {
  check_lora_linear_args(x, weight, bias, lora_a_in, lora_b_in);
  const int64_t in = weight.size(1), out = weight.size(0), rank = lora_a_in.size(0);
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  std::optional<at::Tensor> bias_row;
  if (bias.has_value() && bias->defined()) bias_row = bias->contiguous();
  at::Tensor y = at::empty({x2.size(0), out}, x.options());
  at::Tensor xa = at::empty({x2.size(0), rank}, x.options().dtype(acc_dtype(x.scalar_type())));
  rank_update(x2, lora_a_in.contiguous(), lora_b_in.contiguous(), bias_row, scale, y, xa);
  y.addmm_(x2, weight.t());
  auto shape = x.sizes().vec();
  shape.back() = out;
  auto xa_shape = x.sizes().vec();
  xa_shape.back() = rank;
  return {y.view(shape), xa.view(xa_shape)};
}

GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                std::array<bool, 5> output_mask) {
  check_lora_linear_backward_args(grad_out, x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type(), acc = acc_dtype(dtype);
  const int64_t in = weight.size(1), out = weight.size(0), rank = lora_a.size(0);
  const at::Tensor g = grad_out.reshape({-1, out}).contiguous();
  const at::Tensor x2 = x.reshape({-1, in});
  const int64_t rows = g.size(0);
  TORCH_CHECK(xa.scalar_type() == acc && xa.numel() == rows * rank && xa.size(-1) == rank,
              "lora_linear_backward: xa must be lora_linear's second output (", rows, " x ",
              rank, " in ", acc, "), got shape ", xa.sizes(), " and dtype ", xa.scalar_type());
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const at::Tensor empty = x.new_empty({0});
  at::Tensor grad_x = empty, grad_w = empty, grad_bias = empty, grad_a = empty, grad_b = empty;
  // g @ B in fp32, shared by grad_x and grad_a.
  at::Tensor gb;
  if (need_x) {
    // grad_x = scale * (g @ B) @ A (our kernel, which also hands back g @ B), then
    // += g @ W inside the GEMM.
    gb = at::empty({rows, rank}, x.options().dtype(acc));
    at::Tensor gx = at::empty({rows, in}, x.options());
    rank_update(g, lora_b.t().contiguous(), lora_a.t().contiguous(), std::nullopt, scale, gx, gb);
    gx.addmm_(g, weight);
    grad_x = gx.view(x.sizes());
  } else if (need_a) {
    gb = at::mm(g.to(acc), lora_b.to(acc));
  }
  if (need_w) grad_w = at::mm(g.t(), x2);
  if (need_bias) grad_bias = g.sum(0);
  // fp32 accumulation, one rounding each.
  if (need_a) grad_a = rank_outer(gb, x2.contiguous(), scale).to(dtype);
  if (need_b) {
    const at::Tensor gbt = rank_outer(xa.reshape({rows, rank}).contiguous(), g, scale);  // [r, out]
    grad_b = at::empty({out, rank}, x.options()).copy_(gbt.t());
  }
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

}  // namespace lora_ext::cpu
