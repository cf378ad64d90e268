// lora_ext_op_check: every lora_ext op called through the dispatcher on small random
// shapes, in each dtype, against a float64 ATen reference (autograd for the backward
// ops), with tests/conftest.py's tolerance table. Needs no Python, so it runs where
// only libtorch does: scripts/aarch64_check.sh runs the aarch64 build under
// qemu-aarch64. Prints one line per check and exits 1 if any fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

// Calls lora_ext::<name> with boxed arguments; returns its outputs.
std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(std::move(args));
  op.callBoxed(&stack);
  return stack;
}

double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 2e-5;
    case at::kHalf: return 2e-3;
    default: return 1.6e-2;  // bfloat16
  }
}

void check_close(const std::string& what, at::ScalarType dtype, const at::Tensor& actual,
                 const at::Tensor& ref) {
  ++g_checks;
  if (actual.sizes() != ref.sizes()) {
    ++g_failures;
    std::printf("FAIL %-44s %-9s shape mismatch\n", what.c_str(), c10::toString(dtype));
    return;
  }
  const double scale = std::max(ref.numel() ? ref.abs().max().item<double>() : 0.0, 1.0);
  const double err = ref.numel() ? (actual.to(at::kDouble) - ref).abs().max().item<double>() : 0.0;
  const bool ok = err <= tolerance(dtype) * scale;
  g_failures += !ok;
  std::printf("%s %-44s %-9s max error %.3g (limit %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(),
              c10::toString(dtype), err, tolerance(dtype) * scale);
}

void check_true(const std::string& what, at::ScalarType dtype, bool ok) {
  ++g_checks;
  g_failures += !ok;
  std::printf("%s %-44s %s\n", ok ? "ok  " : "FAIL", what.c_str(), c10::toString(dtype));
}

// Random values of a dtype, and their exact float64 copy (the reference's input).
at::Tensor rnd(at::IntArrayRef shape, at::ScalarType dtype, double scale = 1.0) {
  return (at::randn(shape, at::kDouble) * scale).to(dtype);
}
at::Tensor f64(const at::Tensor& t) { return t.to(at::kDouble); }
at::Tensor with_grad(const at::Tensor& t) { return f64(t).detach().requires_grad_(true); }

// Float64 multi_lora: row t uses adapter idx[t] (-1: none), its A/B cut to ranks[idx[t]].
at::Tensor ref_multi_lora(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& idx, const at::Tensor& scales, const at::Tensor& ranks,
                          const at::Tensor& base) {
  const auto keep = (at::arange(a.size(1), at::kLong).unsqueeze(0) < ranks.unsqueeze(1)).to(at::kDouble);
  const auto safe = idx.to(at::kLong).clamp_min(0);
  const auto xa = at::einsum("tk,tjk->tj", {x, (a * keep.unsqueeze(2)).index_select(0, safe)});
  const auto delta = at::einsum("tj,toj->to", {xa, (b * keep.unsqueeze(1)).index_select(0, safe)}) *
                     f64(scales).index_select(0, safe).unsqueeze(1);
  return base + delta * (idx >= 0).to(at::kDouble).unsqueeze(1);
}

// Indices with a given number of rows on adapter 0 (>= 64 takes the packed prefill path)
// and the rest spread over -1 and the other adapters.
at::Tensor make_indices(int64_t rows, int64_t on_first, int64_t n) {
  auto idx = at::randint(-1, n, {rows}, at::kLong);
  idx.slice(0, 0, on_first).fill_(0);
  return idx.index_select(0, at::randperm(rows, at::kLong));
}

void check_lora_linear(at::ScalarType dtype) {
  const int64_t T = 9, in = 37, out = 29, r = 6;
  const double s = 0.7;
  const auto x = rnd({T, in}, dtype), w = rnd({out, in}, dtype, 0.2), bias = rnd({out}, dtype);
  const auto a = rnd({r, in}, dtype, 0.2), b = rnd({out, r}, dtype, 0.2);
  const auto res = call("lora_ext::lora_linear", {x, w, bias, a, b, s});
  const auto y = res[0].toTensor(), xa = res[1].toTensor();

  auto rx = with_grad(x), rw = with_grad(w), rbias = with_grad(bias), ra = with_grad(a), rb = with_grad(b);
  const auto rxa = at::matmul(rx, ra.t());
  const auto ry = at::matmul(rx, rw.t()) + rbias + s * at::matmul(rxa, rb.t());
  check_close("lora_linear y", dtype, y, ry.detach());
  check_close("lora_linear xa", dtype, xa, rxa.detach());

  const auto g = rnd({T, out}, dtype);
  const auto grads = call("lora_ext::lora_linear_backward",
                          {g, x, w, a, b, xa, s, c10::List<bool>({true, true, true, true, true})});
  const auto refs = torch::autograd::grad({ry}, {rx, rw, rbias, ra, rb}, {f64(g)});
  const char* names[] = {"x", "weight", "bias", "lora_a", "lora_b"};
  for (size_t i = 0; i < 5; ++i)
    check_close(std::string("lora_linear_backward grad ") + names[i], dtype,
                grads[i].toTensor(), refs[i]);
}

void check_multi_lora(at::ScalarType dtype, int64_t rows, int64_t on_first) {
  const int64_t in = 77, out = 70, n = 3, R = 12;
  const std::string tag = " (T=" + std::to_string(rows) + ")";
  const auto x = rnd({rows, in}, dtype), base = rnd({rows, out}, dtype);
  const auto a = rnd({n, R, in}, dtype, 0.2), b = rnd({n, out, R}, dtype, 0.2);
  const auto idx = make_indices(rows, on_first, n);
  const auto scales = at::rand({n}, at::kFloat) + 0.5;
  const auto ranks = at::tensor({R, 5L, 1L}, at::kLong);

  auto rx = with_grad(x), ra = with_grad(a), rb = with_grad(b), rbase = with_grad(base);
  const auto ref = ref_multi_lora(rx, ra, rb, idx, scales, ranks, rbase);
  const auto y = call("lora_ext::multi_lora", {x, a, b, idx, scales, ranks, base})[0].toTensor();
  check_close("multi_lora" + tag, dtype, y, ref.detach());

  // Into a column slice of a wider output, as a fused projection does.
  auto wide = rnd({rows, out + 8}, dtype);
  auto slice = wide.slice(1, 3, 3 + out);
  slice.copy_(base);
  call("lora_ext::multi_lora_add_", {slice, x, a, b, idx, scales, ranks});
  check_close("multi_lora_add_" + tag, dtype, slice, ref.detach());

  const auto g = rnd({rows, out}, dtype);
  const auto grads = call("lora_ext::multi_lora_backward",
                          {g, x, a, b, idx, scales, ranks, c10::List<bool>({true, true, true})});
  const auto refs = torch::autograd::grad({ref}, {rx, ra, rb}, {f64(g)});
  const char* names[] = {"x", "a_stack", "b_stack"};
  for (size_t i = 0; i < 3; ++i)
    check_close(std::string("multi_lora_backward grad ") + names[i] + tag, dtype,
                grads[i].toTensor(), refs[i]);

  // DoRA's epilogue: y = row_scale[i] * (y + delta) + bias, rows without an adapter y + bias.
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto row_scale = (at::rand({n, out}, at::kDouble) + 0.5).to(acc);
  const auto bias = rnd({out}, dtype);
  auto yd = base.clone();
  call("lora_ext::multi_dora_add_", {yd, x, a, b, idx, scales, ranks, row_scale, bias});
  const auto safe = idx.clamp_min(0);
  const auto rs = at::where((idx >= 0).unsqueeze(1), f64(row_scale).index_select(0, safe),
                            at::ones({1}, at::kDouble));
  check_close("multi_dora_add_" + tag, dtype, yd, (rs * ref + f64(bias)).detach());
}

void check_moe_lora(at::ScalarType dtype, int64_t rows) {
  const int64_t in = 40, out = 36, c = 2, e = 4, R = 8;
  const std::string tag = " (P=" + std::to_string(rows) + ")";
  const auto x = rnd({rows, in}, dtype), base = rnd({rows, out}, dtype);
  const auto a = rnd({c, e, R, in}, dtype, 0.2), b = rnd({c, e, out, R}, dtype, 0.2);
  const auto experts = at::randint(0, e, {rows}, at::kLong);
  const auto adapters = at::randint(-1, c, {rows}, at::kLong);
  const auto scales = at::rand({c}, at::kFloat) + 0.5;
  const auto ranks = at::tensor({R, 3L}, at::kLong);

  // The same as multi_lora over the C * E blocks, each with its adapter's scale and rank.
  auto rx = with_grad(x), ra = with_grad(a), rb = with_grad(b), rbase = with_grad(base);
  const auto block = at::where(adapters >= 0, adapters * e + experts, at::full({1}, -1L, at::kLong));
  const auto ref = ref_multi_lora(rx, ra.reshape({c * e, R, in}), rb.reshape({c * e, out, R}), block,
                                  scales.repeat_interleave(e), ranks.repeat_interleave(e), rbase);
  const auto y =
      call("lora_ext::moe_lora", {x, a, b, experts, adapters, scales, ranks, base})[0].toTensor();
  check_close("moe_lora" + tag, dtype, y, ref.detach());
  auto y2 = base.clone();
  call("lora_ext::moe_lora_add_", {y2, x, a, b, experts, adapters, scales, ranks});
  check_close("moe_lora_add_" + tag, dtype, y2, ref.detach());

  const auto g = rnd({rows, out}, dtype);
  const auto grads = call("lora_ext::moe_lora_backward", {g, x, a, b, experts, adapters, scales, ranks,
                                                          c10::List<bool>({true, true, true})});
  const auto refs = torch::autograd::grad({ref}, {rx, ra, rb}, {f64(g)});
  const char* names[] = {"x", "a_stack", "b_stack"};
  for (size_t i = 0; i < 3; ++i)
    check_close(std::string("moe_lora_backward grad ") + names[i] + tag, dtype,
                grads[i].toTensor(), refs[i]);
}

void check_merge(at::ScalarType dtype) {
  const int64_t out = 45, in = 83, r = 5;
  const double s = 0.5;
  const auto a = rnd({r, in}, dtype, 0.3), b = rnd({out, r}, dtype, 0.3);
  const auto w0 = rnd({out, in}, dtype);
  const auto delta = s * at::matmul(f64(b), f64(a));

  // A column slice of a wider weight (rows strided).
  auto wide = w0.new_zeros({out, in + 6});
  auto w = wide.slice(1, 2, 2 + in);
  w.copy_(w0);
  call("lora_ext::merge_", {w, a, b, s});
  check_close("merge_", dtype, w, f64(w0) + delta);
  w.copy_(w0);
  call("lora_ext::unmerge_", {w, a, b, s});
  check_close("unmerge_", dtype, w, f64(w0) - delta);

  auto we = w0.clone();
  const auto residual = at::empty({out, in}, at::kChar);
  const auto overflow = call("lora_ext::merge_exact_", {we, a, b, s, residual});
  check_close("merge_exact_", dtype, we, f64(w0) + delta);
  call("lora_ext::unmerge_exact_", {we, a, b, s, residual, overflow[0], overflow[1]});
  check_true("merge_exact_ then unmerge_exact_ bit-exact", dtype, at::equal(we, w0));

  const auto norm = call("lora_ext::dora_weight_norm", {w0, a, b, s})[0].toTensor();
  check_close("dora_weight_norm", dtype, norm, (f64(w0) + delta).norm(2, {1}));
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress shows, and survives a crash, under emulation
  at::manual_seed(0);
  const auto variant = call("lora_ext::merge_variant", {at::zeros({1, 1})})[0].toStringRef();
  std::printf("lora_ext_op_check: CPU micro-kernels %s\n", variant.c_str());
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    check_lora_linear(dtype);
    check_multi_lora(dtype, 7, 2);     // decode: a few rows per adapter
    check_multi_lora(dtype, 150, 80);  // prefill: 80 rows on one adapter (packed A)
    check_moe_lora(dtype, 23);
    check_merge(dtype);
  }
  std::printf("lora_ext_op_check: %d of %d checks failed\n", g_failures, g_checks);
  return g_failures == 0 ? 0 : 1;
}
