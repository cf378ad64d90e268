// CPU lora_linear: the base GEMM through ATen, then the LoRA path fused into its
// output in one pass (fp32 [T, r] intermediate, B @ A never formed).
#include "cpu/lora_rows.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace lora_ext::cpu {

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a_in,
                       const at::Tensor& lora_b_in, double scale) {
  check_lora_linear_args(x, weight, bias, lora_a_in, lora_b_in);
  const int64_t in = weight.size(1), out = weight.size(0), rank = lora_a_in.size(0);
  const at::Tensor x2 = x.reshape({-1, in}).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  y = y.contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  const int64_t rank_of = rank;
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_linear", [&] {
    const acc_t<scalar_t> scale_acc = static_cast<acc_t<scalar_t>>(scale);
    const RowsProblem<scalar_t> p{x2.const_data_ptr<scalar_t>(),
                                  in,
                                  lora_a.const_data_ptr<scalar_t>(),
                                  0,
                                  lora_b.const_data_ptr<scalar_t>(),
                                  0,
                                  rank,
                                  out,
                                  &scale_acc,
                                  &rank_of,
                                  y.const_data_ptr<scalar_t>(),
                                  y.mutable_data_ptr<scalar_t>(),
                                  out};
    lora_rows_forward(p, single_group(x2.size(0)));
  });
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  return y.view(out_shape);
}

GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scale,
                                std::array<bool, 5> output_mask) {
  check_lora_linear_backward_args(grad_out, x, weight, lora_a, lora_b);
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor empty = x.new_empty({0});
  // g @ B is shared by grad_x and grad_a.
  const at::Tensor gb = (need_x || need_a) ? at::mm(g, lora_b) : empty;  // [T, r]
  at::Tensor grad_x = empty, grad_w = empty, grad_bias = empty, grad_a = empty, grad_b = empty;
  if (need_x) grad_x = at::mm(g, weight).addmm_(gb, lora_a, 1.0, scale).view(x.sizes());
  if (need_w) grad_w = at::mm(g.t(), x2);
  if (need_bias) grad_bias = g.sum(0);
  if (need_a) grad_a = at::mm(gb.t(), x2).mul_(scale);
  if (need_b) grad_b = at::mm(g.t(), at::mm(x2, lora_a.t())).mul_(scale);
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

}  // namespace lora_ext::cpu
