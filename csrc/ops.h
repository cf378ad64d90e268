// The C++ declarations every backend implements. Schemas live in registration.cpp;
// each backend registers its own kernels for these signatures.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace lora_ext {

using GradTuple3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GradTuple5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define LORA_EXT_DECLARE_BACKEND(ns)                                                        \
  namespace ns {                                                                            \
  /* Outputs: y, and xa = x @ lora_a^T ([..., r] in fp32; fp64 for double inputs),  */   \
  /* which the backward takes instead of recomputing it.                              */   \
  std::tuple<at::Tensor, at::Tensor> lora_linear(                                           \
      const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, \
      const at::Tensor& lora_a, const at::Tensor& lora_b, double scale);                    \
  /* Outputs: grad_x, grad_weight, grad_bias, grad_a, grad_b; an output whose mask */       \
  /* entry is false is an empty tensor.                                             */       \
  GradTuple5 lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,          \
                                  const at::Tensor& weight, const at::Tensor& lora_a,       \
                                  const at::Tensor& lora_b, const at::Tensor& xa,           \
                                  double scale, std::array<bool, 5> output_mask);           \
  at::Tensor multi_lora(const at::Tensor& x, const at::Tensor& a_stack,                     \
                        const at::Tensor& b_stack, const at::Tensor& indices,               \
                        const at::Tensor& scales, const std::optional<at::Tensor>& ranks,   \
                        const std::optional<at::Tensor>& base);                             \
  /* y[t] += update of row t, in place; y may be a column slice (row stride >= out). */    \
  void multi_lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,       \
                       const at::Tensor& b_stack, const at::Tensor& indices,                \
                       const at::Tensor& scales, const std::optional<at::Tensor>& ranks);   \
  /* Outputs: grad_x, grad_a_stack, grad_b_stack (grad of base is grad_out itself). */      \
  GradTuple3 multi_lora_backward(const at::Tensor& grad_out, const at::Tensor& x,           \
                                 const at::Tensor& a_stack, const at::Tensor& b_stack,      \
                                 const at::Tensor& indices, const at::Tensor& scales,       \
                                 const std::optional<at::Tensor>& ranks,                    \
                                 std::array<bool, 3> output_mask);                          \
  void merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,       \
              double scale);                                                                \
  void unmerge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,     \
                double scale);                                                              \
  /* Exact merge: also writes, per weight element, the int8 correction that lets  */      \
  /* unmerge_exact_ restore the original bits; elements whose correction does not */        \
  /* fit in int8 are returned as (flat index, original value).                    */        \
  std::tuple<at::Tensor, at::Tensor> merge_exact_(at::Tensor& weight,                       \
                                                  const at::Tensor& lora_a,                 \
                                                  const at::Tensor& lora_b, double scale,   \
                                                  at::Tensor& residual);                    \
  void unmerge_exact_(at::Tensor& weight, const at::Tensor& lora_a,                         \
                      const at::Tensor& lora_b, double scale, const at::Tensor& residual,   \
                      const at::Tensor& overflow_index, const at::Tensor& overflow_values); \
  std::string merge_variant(const at::Tensor& weight);                                      \
  }

LORA_EXT_DECLARE_BACKEND(cpu)
LORA_EXT_DECLARE_BACKEND(cuda)

#undef LORA_EXT_DECLARE_BACKEND

// LoRA on the routed (token, expert) pairs of a mixture of experts (csrc/cpu/moe_lora.cpp):
// pair p uses block (adapters[p], experts[p]) of a_stack [C, E, R, in], b_stack [C, E, out, R].
#define LORA_EXT_DECLARE_MOE(ns)                                                              \
  namespace ns {                                                                              \
  at::Tensor moe_lora(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& b_stack, \
                      const at::Tensor& experts, const at::Tensor& adapters,                  \
                      const at::Tensor& scales, const std::optional<at::Tensor>& ranks,       \
                      const std::optional<at::Tensor>& base);                                 \
  void moe_lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,           \
                     const at::Tensor& b_stack, const at::Tensor& experts,                    \
                     const at::Tensor& adapters, const at::Tensor& scales,                    \
                     const std::optional<at::Tensor>& ranks);                                 \
  GradTuple3 moe_lora_backward(const at::Tensor& grad_out, const at::Tensor& x,               \
                               const at::Tensor& a_stack, const at::Tensor& b_stack,          \
                               const at::Tensor& experts, const at::Tensor& adapters,         \
                               const at::Tensor& scales,                                      \
                               const std::optional<at::Tensor>& ranks,                        \
                               std::array<bool, 3> output_mask);                              \
  }
LORA_EXT_DECLARE_MOE(cpu)
LORA_EXT_DECLARE_MOE(cuda)
#undef LORA_EXT_DECLARE_MOE

// DoRA (weight-decomposed LoRA): csrc/cpu/dora.cpp, csrc/cuda/dora.cu.
#define LORA_EXT_DECLARE_DORA(ns)                                                           \
  namespace ns {                                                                            \
  /* ||weight[o] + scale * lora_b[o] @ lora_a|| per row o: [out], fp32 (fp64 for double). */ \
  at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a,           \
                              const at::Tensor& lora_b, double scale);                      \
  /* y[t] = row_scale[i] * (y[t] + update of row t) + bias; rows with -1: y[t] + bias. */   \
  void multi_dora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,       \
                       const at::Tensor& b_stack, const at::Tensor& indices,                \
                       const at::Tensor& scales, const std::optional<at::Tensor>& ranks,    \
                       const at::Tensor& row_scale, const std::optional<at::Tensor>& bias); \
  }
LORA_EXT_DECLARE_DORA(cpu)
LORA_EXT_DECLARE_DORA(cuda)
#undef LORA_EXT_DECLARE_DORA


}  // namespace lora_ext
