// Argument checks shared by the CPU and CUDA backends. They look only at
// metadata (shape, dtype, device), never at data, and run before any kernel.
#include "dispatch.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lora_ext {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 (or float64), got ", t.scalar_type());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
               const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
              t.sizes());
}

void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* op,
                const char* name, const char* what) {
  TORCH_CHECK(t.size(d) == expected, op, ": ", name, ".size(", d, ") (", what,
              ") must be ", expected, ", got ", t.size(d), " (shape ", t.sizes(), ")");
}

void check_same_dtype(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                      const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; all float tensors of one call must share a dtype");
}

void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// An in-place output must not share bytes with an input: results would depend on the
// order of writes (and race between CUDA blocks).
void check_no_shared_memory(const at::Tensor& written, const char* written_name,
                            const at::Tensor& t, const char* op, const char* name) {
  if (written.numel() == 0 || t.numel() == 0 || !written.has_storage() || !t.has_storage() ||
      !written.storage().is_alias_of(t.storage())) {
    return;
  }
  auto byte_range = [](const at::Tensor& x) {
    int64_t last = 0;  // offset of the last element, in elements
    for (int64_t d = 0; d < x.dim(); ++d) last += (x.size(d) - 1) * x.stride(d);
    const auto* p = static_cast<const char*>(x.const_data_ptr());
    return std::pair{p, p + (last + 1) * x.element_size()};
  };
  const auto [w0, w1] = byte_range(written);
  const auto [t0, t1] = byte_range(t);
  TORCH_CHECK(w1 <= t0 || t1 <= w0, op, ": ", name, " shares memory with ", written_name,
              ", which is written in place; pass a copy (", name, ".clone())");
}

void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

}  // namespace

void check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b) {
  constexpr const char* op = "lora_linear";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., in], got a 0-D tensor");
  check_float(weight, op, "weight");
  check_float(lora_a, op, "lora_a");
  check_float(lora_b, op, "lora_b");
  check_dim(weight, 2, op, "weight", "[out, in]");
  check_dim(lora_a, 2, op, "lora_a", "[r, in]");
  check_dim(lora_b, 2, op, "lora_b", "[out, r]");
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(x.size(-1) == in, op, ": x.size(-1) (in) must equal weight.size(1) = ", in,
              ", got ", x.size(-1), " (x shape ", x.sizes(), ")");
  check_size(lora_a, 1, in, op, "lora_a", "in");
  check_size(lora_b, 0, out, op, "lora_b", "out");
  check_size(lora_b, 1, lora_a.size(0), op, "lora_b", "r, from lora_a.size(0)");
  TORCH_CHECK(lora_a.size(0) >= 1, op, ": rank lora_a.size(0) must be >= 1, got ",
              lora_a.size(0));
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}}) {
    check_same_dtype(x, "x", *t, op, name);
    check_same_device(x, "x", *t, op, name);
  }
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, op, "bias");
    check_dim(*bias, 1, op, "bias", "[out]");
    check_size(*bias, 0, out, op, "bias", "out");
    check_same_dtype(x, "x", *bias, op, "bias");
    check_same_device(x, "x", *bias, op, "bias");
  }
}

void check_lora_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b) {
  check_lora_linear_args(x, weight, std::nullopt, lora_a, lora_b);
  constexpr const char* op = "lora_linear_backward";
  check_float(grad_out, op, "grad_out");
  check_same_dtype(x, "x", grad_out, op, "grad_out");
  check_same_device(x, "x", grad_out, op, "grad_out");
  auto expected = x.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(grad_out.sizes().vec() == expected, op, ": grad_out must have shape ",
              at::IntArrayRef(expected), ", got ", grad_out.sizes());
}

namespace {

// base_name: "base" (multi_lora) or "y" (multi_lora_add_), the [T, out] tensor.
void check_multi_lora_common(const at::Tensor& x, const at::Tensor& a_stack,
                             const at::Tensor& b_stack, const at::Tensor& indices,
                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                             const std::optional<at::Tensor>& base, const char* op,
                             const char* base_name) {
  check_float(x, op, "x");
  check_float(a_stack, op, "a_stack");
  check_float(b_stack, op, "b_stack");
  check_dim(x, 2, op, "x", "[T, in]");
  check_dim(a_stack, 3, op, "a_stack", "[N, R, in]");
  check_dim(b_stack, 3, op, "b_stack", "[N, out, R]");
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t N = a_stack.size(0), R = a_stack.size(1);
  check_size(a_stack, 2, in, op, "a_stack", "in, from x.size(1)");
  check_size(b_stack, 0, N, op, "b_stack", "N, from a_stack.size(0)");
  check_size(b_stack, 2, R, op, "b_stack", "R, from a_stack.size(1)");
  TORCH_CHECK(R >= 1, op, ": a_stack.size(1) (max rank R) must be >= 1, got ", R);
  check_same_dtype(x, "x", a_stack, op, "a_stack");
  check_same_dtype(x, "x", b_stack, op, "b_stack");
  check_same_device(x, "x", a_stack, op, "a_stack");
  check_same_device(x, "x", b_stack, op, "b_stack");

  check_index_dtype(indices, op, "indices");
  check_dim(indices, 1, op, "indices", "[T]");
  check_size(indices, 0, T, op, "indices", "T, from x.size(0)");
  check_same_device(x, "x", indices, op, "indices");

  TORCH_CHECK(at::isFloatingType(scales.scalar_type()), op,
              ": scales must be a floating-point tensor, got ", scales.scalar_type());
  check_dim(scales, 1, op, "scales", "[N]");
  check_size(scales, 0, N, op, "scales", "N, from a_stack.size(0)");
  check_same_device(x, "x", scales, op, "scales");

  if (ranks.has_value() && ranks->defined()) {
    check_index_dtype(*ranks, op, "ranks");
    check_dim(*ranks, 1, op, "ranks", "[N]");
    check_size(*ranks, 0, N, op, "ranks", "N, from a_stack.size(0)");
    check_same_device(x, "x", *ranks, op, "ranks");
  }
  if (base.has_value() && base->defined()) {
    check_float(*base, op, base_name);
    check_dim(*base, 2, op, base_name, "[T, out]");
    check_size(*base, 0, T, op, base_name, "T, from x.size(0)");
    check_size(*base, 1, b_stack.size(1), op, base_name, "out, from b_stack.size(1)");
    check_same_dtype(x, "x", *base, op, base_name);
    check_same_device(x, "x", *base, op, base_name);
  }
}

}  // namespace

void check_multi_lora_args(const at::Tensor& x, const at::Tensor& a_stack,
                           const at::Tensor& b_stack, const at::Tensor& indices,
                           const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                           const std::optional<at::Tensor>& base) {
  check_multi_lora_common(x, a_stack, b_stack, indices, scales, ranks, base, "multi_lora",
                          "base");
}

void check_multi_lora_add_args(const at::Tensor& y, const at::Tensor& x,
                               const at::Tensor& a_stack, const at::Tensor& b_stack,
                               const at::Tensor& indices, const at::Tensor& scales,
                               const std::optional<at::Tensor>& ranks) {
  constexpr const char* op = "multi_lora_add_";
  TORCH_CHECK(y.defined(), op, ": y must be a tensor, got None");
  check_multi_lora_common(x, a_stack, b_stack, indices, scales, ranks, y, op, "y");
  // Rows are written through a row stride; overlapping rows would race.
  TORCH_CHECK(y.size(1) <= 1 || y.stride(1) == 1, op,
              ": y must have unit column stride (a row-major tensor or a column slice of "
              "one), got strides ", y.strides());
  TORCH_CHECK(y.size(0) <= 1 || y.stride(0) >= y.size(1), op,
              ": y's rows must not overlap (row stride >= out), got strides ", y.strides(),
              " for shape ", y.sizes());
  // The kernels read b_stack (and scales, ranks) while they write y, on CUDA from other
  // blocks; a fused kernel would read x and a_stack then too. No input may share y's bytes.
  for (auto [t, name] : {std::pair{&x, "x"}, {&a_stack, "a_stack"}, {&b_stack, "b_stack"},
                         {&indices, "indices"}, {&scales, "scales"}}) {
    check_no_shared_memory(y, "y", *t, op, name);
  }
  if (ranks.has_value() && ranks->defined()) check_no_shared_memory(y, "y", *ranks, op, "ranks");
}

void check_multi_lora_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& a_stack, const at::Tensor& b_stack,
                                    const at::Tensor& indices, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& ranks) {
  check_multi_lora_args(x, a_stack, b_stack, indices, scales, ranks, std::nullopt);
  constexpr const char* op = "multi_lora_backward";
  check_float(grad_out, op, "grad_out");
  check_same_dtype(x, "x", grad_out, op, "grad_out");
  check_same_device(x, "x", grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) &&
                  grad_out.size(1) == b_stack.size(1),
              op, ": grad_out must have shape [T, out] = [", x.size(0), ", ", b_stack.size(1),
              "], got ", grad_out.sizes());
}

// A weight [out, in] (unit column stride, rows apart) and one adapter's factors
// lora_a [r, in], lora_b [out, r]: what merging and DoRA's norm both read.
static void check_weight_and_factors(const at::Tensor& weight, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b, const char* op) {
  check_float(weight, op, "weight");
  check_float(lora_a, op, "lora_a");
  check_float(lora_b, op, "lora_b");
  check_dim(weight, 2, op, "weight", "[out, in]");
  check_dim(lora_a, 2, op, "lora_a", "[r, in]");
  check_dim(lora_b, 2, op, "lora_b", "[out, r]");
  check_size(lora_a, 1, weight.size(1), op, "lora_a", "in, from weight.size(1)");
  check_size(lora_b, 0, weight.size(0), op, "lora_b", "out, from weight.size(0)");
  check_size(lora_b, 1, lora_a.size(0), op, "lora_b", "r, from lora_a.size(0)");
  TORCH_CHECK(lora_a.size(0) >= 1, op, ": rank lora_a.size(0) must be >= 1, got ",
              lora_a.size(0));
  check_same_dtype(weight, "weight", lora_a, op, "lora_a");
  check_same_dtype(weight, "weight", lora_b, op, "lora_b");
  check_same_device(weight, "weight", lora_a, op, "lora_a");
  check_same_device(weight, "weight", lora_b, op, "lora_b");
  // Read (and for merges written) through a row stride: a column slice of a wider matrix is fine.
  TORCH_CHECK((weight.size(1) <= 1 || weight.stride(1) == 1) &&
                  (weight.size(0) <= 1 || weight.stride(0) >= weight.size(1)),
              op, ": weight must have unit column stride and non-overlapping rows (row stride "
              ">= in), got strides ", weight.strides());
}

void check_merge_args(const at::Tensor& weight, const at::Tensor& lora_a,
                      const at::Tensor& lora_b) {
  constexpr const char* op = "merge_/unmerge_";
  check_weight_and_factors(weight, lora_a, lora_b, op);
  // Updated in place: the factors must not alias it.
  check_no_shared_memory(weight, "weight", lora_a, op, "lora_a");
  check_no_shared_memory(weight, "weight", lora_b, op, "lora_b");
}

void check_merge_residual(const at::Tensor& weight, const at::Tensor& residual) {
  constexpr const char* op = "merge_exact_/unmerge_exact_";
  TORCH_CHECK(residual.scalar_type() == at::kChar, op, ": residual must be int8, got ",
              residual.scalar_type());
  TORCH_CHECK(residual.sizes() == weight.sizes(), op, ": residual must have weight's shape ",
              weight.sizes(), ", got ", residual.sizes());
  TORCH_CHECK(residual.is_contiguous(), op, ": residual must be contiguous");
  check_same_device(weight, "weight", residual, op, "residual");
  check_no_shared_memory(weight, "weight", residual, op, "residual");
}

void check_unmerge_exact_args(const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& residual,
                              const at::Tensor& overflow_index,
                              const at::Tensor& overflow_values) {
  check_merge_args(weight, lora_a, lora_b);
  check_merge_residual(weight, residual);
  constexpr const char* op = "unmerge_exact_";
  TORCH_CHECK(overflow_index.scalar_type() == at::kLong && overflow_index.dim() == 1, op,
              ": overflow_index must be a 1-D int64 tensor, got ", overflow_index.scalar_type(),
              " of shape ", overflow_index.sizes());
  TORCH_CHECK(overflow_values.scalar_type() == weight.scalar_type() &&
                  overflow_values.sizes() == overflow_index.sizes(),
              op, ": overflow_values must be ", weight.scalar_type(), " of shape ",
              overflow_index.sizes(), ", got ", overflow_values.scalar_type(), " of shape ",
              overflow_values.sizes());
  check_same_device(weight, "weight", overflow_index, op, "overflow_index");
  check_same_device(weight, "weight", overflow_values, op, "overflow_values");
  if (overflow_index.numel() > 0) {
    const int64_t lo = overflow_index.min().item<int64_t>();
    const int64_t hi = overflow_index.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < weight.numel(), op, ": overflow_index values must be in [0, ",
                weight.numel(), "), got [", lo, ", ", hi, "]");
    // The list must be the merge's: entries only for elements whose residual is -128 (the
    // correction did not fit in int8), none twice; otherwise the restore would write values
    // the element check never looked at. (A -128 element without an entry fails that check.)
    const at::Tensor sorted = std::get<0>(overflow_index.sort());
    TORCH_CHECK(!sorted.slice(0, 1).eq(sorted.slice(0, 0, -1)).any().item<bool>(), op,
                ": overflow_index lists an element more than once; it must be the list "
                "merge_exact_ returned; weight is unchanged");
    TORCH_CHECK(residual.reshape({-1}).index_select(0, overflow_index).eq(-128).all().item<bool>(),
                op, ": overflow_index lists an element whose residual is not -128 (its "
                "correction fitted in int8, so merge_exact_ did not return it); weight is "
                "unchanged");
  }
}

void check_moe_lora_args(const at::Tensor& x, const at::Tensor& a_stack,
                         const at::Tensor& b_stack, const at::Tensor& experts,
                         const at::Tensor& adapters, const at::Tensor& scales,
                         const std::optional<at::Tensor>& ranks,
                         const std::optional<at::Tensor>& base, const char* op,
                         const char* base_name) {
  check_float(x, op, "x");
  check_float(a_stack, op, "a_stack");
  check_float(b_stack, op, "b_stack");
  check_dim(x, 2, op, "x", "[P, in] (one row per routed pair)");
  check_dim(a_stack, 4, op, "a_stack", "[C, E, R, in]");
  check_dim(b_stack, 4, op, "b_stack", "[C, E, out, R]");
  const int64_t P = x.size(0), C = a_stack.size(0), E = a_stack.size(1), R = a_stack.size(2);
  check_size(a_stack, 3, x.size(1), op, "a_stack", "in, from x.size(1)");
  check_size(b_stack, 0, C, op, "b_stack", "C, from a_stack.size(0)");
  check_size(b_stack, 1, E, op, "b_stack", "E, from a_stack.size(1)");
  check_size(b_stack, 3, R, op, "b_stack", "R, from a_stack.size(2)");
  TORCH_CHECK(R >= 1, op, ": a_stack.size(2) (max rank R) must be >= 1, got ", R);
  for (auto [t, name] : {std::pair{&a_stack, "a_stack"}, {&b_stack, "b_stack"}}) {
    check_same_dtype(x, "x", *t, op, name);
    check_same_device(x, "x", *t, op, name);
  }
  for (auto [t, name] : {std::pair{&experts, "experts"}, {&adapters, "adapters"}}) {
    check_index_dtype(*t, op, name);
    check_dim(*t, 1, op, name, "[P]");
    check_size(*t, 0, P, op, name, "P, from x.size(0)");
    check_same_device(x, "x", *t, op, name);
  }
  TORCH_CHECK(at::isFloatingType(scales.scalar_type()), op,
              ": scales must be a floating-point tensor, got ", scales.scalar_type());
  check_dim(scales, 1, op, "scales", "[C]");
  check_size(scales, 0, C, op, "scales", "C, from a_stack.size(0)");
  check_same_device(x, "x", scales, op, "scales");
  if (ranks.has_value() && ranks->defined()) {
    check_index_dtype(*ranks, op, "ranks");
    check_dim(*ranks, 1, op, "ranks", "[C]");
    check_size(*ranks, 0, C, op, "ranks", "C, from a_stack.size(0)");
    check_same_device(x, "x", *ranks, op, "ranks");
  }
  if (base.has_value() && base->defined()) {
    check_float(*base, op, base_name);
    check_dim(*base, 2, op, base_name, "[P, out]");
    check_size(*base, 0, P, op, base_name, "P, from x.size(0)");
    check_size(*base, 1, b_stack.size(2), op, base_name, "out, from b_stack.size(2)");
    check_same_dtype(x, "x", *base, op, base_name);
    check_same_device(x, "x", *base, op, base_name);
  }
}

// -- DoRA ---------------------------------------------------------------------------------

void check_dora_weight_norm_args(const at::Tensor& weight, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b) {
  check_weight_and_factors(weight, lora_a, lora_b, "dora_weight_norm");
}

void check_multi_dora_add_args(const at::Tensor& y, const at::Tensor& x,
                               const at::Tensor& a_stack, const at::Tensor& b_stack,
                               const at::Tensor& indices, const at::Tensor& scales,
                               const std::optional<at::Tensor>& ranks,
                               const at::Tensor& row_scale, const std::optional<at::Tensor>& bias) {
  check_multi_lora_add_args(y, x, a_stack, b_stack, indices, scales, ranks);
  constexpr const char* op = "multi_dora_add_";
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(row_scale.defined() && row_scale.scalar_type() == acc, op, ": row_scale must be ",
              acc, " (the accumulation type of ", x.scalar_type(), "), got ",
              row_scale.defined() ? c10::toString(row_scale.scalar_type()) : "None");
  TORCH_CHECK(row_scale.dim() == 2 && row_scale.size(0) == a_stack.size(0) &&
                  row_scale.size(1) == b_stack.size(1),
              op, ": row_scale must have shape [N, out] = [", a_stack.size(0), ", ",
              b_stack.size(1), "], got ", row_scale.sizes());
  check_same_device(x, "x", row_scale, op, "row_scale");
  check_no_shared_memory(y, "y", row_scale, op, "row_scale");
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, op, "bias");
    check_same_dtype(x, "x", *bias, op, "bias");
    check_same_device(x, "x", *bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b_stack.size(1), op,
                ": bias must have shape [out] = [", b_stack.size(1), "], got ", bias->sizes());
    check_no_shared_memory(y, "y", *bias, op, "bias");
  }
}

}  // namespace lora_ext
