// CUDA lora_linear. The rank-r products are fp32 (cuBLAS with an fp32 output), the
// expand kernel writes bias + scale * h @ B^T straight into the output, and the base
// GEMM then accumulates onto it (cuBLAS beta = 1), so the output is written by the
// expand and read once more only inside the GEMM epilogue.
#include "cuda/rows.cuh"
#include "dispatch.h"
#include "ops.h"

#include <torch/library.h>
#include <torch/version.h>

namespace lora_ext::cuda {
namespace {

// a @ b accumulated and returned in acc_t (cuBLAS; fp16/bf16 inputs give fp32).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = acc_dtype(a.scalar_type());
  if (a.scalar_type() == acc) return at::mm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(a, b, acc);  // aten::mm.dtype: low-precision inputs, fp32 output
#else
  return at::mm(a.to(acc), b.to(acc));
#endif
}

// y[t, o] (+)= [bias[o]] + scale * sum_k h[t, k] * q[k, o], with q given by strides.
template <bool Accumulate>
void expand_into(const at::Tensor& h, const at::Tensor& q, int64_t q_sn, int64_t q_sk,
                 const std::optional<at::Tensor>& bias, double scale, at::Tensor& y) {
  const int64_t T = y.size(0), N = y.size(1), r = h.size(1);
  const RowGroups rows{nullptr, nullptr, nullptr, T};
  LORA_EXT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "lora_linear", [&] {
    const scalar_t* bias_ptr =
        (!Accumulate && bias.has_value() && bias->defined()) ? bias->const_data_ptr<scalar_t>()
                                                             : nullptr;
    const AdapterOperand<scalar_t> qop{q.const_data_ptr<scalar_t>(), 0, q_sn, q_sk};
    using Acc = acc_t<scalar_t>;
    if (q_sk == 1) {
      launch_expand<scalar_t, true, Accumulate>(rows, T, 1, h.const_data_ptr<Acc>(), r, qop,
                                                nullptr, static_cast<int>(r), N,
                                                y.mutable_data_ptr<scalar_t>(), N, bias_ptr,
                                                static_cast<Acc>(scale));
    } else {
      launch_expand<scalar_t, false, Accumulate>(rows, T, 1, h.const_data_ptr<Acc>(), r, qop,
                                                 nullptr, static_cast<int>(r), N,
                                                 y.mutable_data_ptr<scalar_t>(), N, bias_ptr,
                                                 static_cast<Acc>(scale));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias_in,
                                               const at::Tensor& lora_a_in,
                                               const at::Tensor& lora_b_in, double scale) {
  check_lora_linear_args(x, weight, bias_in, lora_a_in, lora_b_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;

  const at::Tensor h = mm_acc(x2, lora_a.t()).contiguous();  // [T, r] in acc_t
  at::Tensor y = at::empty({x2.size(0), out}, x.options());
  expand_into<false>(h, lora_b, /*q_sn=*/lora_b.size(1), /*q_sk=*/1, bias, scale, y);
  y.addmm_(x2, weight.t());
  auto h_shape = x.sizes().vec();
  h_shape.back() = lora_a.size(0);
  return {y.view(out_shape), h.view(h_shape)};  // h is what the backward needs for grad_b
}

GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_a_in,
                                const at::Tensor& lora_b_in, const at::Tensor& xa,
                                double scale, std::array<bool, 5> output_mask) {
  check_lora_linear_backward_args(grad_out, x, weight, lora_a_in, lora_b_in);
  TORCH_CHECK(xa.device() == x.device() && xa.scalar_type() == acc_dtype(x.scalar_type()) &&
                  xa.size(-1) == lora_a_in.size(0) &&
                  xa.numel() == grad_out.numel() / weight.size(0) * lora_a_in.size(0),
              "lora_linear_backward: xa must be lora_linear's second output ([..., r] in ",
              acc_dtype(x.scalar_type()), " on ", x.device(), "), got shape ", xa.sizes(),
              ", dtype ", xa.scalar_type(), " on ", xa.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g = grad_out.reshape({-1, out});
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  const at::Tensor empty = x.new_empty({0});
  const auto dtype = x.scalar_type();
  // g @ B in acc_t [T, r], shared by grad_x and grad_a.
  const at::Tensor gb = (need_x || need_a) ? mm_acc(g, lora_b).contiguous() : empty;
  at::Tensor grad_x = empty, grad_w = empty, grad_bias = empty, grad_a = empty, grad_b = empty;
  if (need_x) {
    at::Tensor gx = at::mm(g, weight).contiguous();  // [T, in]
    // gx[t, j] += scale * sum_k gb[t, k] * A[k, j]
    expand_into<true>(gb, lora_a, /*q_sn=*/1, /*q_sk=*/in, std::nullopt, scale, gx);
    grad_x = gx.view(x.sizes());
  }
  if (need_w) grad_w = at::mm(g.t(), x2);
  if (need_bias) grad_bias = g.sum(0);
  // The rank-r operands are rounded once to the input dtype for cuBLAS; products and
  // sums stay fp32 until the final rounding.
  if (need_a) grad_a = mm_acc(gb.to(dtype).t(), x2).mul_(scale).to(dtype);
  if (need_b) grad_b = mm_acc(g.t(), xa.reshape({-1, lora_a.size(0)}).to(dtype)).mul_(scale).to(dtype);
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

}  // namespace lora_ext::cuda
