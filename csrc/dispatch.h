// The project's dtype dispatch and the argument checks shared by every backend.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// One dtype per call (float, half, bfloat16; double for gradcheck): every float
// tensor of an op must share it, so a single switch selects the kernel template
// (no nested switches).
#define LORA_EXT_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)          \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)       \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                                 AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__))

// Turns a run-time bool into a compile-time constant (flash-attention's BOOL_SWITCH).
#define LORA_EXT_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                             \
    if (COND) {                                     \
      constexpr static bool CONST_NAME = true;      \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr static bool CONST_NAME = false;     \
      return __VA_ARGS__();                         \
    }                                               \
  }()

namespace lora_ext {

// Shape, dtype and device checks; each names the argument and the expected vs.
// actual value. None of them reads tensor data, so they are safe for every backend.
void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b);
void check_lora_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b);
// Checks shapes/dtypes/devices of a multi_lora call (not the values of indices/ranks).
void check_multi_lora_args(const at::Tensor& x, const at::Tensor& a_stack,
                           const at::Tensor& b_stack, const at::Tensor& indices,
                           const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                           const std::optional<at::Tensor>& base);
// multi_lora's checks for multi_lora_add_, with y [T, out] in place of base; y must have
// unit column stride and row stride >= out (a column slice of a wider output is fine).
void check_multi_lora_add_args(const at::Tensor& y, const at::Tensor& x,
                               const at::Tensor& a_stack, const at::Tensor& b_stack,
                               const at::Tensor& indices, const at::Tensor& scales,
                               const std::optional<at::Tensor>& ranks);
void check_multi_lora_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& a_stack, const at::Tensor& b_stack,
                                    const at::Tensor& indices, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& ranks);
void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_a,
                      const at::Tensor& lora_b);
void check_merge_residual(const at::Tensor& weight, const at::Tensor& residual);
// Also checks the values of overflow_index (a device-to-host read, once per unmerge).
void check_unmerge_exact_args(const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& residual,
                              const at::Tensor& overflow_index,
                              const at::Tensor& overflow_values);

// weight.flatten()[index] = values for a weight whose rows may be strided (index counts
// row * in + col): the exact unmerge's last step, on every backend (csrc/cpu/merge.cpp).
void restore_overflow(at::Tensor& weight, const at::Tensor& index, const at::Tensor& values);

// moe_lora's checks (metadata only): x [P, in]; a_stack [C, E, R, in]; b_stack
// [C, E, out, R]; experts, adapters [P] int32/int64; scales, ranks [C]; base (or y, or
// grad_out: base_name) [P, out].
void check_moe_lora_args(const at::Tensor& x, const at::Tensor& a_stack,
                         const at::Tensor& b_stack, const at::Tensor& experts,
                         const at::Tensor& adapters, const at::Tensor& scales,
                         const std::optional<at::Tensor>& ranks,
                         const std::optional<at::Tensor>& base, const char* op,
                         const char* base_name = "base");

// DoRA (csrc/cpu/dora.cpp): weight [out, in] with unit column stride, lora_a [r, in],
// lora_b [out, r], one dtype and device.
void check_dora_weight_norm_args(const at::Tensor& weight, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b);
// multi_lora_add_'s checks plus row_scale [N, out] (fp32; fp64 for double) and bias [out].
void check_multi_dora_add_args(const at::Tensor& y, const at::Tensor& x,
                               const at::Tensor& a_stack, const at::Tensor& b_stack,
                               const at::Tensor& indices, const at::Tensor& scales,
                               const std::optional<at::Tensor>& ranks,
                               const at::Tensor& row_scale, const std::optional<at::Tensor>& bias);

}  // namespace lora_ext
