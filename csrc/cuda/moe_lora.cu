// CUDA moe_lora: each routed pair's (adapter, expert) block becomes one adapter of the
// stacks seen as [C * E, ...], and multi_lora's kernels do the rest (decode: each row reads
// its block; prefill: rows grouped by block on the device). Written and compile-checked
// only: no GPU has run it yet.
#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"

#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <torch/library.h>

namespace lora_ext::cuda {
namespace {

// out[p] = adapters[p] * E + experts[p] (-1 for no adapter); a bad pair gets C * E, which
// multi_lora refuses (or, under graph capture, treats as no adapter), and raises flag.
template <typename I, typename J>
__global__ void flat_index_kernel(const I* experts, const J* adapters, int64_t P, int64_t C,
                                  int64_t E, int64_t* out, int* flag) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(experts[p]), c = static_cast<int64_t>(adapters[p]);
    const bool ok = e >= 0 && e < E && c >= -1 && c < C;
    out[p] = !ok ? C * E : (c < 0 ? -1 : c * E + e);
    if (!ok) *flag = 1;
  }
}

struct FlatPairs {
  at::Tensor index, scales, a, b;
  std::optional<at::Tensor> ranks;
};

FlatPairs flatten(const at::Tensor& a_stack, const at::Tensor& b_stack, const at::Tensor& experts_in,
                  const at::Tensor& adapters_in, const at::Tensor& scales,
                  const std::optional<at::Tensor>& ranks, const char* op) {
  const int64_t C = a_stack.size(0), E = a_stack.size(1), R = a_stack.size(2);
  const at::Tensor experts = experts_in.contiguous(), adapters = adapters_in.contiguous();
  const int64_t P = experts.numel();
  FlatPairs f;
  f.index = at::empty({P}, experts.options().dtype(at::kLong));
  at::Tensor flag = at::zeros({1}, experts.options().dtype(at::kInt));
  if (P > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(P, 256), 1024));
    AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "moe_lora_experts", [&] {
      using I = index_t;
      AT_DISPATCH_INDEX_TYPES(adapters.scalar_type(), "moe_lora_adapters", [&] {
        flat_index_kernel<I, index_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
            experts.const_data_ptr<I>(), adapters.const_data_ptr<index_t>(), P, C, E,
            f.index.mutable_data_ptr<int64_t>(), flag.mutable_data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // Named errors need a host sync: skipped while a CUDA graph is captured.
  if (at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None) {
    if (flag.item<int>() != 0) {
      const at::Tensor bad_e = at::logical_or(experts.lt(0), experts.ge(E)).nonzero();
      if (bad_e.numel() > 0) {
        const int64_t p = bad_e[0][0].item<int64_t>();
        TORCH_CHECK(false, op, ": experts[", p, "] = ", experts[p].item<int64_t>(),
                    " is out of range; expected an expert in [0, ", E, ")");
      }
      const int64_t p = at::logical_or(adapters.lt(-1), adapters.ge(C)).nonzero()[0][0].item<int64_t>();
      TORCH_CHECK(false, op, ": adapters[", p, "] = ", adapters[p].item<int64_t>(),
                  " is out of range; expected -1 (no adapter) or an adapter in [0, ", C, ")");
    }
    if (ranks.has_value() && ranks->defined()) {
      const at::Tensor bad = at::logical_or(ranks->lt(1), ranks->gt(R)).nonzero();
      if (bad.numel() > 0) {
        const int64_t i = bad[0][0].item<int64_t>();
        TORCH_CHECK(false, op, ": ranks[", i, "] = ", (*ranks)[i].item<int64_t>(),
                    " is out of range; expected 1 <= rank <= R = a_stack.size(2) = ", R);
      }
    }
  }
  if (ranks.has_value() && ranks->defined()) f.ranks = ranks->repeat_interleave(E);
  f.scales = scales.repeat_interleave(E);
  f.a = a_stack.reshape({C * E, R, a_stack.size(3)});
  f.b = b_stack.reshape({C * E, b_stack.size(2), R});
  return f;
}

}  // namespace

at::Tensor moe_lora(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& b_stack,
                    const at::Tensor& experts, const at::Tensor& adapters,
                    const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                    const std::optional<at::Tensor>& base) {
  check_moe_lora_args(x, a_stack, b_stack, experts, adapters, scales, ranks, base, "moe_lora");
  const c10::cuda::CUDAGuard guard(x.device());
  const FlatPairs f = flatten(a_stack, b_stack, experts, adapters, scales, ranks, "moe_lora");
  return multi_lora(x, f.a, f.b, f.index, f.scales, f.ranks, base);
}

void moe_lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,
                   const at::Tensor& b_stack, const at::Tensor& experts,
                   const at::Tensor& adapters, const at::Tensor& scales,
                   const std::optional<at::Tensor>& ranks) {
  check_moe_lora_args(x, a_stack, b_stack, experts, adapters, scales, ranks, y, "moe_lora_add_",
                      "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const FlatPairs f = flatten(a_stack, b_stack, experts, adapters, scales, ranks, "moe_lora_add_");
  multi_lora_add_(y, x, f.a, f.b, f.index, f.scales, f.ranks);
}

GradTuple3 moe_lora_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& a_stack, const at::Tensor& b_stack,
                             const at::Tensor& experts, const at::Tensor& adapters,
                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                             std::array<bool, 3> output_mask) {
  check_moe_lora_args(x, a_stack, b_stack, experts, adapters, scales, ranks, grad_out,
                      "moe_lora_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const FlatPairs f =
      flatten(a_stack, b_stack, experts, adapters, scales, ranks, "moe_lora_backward");
  auto [gx, ga, gb] = multi_lora_backward(grad_out, x, f.a, f.b, f.index, f.scales, f.ranks,
                                          output_mask);
  if (output_mask[1]) ga = ga.view(a_stack.sizes());
  if (output_mask[2]) gb = gb.view(b_stack.sizes());
  return {gx, ga, gb};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("moe_lora", &moe_lora);
  m.impl("moe_lora_add_", &moe_lora_add_);
  m.impl("moe_lora_backward", &moe_lora_backward);
}

}  // namespace lora_ext::cuda
