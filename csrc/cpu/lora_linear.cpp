// CPU lora_linear. Forward: the base layer's output by ATen (at::linear, the call
// F.linear makes), then the LoRA update added in place (scale * B @ (A @ x), fp32 [T, r]
// intermediate, B @ A never formed, rounded once), as multi_lora_add_ does when serving.
// The intermediate is returned for the backward.
// Backward: grad_x = scale * (g @ B) @ A (the same row kernels), then += g @ W, with g @ B
// kept in fp32 and reused for grad_a; grad_b from the saved intermediate; both weight
// gradients by rank_outer, one pass over x or g each, rows summed in order.
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

// y = (accumulate ? y : 0) + scale * (x @ a^T) @ b^T over every row of x, rounded once,
// with the [T, r] intermediate written to xa (acc dtype, contiguous). a: [r, in], b:
// [out, r], both contiguous; y: [T, out] contiguous, or empty: xa only.
void rank_update(const at::Tensor& x2, const at::Tensor& a, const at::Tensor& b, double scale,
                 bool accumulate, const at::Tensor& y, const at::Tensor& xa) {
  const int64_t in = x2.size(1), out = b.size(0), rank = a.size(0);
  LORA_EXT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "lora_linear", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc scale_acc = static_cast<Acc>(scale);
    scalar_t* y_ptr = y.numel() > 0 ? y.mutable_data_ptr<scalar_t>() : nullptr;
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
                            accumulate ? y_ptr : nullptr,
                            y_ptr,
                            out};
    p.xa_out = xa.mutable_data_ptr<Acc>();
    lora_rows_forward(p, single_group(x2.size(0)));
  });
}

// Rows of x ([..., in]): the product of its leading sizes (reshape(-1, n) cannot tell
// when a size is 0).
int64_t leading_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& lora_a_in,
                                               const at::Tensor& lora_b_in, double scale) {
  check_lora_linear_args(x, weight, bias, lora_a_in, lora_b_in);
  const int64_t in = weight.size(1), out = weight.size(0), rank = lora_a_in.size(0);
  const int64_t rows = leading_rows(x);
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  // The base layer's output first, by the very call F.linear makes, then the update added
  // in place and rounded once: what multi_lora_add_ does to the base layer's output when
  // serving, so the training and the serving path give the same bits (LoRALinear in train
  // and in eval mode). The output's traffic is the same as adding the base onto the update.
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  at::Tensor y2 = y.view({rows, out});
  at::Tensor xa = at::empty({rows, rank}, x.options().dtype(acc_dtype(x.scalar_type())));
  rank_update(x2, lora_a_in.contiguous(), lora_b_in.contiguous(), scale, /*accumulate=*/true, y2, xa);
  auto xa_shape = x.sizes().vec();
  xa_shape.back() = rank;
  return {y, xa.view(xa_shape)};
}

GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                std::array<bool, 5> output_mask) {
  check_lora_linear_backward_args(grad_out, x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type(), acc = acc_dtype(dtype);
  const int64_t in = weight.size(1), out = weight.size(0), rank = lora_a.size(0);
  const int64_t rows = leading_rows(x);
  const at::Tensor g = grad_out.reshape({rows, out}).contiguous();
  const at::Tensor x2 = x.reshape({rows, in});
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
    rank_update(g, lora_b.t().contiguous(), lora_a.t().contiguous(), scale, /*accumulate=*/false, gx, gb);
    gx.addmm_(g, weight);
    grad_x = gx.view(x.sizes());
  } else if (need_a) {
    gb = at::empty({rows, rank}, x.options().dtype(acc));
    rank_update(g, lora_b.t().contiguous(), lora_a.t().contiguous(), scale, false, empty, gb);
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
