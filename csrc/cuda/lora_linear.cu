// CUDA lora_linear. The base layer's output comes first, by the call F.linear makes
// (at::linear); the expand kernel then adds (scale * x @ A^T) @ B^T onto it in place,
// rounded once, as multi_lora_add_ does when serving. The rank-r products are fp32:
// cuBLAS with an fp32 output, or in deterministic mode the tiled kernels (the order
// multi_lora's kernels use, whatever the batch). The backward keeps every rank-r
// intermediate in fp32, and sums the weight gradients' rows in order in one block per
// output tile (no split over rows).
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

// Rows of x ([..., in]): the product of its leading sizes (reshape(-1, n) cannot tell
// when a size is 0).
int64_t leading_rows(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

// p @ Q in acc_t, [rows, r], with Q(k, n) = q[n * q_sn + k * q_sk] (n < r): in deterministic
// mode the tiled shrink (rows in order, k ascending, as multi_lora's kernels sum), else
// cuBLAS. p: [rows, K] contiguous.
at::Tensor rank_product(const at::Tensor& p, const at::Tensor& q, int64_t q_sn, int64_t q_sk,
                        int64_t r) {
  if (!rows_invariant()) {
    const at::Tensor qt = at::as_strided(q, {p.size(1), r}, {q_sk, q_sn});
    return mm_acc(p, qt).contiguous();
  }
  const int64_t rows = p.size(0), K = p.size(1);
  at::Tensor h = at::empty({rows, r}, p.options().dtype(acc_dtype(p.scalar_type())));
  const RowGroups groups{nullptr, nullptr, nullptr, rows};
  LORA_EXT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "lora_linear", [&] {
    using Acc = acc_t<scalar_t>;
    const AdapterOperand<scalar_t> qop{q.const_data_ptr<scalar_t>(), 0, q_sn, q_sk};
    if (q_sk == 1) {
      launch_shrink<scalar_t, true>(groups, rows, 1, p.const_data_ptr<scalar_t>(), K, K, qop,
                                    nullptr, static_cast<int>(r), nullptr,
                                    h.mutable_data_ptr<Acc>(), r);
    } else {
      launch_shrink<scalar_t, false>(groups, rows, 1, p.const_data_ptr<scalar_t>(), K, K, qop,
                                     nullptr, static_cast<int>(r), nullptr,
                                     h.mutable_data_ptr<Acc>(), r);
    }
  });
  return h;
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
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& lora_a_in,
                                               const at::Tensor& lora_b_in, double scale) {
  check_lora_linear_args(x, weight, bias, lora_a_in, lora_b_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_a_in.size(0);
  const int64_t rows = leading_rows(x);
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();

  at::Tensor y = at::linear(x, weight, bias).contiguous();
  at::Tensor y2 = y.view({rows, out});
  const at::Tensor h = rank_product(x2, lora_a, /*q_sn=*/in, /*q_sk=*/1, r);  // x @ A^T, [T, r]
  // Scaled before the expand, as multi_lora's shrink stores it (one fp32 multiply), so the
  // update's bits are multi_lora_add_'s.
  const at::Tensor hs = h * scale;
  expand_into<true>(hs, lora_b, /*q_sn=*/r, /*q_sk=*/1, std::nullopt, 1.0, y2);
  auto h_shape = x.sizes().vec();
  h_shape.back() = r;
  return {y, h.view(h_shape)};  // h is what the backward needs for grad_b
}

GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& lora_a_in,
                                const at::Tensor& lora_b_in, const at::Tensor& xa,
                                double scale, std::array<bool, 5> output_mask) {
  check_lora_linear_backward_args(grad_out, x, weight, lora_a_in, lora_b_in);
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_a_in.size(0);
  const int64_t rows = leading_rows(x);
  TORCH_CHECK(xa.device() == x.device() && xa.scalar_type() == acc_dtype(x.scalar_type()) &&
                  xa.size(-1) == r && xa.numel() == rows * r,
              "lora_linear_backward: xa must be lora_linear's second output ([..., r] in ",
              acc_dtype(x.scalar_type()), " on ", x.device(), "), got shape ", xa.sizes(),
              ", dtype ", xa.scalar_type(), " on ", xa.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [need_x, need_w, need_bias, need_a, need_b] = output_mask;
  const at::Tensor g = grad_out.reshape({rows, out}).contiguous();
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  const at::Tensor empty = x.new_empty({0});
  // g @ B in acc_t [T, r], shared by grad_x and grad_a.
  const at::Tensor gb =
      (need_x || need_a) ? rank_product(g, lora_b, /*q_sn=*/1, /*q_sk=*/r, r) : empty;
  at::Tensor grad_x = empty, grad_w = empty, grad_bias = empty, grad_a = empty, grad_b = empty;
  if (need_x) {
    at::Tensor gx = at::mm(g, weight).contiguous();  // [T, in]
    // gx[t, j] += scale * sum_k gb[t, k] * A[k, j]
    expand_into<true>(gb, lora_a, /*q_sn=*/1, /*q_sk=*/in, std::nullopt, scale, gx);
    grad_x = gx.view(x.sizes());
  }
  if (need_w) grad_w = at::mm(g.t(), x2);
  if (need_bias) grad_bias = g.sum(0);
  // The weight gradients from the fp32 intermediates (as on the CPU: rounding g @ B or
  // x @ A^T to 16 bits first loses digits to cancellation, and g @ B can pass fp16's
  // range), each rounded once, rows summed in order.
  if (need_a || need_b) {
    const at::Tensor xa2 = xa.reshape({rows, r}).contiguous();
    if (need_a) grad_a = at::zeros({r, in}, x.options());
    if (need_b) grad_b = at::zeros({out, r}, x.options());
    LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_linear_backward", [&] {
      using T_ = scalar_t;
      using Acc = acc_t<T_>;
      const int ri = static_cast<int>(r);
      if (need_a) {  // grad_A[k, j] = scale * sum_t gb[t, k] x[t, j]
        launch_weight_grad<T_, Acc, T_>(nullptr, nullptr, 1, gb.const_data_ptr<Acc>(), r,
                                        x2.const_data_ptr<T_>(), in, grad_a.mutable_data_ptr<T_>(),
                                        0, in, nullptr, ri, /*m_is_rank=*/true, r,
                                        /*n_is_rank=*/false, in, rows, static_cast<Acc>(scale));
      }
      if (need_b) {  // grad_B[o, k] = scale * sum_t g[t, o] xa[t, k]
        launch_weight_grad<T_, T_, Acc>(nullptr, nullptr, 1, g.const_data_ptr<T_>(), out,
                                        xa2.const_data_ptr<Acc>(), r,
                                        grad_b.mutable_data_ptr<T_>(), 0, r, nullptr, ri,
                                        /*m_is_rank=*/false, out, /*n_is_rank=*/true, r, rows,
                                        static_cast<Acc>(scale));
      }
    });
  }
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

}  // namespace lora_ext::cuda
