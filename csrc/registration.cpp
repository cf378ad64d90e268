// Every lora_ext op schema, in one place. Kernels are registered per backend
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake kernels and autograd
// are registered in Python (lora_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(lora_ext, m) {
  // (y, xa): y = x @ weight.T + bias + scale * xa @ lora_b.T, without forming B @ A, and
  // xa = x @ lora_a.T ([..., r], fp32; fp64 for double), kept for the backward.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale) -> (Tensor, Tensor)");
  // Gradients (x, weight, bias, lora_a, lora_b); masked-off outputs are empty tensors.
  // xa: lora_linear's second output.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor xa, float scale, bool[5] output_mask) -> (Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  // Row t uses adapter indices[t] (-1: none): base[t] + scales[i] * B_i (A_i x_t),
  // with A_i, B_i cut to ranks[i].
  m.def(
      "multi_lora(Tensor x, Tensor a_stack, Tensor b_stack, Tensor indices, Tensor scales, "
      "Tensor? ranks, Tensor? base) -> Tensor");
  // In place: y[t] += scales[i] * B_i (A_i x_t) for rows with an adapter; y may be a
  // column slice of a wider output (row stride >= width, unit column stride).
  m.def(
      "multi_lora_add_(Tensor(a!) y, Tensor x, Tensor a_stack, Tensor b_stack, Tensor indices, "
      "Tensor scales, Tensor? ranks) -> ()");
  // Gradients (x, a_stack, b_stack); masked-off outputs are empty tensors.
  m.def(
      "multi_lora_backward(Tensor grad_out, Tensor x, Tensor a_stack, Tensor b_stack, "
      "Tensor indices, Tensor scales, Tensor? ranks, bool[3] output_mask) -> (Tensor, Tensor, "
      "Tensor)");
  // weight += scale * lora_b @ lora_a (merge_) or -= (unmerge_), in one pass over weight.
  m.def("merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale) -> ()");
  m.def("unmerge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale) -> ()");
  // Bit-exact variants: merge_exact_ writes an int8 correction per element into
  // residual and returns (flat index, original value) of elements needing more.
  m.def(
      "merge_exact_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor(b!) residual) -> (Tensor, Tensor)");
  m.def(
      "unmerge_exact_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor residual, Tensor overflow_index, Tensor overflow_values) -> ()");
  // Which kernel merge_exact_ runs for weight's device and dtype ("cpu/avx512", "cuda"):
  // an exact merge is undone exactly only by the same one (rounding differs).
  m.def("merge_variant(Tensor weight) -> str");
  // DoRA. ||weight[o] + scale * (lora_b @ lora_a)[o]|| per output row ([out], fp32; fp64
  // for double), in one pass over weight without forming lora_b @ lora_a.
  m.def("dora_weight_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  // multi_lora_add_ with DoRA's epilogue: y[t] = row_scale[i] * (y[t] + scales[i] B_i (A_i x_t))
  // + bias for rows with an adapter i (row_scale [N, out] fp32: 1 for plain LoRA slots),
  // y[t] + bias for rows with -1. y holds x @ weight.T without the bias.
  m.def(
      "multi_dora_add_(Tensor(a!) y, Tensor x, Tensor a_stack, Tensor b_stack, Tensor indices, "
      "Tensor scales, Tensor? ranks, Tensor row_scale, Tensor? bias) -> ()");
  // LoRA on a mixture of experts' routed pairs: row p (a token's copy for one expert)
  // uses block (adapters[p] (-1: none), experts[p]) of a_stack [C, E, R, in] and
  // b_stack [C, E, out, R]: base[p] + scales[c] * B_ce (A_ce x_p), cut to ranks[c].
  m.def(
      "moe_lora(Tensor x, Tensor a_stack, Tensor b_stack, Tensor experts, Tensor adapters, "
      "Tensor scales, Tensor? ranks, Tensor? base) -> Tensor");
  m.def(
      "moe_lora_add_(Tensor(a!) y, Tensor x, Tensor a_stack, Tensor b_stack, Tensor experts, "
      "Tensor adapters, Tensor scales, Tensor? ranks) -> ()");
  m.def(
      "moe_lora_backward(Tensor grad_out, Tensor x, Tensor a_stack, Tensor b_stack, "
      "Tensor experts, Tensor adapters, Tensor scales, Tensor? ranks, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
}

