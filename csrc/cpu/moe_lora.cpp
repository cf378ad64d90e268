// CPU moe_lora: LoRA on the routed (token, expert) pairs of a mixture of experts.
// A pair row p uses block (adapters[p], experts[p]) of the [C, E, ...] stacks. The rows
// are bucketed by that block once per call (group_rows, a counting sort over C * E keys)
// and run through multi_lora's grouped kernels on the stacks seen as [C * E, ...], so
// each used block of A and B is read once per call, and no expert's weight update is
// ever formed.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace lora_ext::cpu {
namespace {

// The pairs' flat block index (adapter * E + expert, or -1), raising on a bad value
// before anything is written; the per-block scales and ranks; the stacks flattened.
struct FlatPairs {
  at::Tensor index, scales, a, b;
  std::optional<at::Tensor> ranks;
};

template <typename I, typename J>
void flat_index_of(const I* experts, const J* adapters, int64_t P, int64_t C, int64_t E,
                   int64_t* out, const char* op) {
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = static_cast<int64_t>(experts[p]), c = static_cast<int64_t>(adapters[p]);
    TORCH_CHECK(e >= 0 && e < E, op, ": experts[", p, "] = ", e,
                " is out of range; expected an expert in [0, ", E, ")");
    TORCH_CHECK(c >= -1 && c < C, op, ": adapters[", p, "] = ", c,
                " is out of range; expected -1 (no adapter) or an adapter in [0, ", C, ")");
    out[p] = c < 0 ? -1 : c * E + e;
  }
}

FlatPairs flatten(const at::Tensor& a_stack, const at::Tensor& b_stack, const at::Tensor& experts_in,
                  const at::Tensor& adapters_in, const at::Tensor& scales,
                  const std::optional<at::Tensor>& ranks, const char* op) {
  const int64_t C = a_stack.size(0), E = a_stack.size(1), R = a_stack.size(2);
  const int64_t P = experts_in.size(0);
  const at::Tensor experts = experts_in.contiguous(), adapters = adapters_in.contiguous();
  FlatPairs f;
  f.index = at::empty({P}, experts.options().dtype(at::kLong));
  int64_t* out = f.index.mutable_data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "moe_lora_experts", [&] {
    using I = index_t;
    AT_DISPATCH_INDEX_TYPES(adapters.scalar_type(), "moe_lora_adapters", [&] {
      flat_index_of(experts.const_data_ptr<I>(), adapters.const_data_ptr<index_t>(), P, C, E,
                    out, op);
    });
  });
  if (ranks.has_value() && ranks->defined()) {
    const at::Tensor r = ranks->to(at::kLong).contiguous();
    const int64_t* v = r.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < C; ++i)
      TORCH_CHECK(v[i] >= 1 && v[i] <= R, op, ": ranks[", i, "] = ", v[i],
                  " is out of range; expected 1 <= rank <= R = a_stack.size(2) = ", R);
    f.ranks = r.repeat_interleave(E);
  }
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
  const FlatPairs f = flatten(a_stack, b_stack, experts, adapters, scales, ranks, "moe_lora");
  return multi_lora(x, f.a, f.b, f.index, f.scales, f.ranks, base);
}

void moe_lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,
                   const at::Tensor& b_stack, const at::Tensor& experts,
                   const at::Tensor& adapters, const at::Tensor& scales,
                   const std::optional<at::Tensor>& ranks) {
  check_moe_lora_args(x, a_stack, b_stack, experts, adapters, scales, ranks, y, "moe_lora_add_",
                      "y");
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
  const FlatPairs f =
      flatten(a_stack, b_stack, experts, adapters, scales, ranks, "moe_lora_backward");
  auto [gx, ga, gb] = multi_lora_backward(grad_out, x, f.a, f.b, f.index, f.scales, f.ranks,
                                          output_mask);
  if (output_mask[1]) ga = ga.view(a_stack.sizes());
  if (output_mask[2]) gb = gb.view(b_stack.sizes());
  return {gx, ga, gb};
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("moe_lora", &moe_lora);
  m.impl("moe_lora_add_", &moe_lora_add_);
  m.impl("moe_lora_backward", &moe_lora_backward);
}

}  // namespace lora_ext::cpu
