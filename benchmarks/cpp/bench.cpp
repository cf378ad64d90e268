// lora_ext_bench: times the lora_ext ops against plain-ATen baselines (PEFT's
// loop over adapters, gather-then-bmm, PEFT's merge, the base linear alone) and
// states each result against a memory and a compute floor measured in the same run.
// Links libtorch and the kernel objects directly; no Python.
//
//   lora_ext_bench [--workloads W1,W3] [--hidden 4096] [--rank 16] [--tiny]
//                  [--device cpu|cuda|all] [--json FILE] (see --help)
//
// The workloads' shapes come from benchmarks/shapes.txt, which benchmarks/run.py reads too.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// The ops, through the dispatcher (the CPU or CUDA kernel is picked by the inputs).

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct Ops {
  c10::TypedOperatorHandle<decltype(lora_ext::cpu::multi_lora)> multi_lora =
      op<decltype(lora_ext::cpu::multi_lora)>("lora_ext::multi_lora");
  c10::TypedOperatorHandle<decltype(lora_ext::cpu::multi_lora_add_)> multi_lora_add_ =
      op<decltype(lora_ext::cpu::multi_lora_add_)>("lora_ext::multi_lora_add_");
  c10::TypedOperatorHandle<decltype(lora_ext::cpu::lora_linear)> lora_linear =
      op<decltype(lora_ext::cpu::lora_linear)>("lora_ext::lora_linear");
  c10::TypedOperatorHandle<decltype(lora_ext::cpu::lora_linear_backward)> lora_linear_backward =
      op<decltype(lora_ext::cpu::lora_linear_backward)>("lora_ext::lora_linear_backward");
  c10::TypedOperatorHandle<decltype(lora_ext::cpu::merge_)> merge_ =
      op<decltype(lora_ext::cpu::merge_)>("lora_ext::merge_");
};

// ---------------------------------------------------------------------------
// Peak extra memory on the CPU: every CPU tensor allocation goes through this
// wrapper of the default allocator (buffers a kernel takes from malloc directly
// are not seen). Its data pointers stay "simple" (context == data), as some ATen
// paths (raw_allocate) require.

class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner_->allocate(n);
    const c10::Device dev = p.device();
    c10::DeleterFnPtr deleter = p.get_deleter();
    void* data = p.get();
    void* ctx = p.release_context();
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[data] = {ctx, deleter, n};
      current_ += n;
      peak_ = std::max(peak_, current_);
    }
    return {data, data, &TrackingAllocator::release, dev};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &TrackingAllocator::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  // Resets the peak to the current level; peak_since_reset() is then the extra.
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = base_ = current_;
  }
  size_t peak_since_reset() {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_ - base_;
  }

  static TrackingAllocator* instance;

 private:
  struct Block {
    void* ctx;
    c10::DeleterFnPtr deleter;
    size_t bytes;
  };
  static void release(void* data) {
    Block b;
    {
      std::lock_guard<std::mutex> lock(instance->mu_);
      auto it = instance->live_.find(data);
      b = it->second;
      instance->live_.erase(it);
      instance->current_ -= b.bytes;
    }
    if (b.deleter) b.deleter(b.ctx);
  }
  c10::Allocator* inner_;
  std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  size_t current_ = 0, peak_ = 0, base_ = 0;
};

TrackingAllocator* TrackingAllocator::instance = nullptr;
TrackingAllocator* g_tracker = nullptr;

void install_tracker() {
  static TrackingAllocator tracker(c10::GetCPUAllocator());
  TrackingAllocator::instance = &tracker;
  c10::SetCPUAllocator(&tracker, /*priority=*/255);
  g_tracker = &tracker;
}

// ---------------------------------------------------------------------------
// Timing: a monotonic clock on the CPU, CUDA events on the GPU.

bool is_cuda(const c10::Device& d) { return d.type() == c10::DeviceType::CUDA; }

void sync(const c10::Device& d) {
  if (is_cuda(d)) torch::cuda::synchronize(d.index());
}

// Written before every CPU timing unless --warm-cache: larger than the last-level cache
// (32 MiB here), so each call starts cold, as it does in a model where other layers'
// weights stream through the cache between two calls of one layer. Never freed: a
// global tensor would outlive the tracking allocator at exit.
at::Tensor* g_cache_flush = nullptr;

double time_once_ms(const c10::Device& dev, const std::function<void()>& fn) {
  if (!is_cuda(dev) && g_cache_flush != nullptr) g_cache_flush->add_(1.0f);
  if (is_cuda(dev)) {
    const c10::Stream stream = c10::impl::getDeviceGuardImpl(dev.type())->getStream(dev);
    c10::Event start(dev.type(), c10::EventFlag::BACKEND_DEFAULT);
    c10::Event stop(dev.type(), c10::EventFlag::BACKEND_DEFAULT);
    start.record(stream);
    fn();
    stop.record(stream);
    stop.synchronize();
    return start.elapsedTime(stop);
  }
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

struct Stats {
  double median = 0, p10 = 0, p90 = 0, min = 0;
  int n = 0;
};

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - lo) * (v[hi] - v[lo]);
}

Stats stats_of(const std::vector<double>& v) {
  Stats s;
  s.n = static_cast<int>(v.size());
  s.median = quantile(v, 0.5);
  s.p10 = quantile(v, 0.1);
  s.p90 = quantile(v, 0.9);
  s.min = *std::min_element(v.begin(), v.end());
  return s;
}

#ifndef LORA_EXT_BENCH_SHAPES  // set by benchmarks/cpp/CMakeLists.txt to the source tree's file
#define LORA_EXT_BENCH_SHAPES "benchmarks/shapes.txt"
#endif

struct Config {
  std::vector<std::string> workloads = {"W1", "W2", "W3", "W4", "W5", "W6"};
  std::string device = "all";
  // From benchmarks/shapes.txt: the sizes (preset "default" or "tiny", then the flags)...
  int64_t hidden = 0, rank = 0, t_decode = 0, t_prefill = 0, adapters = 0;
  int warmup = 0, reps = 0;
  // ... and the parts of W2-W4 that do not scale (preset "fixed").
  int64_t w2_adapters = 0, w3_adapters = 0;
  double w2_unadapted = 0, w3_zipf = 0;
  std::vector<int64_t> w4_ranks;
  double max_seconds = 30;  // per workload, measuring only
  int threads = 0;
  uint64_t seed = 0;
  bool tiny = false;
  bool warm_cache = false;
  std::string json;
};

// benchmarks/shapes.txt: lines "PRESET key=value ...", '#' starting a comment.
using Shapes = std::map<std::string, std::map<std::string, std::string>>;

Shapes read_shapes(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot read the workload shapes " + path + " (--shapes FILE)");
  Shapes shapes;
  int number = 0;
  for (std::string line; std::getline(f, line);) {
    ++number;
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string preset, word;
    if (!(words >> preset)) continue;
    auto& values = shapes[preset];
    while (words >> word) {
      const auto eq = word.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == word.size())
        throw std::runtime_error(path + ":" + std::to_string(number) + ": expected key=value, got " + word);
      values[word.substr(0, eq)] = word.substr(eq + 1);
    }
  }
  return shapes;
}

// Sets cfg's sizes from preset "default" or "tiny" and its fixed parts from "fixed".
void apply_shapes(const Shapes& shapes, bool tiny, Config& cfg) {
  auto get = [&](const std::string& preset, const std::string& key) -> const std::string& {
    const auto p = shapes.find(preset);
    if (p == shapes.end()) throw std::runtime_error("the workload shapes have no preset '" + preset + "'");
    const auto v = p->second.find(key);
    if (v == p->second.end()) throw std::runtime_error("the workload shapes' preset '" + preset + "' has no " + key);
    return v->second;
  };
  const std::string size = tiny ? "tiny" : "default";
  cfg.hidden = std::stoll(get(size, "hidden"));
  cfg.rank = std::stoll(get(size, "rank"));
  cfg.t_decode = std::stoll(get(size, "tokens_decode"));
  cfg.t_prefill = std::stoll(get(size, "tokens_prefill"));
  cfg.adapters = std::stoll(get(size, "adapters"));
  cfg.warmup = std::stoi(get(size, "warmup"));
  cfg.reps = std::stoi(get(size, "reps"));
  cfg.w2_adapters = std::stoll(get("fixed", "w2_adapters"));
  cfg.w2_unadapted = std::stod(get("fixed", "w2_unadapted"));
  cfg.w3_adapters = std::stoll(get("fixed", "w3_adapters"));
  cfg.w3_zipf = std::stod(get("fixed", "w3_zipf"));
  cfg.w4_ranks.clear();
  std::stringstream ranks(get("fixed", "w4_ranks"));
  for (std::string r; std::getline(ranks, r, ',');) cfg.w4_ranks.push_back(std::stoll(r));
  if (cfg.w4_ranks.empty()) throw std::runtime_error("the workload shapes' w4_ranks is empty");
}

// A number as Python's "{:g}" writes it (1.5, 2).
std::string fmt_g(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

struct Variant {
  std::string name;  // lora_ext, peft_loop, gather_bmm, peft_merge, peft_compose, base_linear
  std::function<void()> fn;
  Stats stats;
};

// Variants are timed round-robin (one call of each per round) so that drift on a
// shared machine hits them all alike.
void measure(const c10::Device& dev, std::vector<Variant>& variants, const Config& cfg) {
  // Warm up, but stop early on slow workloads (a quarter of the measuring budget).
  double round_ms = 0, warm_ms = 0;
  for (int w = 0; w < std::max(1, cfg.warmup) && warm_ms < cfg.max_seconds * 250; ++w) {
    round_ms = 0;
    for (auto& v : variants) round_ms += time_once_ms(dev, v.fn);
    warm_ms += round_ms;
  }
  int reps = cfg.reps;
  if (round_ms > 0) {
    reps = std::min<int>(reps, static_cast<int>(cfg.max_seconds * 1e3 / round_ms));
  }
  reps = std::max(reps, 3);
  std::vector<std::vector<double>> t(variants.size());
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < variants.size(); ++i) t[i].push_back(time_once_ms(dev, variants[i].fn));
  }
  for (size_t i = 0; i < variants.size(); ++i) variants[i].stats = stats_of(t[i]);
}

// ---------------------------------------------------------------------------
// Machine ceilings, measured in the same run.

struct Ceilings {
  double copy_gbps = 0;                   // read + write counted
  std::map<c10::ScalarType, double> gflops;  // large square GEMM
};

double measure_copy_gbps(const c10::Device& dev, const Config& cfg) {
  const int64_t n = cfg.tiny ? (int64_t{1} << 22) : (is_cuda(dev) ? (int64_t{1} << 28) : (int64_t{1} << 26));
  auto src = at::rand({n}, at::TensorOptions().device(dev).dtype(at::kFloat));
  auto dst = at::empty_like(src);
  std::vector<Variant> v = {{"copy", [&] { dst.copy_(src); }, {}}};
  Config c = cfg;
  c.reps = std::max(cfg.reps, 10);
  measure(dev, v, c);
  return 2.0 * n * 4 / (v[0].stats.median * 1e-3) / 1e9;
}

double measure_gemm_gflops(const c10::Device& dev, c10::ScalarType dtype, const Config& cfg) {
  const int64_t n = cfg.tiny ? 256 : (is_cuda(dev) ? 8192 : 2048);
  auto opts = at::TensorOptions().device(dev).dtype(dtype);
  auto a = at::randn({n, n}, opts), b = at::randn({n, n}, opts), c = at::empty({n, n}, opts);
  std::vector<Variant> v = {{"gemm", [&] { at::mm_out(c, a, b); }, {}}};
  Config cc = cfg;
  cc.reps = std::max(cfg.reps, 5);
  measure(dev, v, cc);
  return 2.0 * n * n * n / (v[0].stats.median * 1e-3) / 1e9;
}

double gemm_gflops(Ceilings& c, const c10::Device& dev, c10::ScalarType dtype, const Config& cfg) {
  auto it = c.gflops.find(dtype);
  if (it == c.gflops.end()) it = c.gflops.emplace(dtype, measure_gemm_gflops(dev, dtype, cfg)).first;
  return it->second;
}

// ---------------------------------------------------------------------------
// Results.

struct Result {
  std::string workload, description, device, dtype;
  double flops = 0, bytes = 0;
  double memory_floor_ms = 0, compute_floor_ms = 0;
  std::vector<Variant> variants;
  double max_rel_err = 0, tolerance = 0;
  std::vector<std::pair<std::string, double>> extra;  // named numbers (peak memory, ...)

  const Variant* find(const std::string& name) const {
    for (const auto& v : variants)
      if (v.name == name) return &v;
    return nullptr;
  }
  double floor_ms() const { return std::max(memory_floor_ms, compute_floor_ms); }
  bool ok() const { return max_rel_err <= tolerance; }
};

double rel_err(const at::Tensor& got, const at::Tensor& ref) {
  const auto g = got.to(at::kDouble).cpu(), r = ref.to(at::kDouble).cpu();
  const double scale = std::max(r.abs().max().item<double>(), 1e-30);
  if (g.numel() == 0) return 0;
  return (g - r).abs().max().item<double>() / scale;
}

double tolerance_for(c10::ScalarType dtype) {
  return dtype == at::kFloat ? 1e-4 : 2e-2;
}

const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    default: return "other";
  }
}

// ---------------------------------------------------------------------------
// multi_lora workloads (W1-W4) and their baselines.

struct MultiLoraCase {
  at::Tensor x, a_stack, b_stack, indices, scales, ranks_t, base, weight;
  std::vector<int64_t> host_indices, ranks;  // the host copy PEFT loops over
  int64_t rank_max = 0;
};

// (a) PEFT's mixed-batch loop: one index/matmul/matmul/index_add per used adapter,
// over separate per-adapter weights (PEFT keeps one lora_A/lora_B per adapter).
struct PeftLoop {
  std::vector<at::Tensor> a, b;
  std::vector<double> scale;
  PeftLoop(const MultiLoraCase& c) {
    const auto sc = c.scales.cpu();
    for (int64_t i = 0; i < c.a_stack.size(0); ++i) {
      a.push_back(c.a_stack[i].narrow(0, 0, c.ranks[i]).contiguous());
      b.push_back(c.b_stack[i].narrow(1, 0, c.ranks[i]).contiguous());
      scale.push_back(sc[i].item<double>());
    }
  }
  at::Tensor operator()(const MultiLoraCase& c) const {
    // The row lists are built per call from the host-side adapter names, as PEFT does.
    std::map<int64_t, std::vector<int64_t>> rows;
    for (size_t t = 0; t < c.host_indices.size(); ++t)
      if (c.host_indices[t] >= 0) rows[c.host_indices[t]].push_back(static_cast<int64_t>(t));
    at::Tensor y = c.base.clone();
    for (auto& [i, r] : rows) {
      const auto idx = at::tensor(r, at::kLong).to(c.x.device());
      const auto h = at::linear(c.x.index_select(0, idx), a[i]);
      y.index_add_(0, idx, at::linear(h, b[i]).mul_(scale[i]));
    }
    return y;
  }
};

// (b) gather-then-bmm: copy each row's A and B, then two batched matmuls.
at::Tensor gather_bmm(const MultiLoraCase& c) {
  const auto used = c.indices >= 0;
  const auto idx = c.indices.clamp_min(0);
  const auto a = c.a_stack.index_select(0, idx);  // [T, R, in]
  const auto b = c.b_stack.index_select(0, idx);  // [T, out, R]
  const auto h = at::bmm(c.x.unsqueeze(1), a.transpose(1, 2));
  const auto d = at::bmm(h, b.transpose(1, 2)).squeeze(1);
  const auto s = (c.scales.index_select(0, idx) * used).to(d.scalar_type()).unsqueeze(1);
  return c.base + d * s;
}

MultiLoraCase make_multi_lora(const c10::Device& dev, c10::ScalarType dtype, int64_t tokens,
                              int64_t hidden, int64_t num_adapters, int64_t rank_max,
                              const std::vector<int64_t>& ranks, const at::Tensor& host_indices) {
  auto opts = at::TensorOptions().device(dev).dtype(dtype);
  MultiLoraCase c;
  c.rank_max = rank_max;
  c.ranks = ranks;
  c.x = at::randn({tokens, hidden}, opts);
  c.a_stack = at::randn({num_adapters, rank_max, hidden}, opts) / std::sqrt(double(hidden));
  c.b_stack = at::randn({num_adapters, hidden, rank_max}, opts) / std::sqrt(double(rank_max));
  // Zero beyond each adapter's rank, so the padded baselines compute the same thing.
  for (int64_t i = 0; i < num_adapters; ++i) {
    if (ranks[i] < rank_max) {
      c.a_stack[i].narrow(0, ranks[i], rank_max - ranks[i]).zero_();
      c.b_stack[i].narrow(1, ranks[i], rank_max - ranks[i]).zero_();
    }
  }
  c.scales = (at::rand({num_adapters}, at::kFloat) + 0.5).to(dev);
  c.ranks_t = at::tensor(ranks, at::kLong).to(dev);
  c.indices = host_indices.to(dev);
  c.host_indices.assign(host_indices.data_ptr<int64_t>(),
                        host_indices.data_ptr<int64_t>() + host_indices.numel());
  c.base = at::randn({tokens, hidden}, opts);
  c.weight = at::randn({hidden, hidden}, opts) / std::sqrt(double(hidden));
  return c;
}

Result run_multi_lora(const std::string& name, const std::string& desc, const c10::Device& dev,
                      c10::ScalarType dtype, const MultiLoraCase& c, bool pass_ranks,
                      const Ops& ops, Ceilings& ceil, const Config& cfg,
                      const MultiLoraCase* uniform = nullptr) {
  Result res;
  res.workload = name;
  res.description = desc;
  res.device = dev.str();
  res.dtype = dtype_name(dtype);
  const int64_t T = c.x.size(0), in = c.x.size(1), out = c.b_stack.size(1);
  const double esz = c.x.element_size();
  std::vector<bool> used(c.a_stack.size(0), false);
  int64_t active_rows = 0;
  for (auto i : c.host_indices) {
    if (i >= 0) {
      used[i] = true;
      ++active_rows;
    }
  }
  double adapter_elems = 0, flops = 0;
  for (size_t i = 0; i < used.size(); ++i)
    if (used[i]) adapter_elems += double(c.ranks[i]) * (in + out);
  for (auto i : c.host_indices)
    if (i >= 0) flops += 2.0 * c.ranks[i] * (in + out);
  // Intrinsic traffic: x of the rows with an adapter, base and y for every row, each used A/B once.
  res.bytes = esz * (double(active_rows) * in + 2.0 * T * out + adapter_elems);
  res.flops = flops;
  res.memory_floor_ms = res.bytes / (ceil.copy_gbps * 1e9) * 1e3;
  res.compute_floor_ms = res.flops / (gemm_gflops(ceil, dev, dtype, cfg) * 1e9) * 1e3;

  const std::optional<at::Tensor> ranks =
      pass_ranks ? std::optional<at::Tensor>(c.ranks_t) : std::nullopt;
  auto run_op = [&] { return ops.multi_lora.call(c.x, c.a_stack, c.b_stack, c.indices, c.scales, ranks, c.base); };
  // The in-place form (LoRALinear's inference path adds into the base GEMM's output):
  // no fresh [T, out] output. It accumulates into one buffer call after call.
  at::Tensor y_acc = c.base.clone();
  auto run_add = [&] {
    ops.multi_lora_add_.call(y_acc, c.x, c.a_stack, c.b_stack, c.indices, c.scales, ranks);
    return y_acc;
  };
  const PeftLoop peft(c);
  const auto ref = peft(c);
  res.max_rel_err = std::max({rel_err(run_op(), ref), rel_err(gather_bmm(c), ref), rel_err(run_add(), ref)});
  res.tolerance = tolerance_for(dtype);

  res.variants = {
      {"lora_ext", [&] { run_op(); }, {}},
      {"lora_ext_add_", [&] { run_add(); }, {}},
      {"peft_loop", [&] { peft(c); }, {}},
      {"gather_bmm", [&] { gather_bmm(c); }, {}},
      {"base_linear", [&] { at::linear(c.x, c.weight); }, {}},
  };
  // W4's reference (W1 at the mean rank), interleaved with the rest so drift cancels.
  if (uniform) {
    res.variants.push_back({"lora_ext_uniform_rank", [&] {
      ops.multi_lora.call(uniform->x, uniform->a_stack, uniform->b_stack, uniform->indices,
                          uniform->scales, std::nullopt, uniform->base);
    }, {}});
  }
  measure(dev, res.variants, cfg);
  return res;
}

// ---------------------------------------------------------------------------
// W5: lora_linear, forward and forward+backward.

Result run_lora_linear(bool backward, const c10::Device& dev, c10::ScalarType dtype, const Ops& ops,
                       Ceilings& ceil, const Config& cfg) {
  const int64_t T = cfg.t_prefill, in = cfg.hidden, out = cfg.hidden, r = cfg.rank;
  auto opts = at::TensorOptions().device(dev).dtype(dtype);
  const auto x = at::randn({T, in}, opts);
  const auto w = at::randn({out, in}, opts) / std::sqrt(double(in));
  const auto bias = at::randn({out}, opts);
  const auto a = at::randn({r, in}, opts) / std::sqrt(double(in));
  const auto b = at::randn({out, r}, opts) / std::sqrt(double(r));
  const auto g = at::randn({T, out}, opts);
  const double s = 2.0;
  const std::optional<at::Tensor> bias_opt(bias);

  Result res;
  res.workload = backward ? "W5-fwd+bwd" : "W5-fwd";
  res.description = "lora_linear T=" + std::to_string(T) + " in=out=" + std::to_string(in) + " r=" +
                    std::to_string(r) + (backward ? ", grads for x, A, B (weight frozen)" : "");
  res.device = dev.str();
  res.dtype = dtype_name(dtype);
  const double esz = x.element_size();
  const double base_flops = (backward ? 4.0 : 2.0) * T * in * out;
  const double lora_flops = (backward ? 6.0 : 2.0) * T * r * (in + out);
  res.flops = base_flops + lora_flops;
  // Reads x, W, A, B; writes y (forward); backward also reads g, writes grad_x, grads of A, B.
  res.bytes = esz * (double(T) * in + double(in) * out + r * (in + out) + double(T) * out +
                     (backward ? double(T) * out + double(T) * in + r * (in + out) : 0.0));
  res.memory_floor_ms = res.bytes / (ceil.copy_gbps * 1e9) * 1e3;
  res.compute_floor_ms = res.flops / (gemm_gflops(ceil, dev, dtype, cfg) * 1e9) * 1e3;
  res.extra.push_back({"lora_flop_share", lora_flops / base_flops});

  const std::array<bool, 5> mask = {true, false, false, true, true};
  // Each returns the outputs to compare: y or (grad_x, grad_A, grad_B).
  auto ours = [&]() -> std::vector<at::Tensor> {
    auto [y, xa] = ops.lora_linear.call(x, w, bias_opt, a, b, s);
    if (!backward) return {y};
    auto grads = ops.lora_linear_backward.call(g, x, w, a, b, xa, s, mask);
    return {std::get<0>(grads), std::get<3>(grads), std::get<4>(grads)};
  };
  // PEFT: base_layer(x) + lora_B(lora_A(x)) * scaling, and the backward autograd runs for it.
  auto peft = [&]() -> std::vector<at::Tensor> {
    auto h = at::linear(x, a);
    auto y = at::linear(x, w, bias) + at::linear(h, b) * s;
    if (!backward) return {y};
    auto gs = g * s;
    auto grad_b = gs.t().mm(h);
    auto grad_h = gs.mm(b);
    auto grad_a = grad_h.t().mm(x);
    auto grad_x = g.mm(w) + grad_h.mm(a);
    return {grad_x, grad_a, grad_b};
  };
  auto base = [&] {
    auto y = at::linear(x, w, bias);
    if (backward) g.mm(w);
  };
  const auto got = ours(), ref = peft();
  for (size_t i = 0; i < got.size(); ++i) res.max_rel_err = std::max(res.max_rel_err, rel_err(got[i], ref[i]));
  res.tolerance = tolerance_for(dtype);
  res.variants = {
      {"lora_ext", [&] { ours(); }, {}},
      {"peft_compose", [&] { peft(); }, {}},
      {"base_linear", base, {}},
  };
  measure(dev, res.variants, cfg);
  const double base_ms = res.find("base_linear")->stats.median;
  const double overhead = res.find("lora_ext")->stats.median / base_ms - 1.0;
  res.extra.push_back({"lora_ext_overhead_over_base", overhead});
  res.extra.push_back({"peft_overhead_over_base", res.find("peft_compose")->stats.median / base_ms - 1.0});
  res.extra.push_back({"overhead_over_flop_share", overhead / (lora_flops / base_flops)});
  return res;
}

// ---------------------------------------------------------------------------
// W6: merge_ against PEFT's merge (materialise scale * B @ A, then add).

void peft_merge(at::Tensor& w, const at::Tensor& a, const at::Tensor& b, double s) {
  // PEFT's get_delta_weight upcasts fp16/bf16 to fp32 on the CPU.
  const bool upcast = !is_cuda(w.device()) && w.scalar_type() != at::kFloat;
  auto delta = upcast ? (b.to(at::kFloat).mm(a.to(at::kFloat)) * s).to(w.scalar_type()) : b.mm(a) * s;
  w.add_(delta);
}

Result run_merge(c10::ScalarType dtype, const c10::Device& dev, const Ops& ops, Ceilings& ceil,
                 const Config& cfg) {
  const int64_t n = cfg.hidden, r = cfg.rank;
  auto opts = at::TensorOptions().device(dev).dtype(dtype);
  auto w = at::randn({n, n}, opts);
  auto w_peft = w.clone();
  const auto a = at::randn({r, n}, opts) / std::sqrt(double(n));
  const auto b = at::randn({n, r}, opts) * 1e-3;
  const double s = 0.5;

  Result res;
  res.workload = std::string("W6-") + dtype_name(dtype);
  res.description = "merge_ on a " + std::to_string(n) + "x" + std::to_string(n) + " weight, r=" +
                    std::to_string(r);
  res.device = dev.str();
  res.dtype = dtype_name(dtype);
  const double esz = w.element_size();
  res.bytes = esz * (2.0 * n * n + 2.0 * r * n);
  res.flops = 2.0 * n * n * r;
  res.memory_floor_ms = res.bytes / (ceil.copy_gbps * 1e9) * 1e3;
  res.compute_floor_ms = res.flops / (gemm_gflops(ceil, dev, dtype, cfg) * 1e9) * 1e3;

  {
    auto w1 = w.clone(), w2 = w.clone();
    ops.merge_.call(w1, a, b, s);
    // Reference in fp32 (PEFT's own result is rounded twice in bf16).
    auto ref = (w.to(at::kFloat) + b.to(at::kFloat).mm(a.to(at::kFloat)) * s);
    res.max_rel_err = rel_err(w1, ref);
    res.tolerance = tolerance_for(dtype);
    // Peak extra memory of one call (CPU tensor allocations), and the [out, in] size for scale.
    if (!is_cuda(dev) && g_tracker) {
      sync(dev);
      g_tracker->reset_peak();
      ops.merge_.call(w1, a, b, s);
      res.extra.push_back({"peak_extra_bytes_lora_ext", double(g_tracker->peak_since_reset())});
      g_tracker->reset_peak();
      peft_merge(w2, a, b, s);
      res.extra.push_back({"peak_extra_bytes_peft_merge", double(g_tracker->peak_since_reset())});
      res.extra.push_back({"weight_bytes", esz * n * n});
    }
  }
  // Repeated merges drift the weight a little; the timing does not care.
  res.variants = {
      {"lora_ext", [&] { ops.merge_.call(w, a, b, s); }, {}},
      {"peft_merge", [&] { peft_merge(w_peft, a, b, s); }, {}},
  };
  measure(dev, res.variants, cfg);
  return res;
}

// ---------------------------------------------------------------------------
// Workload set-up.

at::Tensor zipf_indices(int64_t tokens, int64_t adapters, double alpha) {
  auto p = at::arange(1, adapters + 1, at::kDouble).pow(-alpha);
  return at::multinomial(p, tokens, /*replacement=*/true).to(at::kLong);
}

std::vector<Result> run_device(const c10::Device& dev, const Config& cfg, const Ops& ops,
                               Ceilings& ceil) {
  const c10::ScalarType dtype = is_cuda(dev) ? at::kBFloat16 : at::kFloat;
  const int64_t H = cfg.hidden, r = cfg.rank, Td = cfg.t_decode, Tp = cfg.t_prefill, N = cfg.adapters;
  auto selected = [&](const std::string& w) {
    return std::find(cfg.workloads.begin(), cfg.workloads.end(), w) != cfg.workloads.end();
  };
  std::vector<Result> out;
  auto log = [&](const Result& r) {
    std::fprintf(stderr, "  %-12s %-6s done (lora_ext median %.3f ms)\n", r.workload.c_str(),
                 r.device.c_str(), r.find("lora_ext")->stats.median);
    out.push_back(r);
  };
  auto uniform = [](int64_t n, int64_t r) { return std::vector<int64_t>(n, r); };
  at::manual_seed(cfg.seed);
  if (selected("W1")) {
    auto idx = at::randperm(N, at::kLong).narrow(0, 0, std::min(Td, N));
    if (Td > N) idx = at::arange(Td, at::kLong) % N;
    auto c = make_multi_lora(dev, dtype, Td, H, N, r, uniform(N, r), idx);
    log(run_multi_lora("W1", "decode, distinct: T=" + std::to_string(Td) + ", " + std::to_string(N) +
                                 " adapters, every row its own, r=" + std::to_string(r),
                       dev, dtype, c, false, ops, ceil, cfg));
  }
  if (selected("W2")) {
    const int64_t n2 = cfg.w2_adapters;
    auto idx = at::randint(0, n2, {Td}, at::kLong);
    idx.index_put_({at::randperm(Td, at::kLong).narrow(0, 0, static_cast<int64_t>(Td * cfg.w2_unadapted))}, -1);
    auto c = make_multi_lora(dev, dtype, Td, H, n2, r, uniform(n2, r), idx);
    log(run_multi_lora("W2", "decode, shared: T=" + std::to_string(Td) + " over " + std::to_string(n2) +
                                 " adapters, " + std::to_string(std::llround(100 * cfg.w2_unadapted)) +
                                 "% rows -1, r=" + std::to_string(r),
                       dev, dtype, c, false, ops, ceil, cfg));
  }
  if (selected("W3")) {
    const int64_t n3 = cfg.w3_adapters;
    auto c = make_multi_lora(dev, dtype, Tp, H, n3, r, uniform(n3, r), zipf_indices(Tp, n3, cfg.w3_zipf));
    log(run_multi_lora("W3", "prefill, skewed: T=" + std::to_string(Tp) + " over " + std::to_string(n3) +
                                 " adapters, Zipf(" + fmt_g(cfg.w3_zipf) + "), r=" + std::to_string(r),
                       dev, dtype, c, false, ops, ceil, cfg));
  }
  if (selected("W4")) {
    const std::vector<int64_t>& choices = cfg.w4_ranks;
    const int64_t r_max = *std::max_element(choices.begin(), choices.end());
    std::string listed;
    for (const auto c : choices) listed += (listed.empty() ? "" : ",") + std::to_string(c);
    auto pick = at::randint(0, static_cast<int64_t>(choices.size()), {N}, at::kLong);
    std::vector<int64_t> ranks(N);
    for (int64_t i = 0; i < N; ++i) ranks[i] = choices[pick[i].item<int64_t>()];
    auto idx = at::randperm(N, at::kLong).narrow(0, 0, std::min(Td, N));
    if (Td > N) idx = at::arange(Td, at::kLong) % N;
    double mean = 0;
    for (int64_t t = 0; t < idx.numel(); ++t) mean += ranks[idx[t].item<int64_t>()];
    mean /= idx.numel();
    const int64_t mean_rank = std::llround(mean);
    auto c = make_multi_lora(dev, dtype, Td, H, N, r_max, ranks, idx);
    // The reference: W1 at the mean rank (lora_ext_uniform_rank), timed alongside.
    auto cref = make_multi_lora(dev, dtype, Td, H, N, mean_rank, uniform(N, mean_rank), idx);
    Result w4 = run_multi_lora("W4", "mixed ranks: like W1, ranks from {" + listed + "} (R=" + std::to_string(r_max) +
                                         "), mean rank " + std::to_string(mean) +
                                         "; lora_ext_uniform_rank: W1 at r=" + std::to_string(mean_rank),
                               dev, dtype, c, true, ops, ceil, cfg, &cref);
    // Scale the reference to the exact mean rank (work is linear in rank).
    const double ref_ms = w4.find("lora_ext_uniform_rank")->stats.median * mean / mean_rank;
    w4.extra.push_back({"mean_rank", mean});
    w4.extra.push_back({"time_over_w1_at_mean_rank", w4.find("lora_ext")->stats.median / ref_ms});
    log(w4);
  }
  if (selected("W5")) {
    log(run_lora_linear(false, dev, dtype, ops, ceil, cfg));
    log(run_lora_linear(true, dev, dtype, ops, ceil, cfg));
  }
  if (selected("W6")) {
    log(run_merge(at::kFloat, dev, ops, ceil, cfg));
    log(run_merge(at::kBFloat16, dev, ops, ceil, cfg));
  }
  return out;
}

// ---------------------------------------------------------------------------
// The targets of the issue (they are stated for the 2-core CPU; shown for any device).

struct Target {
  std::string workload, device, what;
  double value, limit;
  bool at_least;  // value >= limit, else value <= limit
  bool met() const { return at_least ? value >= limit : value <= limit; }
};

double extra(const Result& r, const std::string& key, double dflt = NAN) {
  for (auto& [k, v] : r.extra)
    if (k == key) return v;
  return dflt;
}

std::vector<Target> targets(const std::vector<Result>& results) {
  std::vector<Target> t;
  for (const auto& r : results) {
    const auto* ours = r.find("lora_ext");
    auto speedup = [&](const char* base) { return r.find(base)->stats.median / ours->stats.median; };
    if (r.workload == "W1") {
      t.push_back({"W1", r.device, "speedup vs peft_loop", speedup("peft_loop"), 3.0, true});
      t.push_back({"W1", r.device, "time / memory floor", ours->stats.median / r.memory_floor_ms, 2.0, false});
    } else if (r.workload == "W3") {
      t.push_back({"W3", r.device, "speedup vs peft_loop", speedup("peft_loop"), 5.0, true});
    } else if (r.workload == "W4") {
      t.push_back({"W4", r.device, "time / W1 at mean rank", extra(r, "time_over_w1_at_mean_rank"), 1.3, false});
    } else if (r.workload == "W5-fwd+bwd") {
      t.push_back({"W5", r.device, "overhead / LoRA FLOP share", extra(r, "overhead_over_flop_share"), 1.5, false});
    } else if (r.workload.rfind("W6", 0) == 0) {
      t.push_back({r.workload, r.device, "time / read+write of weight", ours->stats.median / r.memory_floor_ms, 1.3, false});
      t.push_back({r.workload, r.device, "speedup vs peft_merge", speedup("peft_merge"), 5.0, true});
      const double peak = extra(r, "peak_extra_bytes_lora_ext");
      if (!std::isnan(peak))
        t.push_back({r.workload, r.device, "peak extra / weight bytes", peak / extra(r, "weight_bytes"), 0.5, false});
    }
  }
  return t;
}

// ---------------------------------------------------------------------------
// Output.

void print_table(const std::vector<Result>& results, const std::vector<Target>& tgts) {
  std::printf("\n%-11s %-5s %-4s %-21s %10s %19s %8s %9s %9s %8s\n", "workload", "dev", "type", "variant",
              "median ms", "p10..p90 ms", "lora x", "GB/s", "GFLOP/s", "x floor");
  for (const auto& r : results) {
    const double ours = r.find("lora_ext")->stats.median;
    for (const auto& v : r.variants) {
      const double ms = v.stats.median;
      char spread[64];
      std::snprintf(spread, sizeof spread, "%.3f..%.3f", v.stats.p10, v.stats.p90);
      std::printf("%-11s %-5s %-4s %-21s %10.3f %19s %8.2f %9.1f %9.1f %8.2f\n", r.workload.c_str(),
                  r.device.c_str(), r.dtype.c_str(), v.name.c_str(), ms, spread, ms / ours,
                  r.bytes / (ms * 1e-3) / 1e9, r.flops / (ms * 1e-3) / 1e9, ms / r.floor_ms());
    }
    std::printf("%-11s   floor %.3f ms (%s-bound: memory %.3f ms, compute %.3f ms); check %s (rel err %.1e)",
                "", r.floor_ms(), r.memory_floor_ms >= r.compute_floor_ms ? "memory" : "compute",
                r.memory_floor_ms, r.compute_floor_ms, r.ok() ? "ok" : "FAILED", r.max_rel_err);
    for (auto& [k, v] : r.extra) std::printf("; %s %.4g", k.c_str(), v);
    std::printf("\n");
  }
  std::printf("\n(lora x: this variant's time over lora_ext's, so > 1 means lora_ext is faster; "
              "x floor: time over max(bytes / copy bandwidth, FLOPs / GEMM rate))\n");
  if (!tgts.empty()) {
    std::printf("\nTargets (the issue states them for the 2-core CPU)\n");
    for (const auto& t : tgts)
      std::printf("  %-8s %-5s %-30s %8.3f  %s %-5.2f %s\n", t.workload.c_str(), t.device.c_str(),
                  t.what.c_str(), t.value, t.at_least ? ">=" : "<=", t.limit, t.met() ? "met" : "NOT MET");
  }
}

std::string jnum(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s.precision(6);
  s << v;
  return s.str();
}

std::string jstr(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o + "\"";
}

void write_json(const std::string& path, const Config& cfg, const std::map<std::string, Ceilings>& ceil,
                const std::vector<Result>& results, const std::vector<Target>& tgts) {
  std::ofstream f(path);
  f << "{\n  \"harness\": \"lora_ext_bench\",\n  \"threads\": " << at::get_num_threads()
    << ",\n  \"config\": {\"hidden\": " << cfg.hidden << ", \"rank\": " << cfg.rank
    << ", \"t_decode\": " << cfg.t_decode << ", \"t_prefill\": " << cfg.t_prefill
    << ", \"adapters\": " << cfg.adapters << ", \"warmup\": " << cfg.warmup << ", \"reps\": " << cfg.reps
    << ", \"tiny\": " << (cfg.tiny ? "true" : "false") << "},\n  \"ceilings\": {";
  bool first = true;
  for (auto& [dev, c] : ceil) {
    f << (first ? "" : ", ") << jstr(dev) << ": {\"copy_gbps\": " << jnum(c.copy_gbps);
    for (auto& [t, g] : c.gflops) f << ", " << jstr(std::string("gemm_gflops_") + dtype_name(t)) << ": " << jnum(g);
    f << "}";
    first = false;
  }
  f << "},\n  \"results\": [";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    f << (i ? "," : "") << "\n    {\"workload\": " << jstr(r.workload) << ", \"description\": " << jstr(r.description)
      << ", \"device\": " << jstr(r.device) << ", \"dtype\": " << jstr(r.dtype) << ", \"flops\": " << jnum(r.flops)
      << ", \"bytes\": " << jnum(r.bytes) << ", \"memory_floor_ms\": " << jnum(r.memory_floor_ms)
      << ", \"compute_floor_ms\": " << jnum(r.compute_floor_ms) << ", \"max_rel_err\": " << jnum(r.max_rel_err)
      << ", \"check_ok\": " << (r.ok() ? "true" : "false") << ",\n     \"variants\": [";
    for (size_t j = 0; j < r.variants.size(); ++j) {
      const auto& v = r.variants[j];
      f << (j ? ", " : "") << "{\"name\": " << jstr(v.name) << ", \"median_ms\": " << jnum(v.stats.median)
        << ", \"p10_ms\": " << jnum(v.stats.p10) << ", \"p90_ms\": " << jnum(v.stats.p90)
        << ", \"min_ms\": " << jnum(v.stats.min) << ", \"n\": " << v.stats.n << "}";
    }
    f << "],\n     \"extra\": {";
    for (size_t j = 0; j < r.extra.size(); ++j)
      f << (j ? ", " : "") << jstr(r.extra[j].first) << ": " << jnum(r.extra[j].second);
    f << "}}";
  }
  f << "\n  ],\n  \"targets\": [";
  for (size_t i = 0; i < tgts.size(); ++i) {
    const auto& t = tgts[i];
    f << (i ? "," : "") << "\n    {\"workload\": " << jstr(t.workload) << ", \"device\": " << jstr(t.device)
      << ", \"what\": " << jstr(t.what) << ", \"value\": " << jnum(t.value) << ", \"limit\": " << jnum(t.limit)
      << ", \"at_least\": " << (t.at_least ? "true" : "false") << ", \"met\": " << (t.met() ? "true" : "false") << "}";
  }
  f << "\n  ]\n}\n";
}

void usage() {
  std::puts(
      "lora_ext_bench: lora_ext ops vs PEFT-style ATen baselines, against measured floors\n"
      "  --workloads W1,W2,...   any of W1 W2 W3 W4 W5 W6 (default: all)\n"
      "  --device cpu|cuda|all   default all (CUDA only when a GPU and the CUDA kernels exist)\n"
      "  --hidden N              in = out features\n"
      "  --rank N                LoRA rank\n"
      "  --tokens-decode N       rows of W1/W2/W4\n"
      "  --tokens-prefill N      rows of W3/W5\n"
      "  --adapters N            resident adapters of W1/W4\n"
      "  --warmup N --reps N     per variant\n"
      "                          (defaults of these six: the shapes file's preset \"default\", or \"tiny\")\n"
      "  --shapes FILE           the workload shapes (default " LORA_EXT_BENCH_SHAPES ")\n"
      "  --max-seconds S         cap on measuring time per workload (default 30)\n"
      "  --threads N             intra-op threads (default: torch's)\n"
      "  --warm-cache            do not evict the CPU caches before each timed call\n"
      "  --seed N                random seed (default 0)\n"
      "  --tiny                  small sizes, for a smoke test\n"
      "  --json FILE             also write the results as JSON");
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    // The shapes (--tiny picks its preset) first, so explicit sizes still win.
    cfg.tiny = std::find(args.begin(), args.end(), "--tiny") != args.end();
    std::string shapes = LORA_EXT_BENCH_SHAPES;
    const auto flag = std::find(args.begin(), args.end(), "--shapes");
    if (flag != args.end() && flag + 1 != args.end()) shapes = *(flag + 1);
    if (std::find(args.begin(), args.end(), "--help") == args.end() &&
        std::find(args.begin(), args.end(), "-h") == args.end())
      apply_shapes(read_shapes(shapes), cfg.tiny, cfg);
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= args.size()) throw std::runtime_error("missing value after " + a);
        return args[++i];
      };
      if (a == "--help" || a == "-h") {
        usage();
        return 0;
      } else if (a == "--tiny") {
      } else if (a == "--shapes") {
        next();  // read above
      } else if (a == "--warm-cache") {
        cfg.warm_cache = true;
      } else if (a == "--workloads") {
        cfg.workloads.clear();
        std::stringstream ss(next());
        for (std::string w; std::getline(ss, w, ',');) {
          if (w.size() < 2 || w[0] != 'W' || w[1] < '1' || w[1] > '6' || w.size() > 2)
            throw std::runtime_error("unknown workload '" + w + "' (expected W1..W6)");
          cfg.workloads.push_back(w);
        }
      } else if (a == "--device") {
        cfg.device = next();
        if (cfg.device != "cpu" && cfg.device != "cuda" && cfg.device != "all")
          throw std::runtime_error("--device must be cpu, cuda or all, got " + cfg.device);
      } else if (a == "--hidden") cfg.hidden = std::stoll(next());
      else if (a == "--rank") cfg.rank = std::stoll(next());
      else if (a == "--tokens-decode") cfg.t_decode = std::stoll(next());
      else if (a == "--tokens-prefill") cfg.t_prefill = std::stoll(next());
      else if (a == "--adapters") cfg.adapters = std::stoll(next());
      else if (a == "--warmup") cfg.warmup = std::stoi(next());
      else if (a == "--reps") cfg.reps = std::stoi(next());
      else if (a == "--max-seconds") cfg.max_seconds = std::stod(next());
      else if (a == "--threads") cfg.threads = std::stoi(next());
      else if (a == "--seed") cfg.seed = std::stoull(next());
      else if (a == "--json") cfg.json = next();
      else throw std::runtime_error("unknown argument " + a + " (see --help)");
    }
    if (cfg.hidden < 1 || cfg.rank < 1 || cfg.t_decode < 1 || cfg.t_prefill < 1 || cfg.adapters < 4)
      throw std::runtime_error("sizes must be positive (and --adapters at least 4)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lora_ext_bench: %s\n", e.what());
    return 2;
  }
  if (cfg.threads > 0) at::set_num_threads(cfg.threads);
  install_tracker();
  if (!cfg.warm_cache && !cfg.tiny) g_cache_flush = new at::Tensor(at::zeros({int64_t{1} << 24}, at::kFloat));  // 64 MiB

  const Ops ops;
  std::vector<c10::Device> devices;
  if (cfg.device != "cuda") devices.emplace_back(c10::DeviceType::CPU);
  if (cfg.device != "cpu") {
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("lora_ext::multi_lora", "");
    const bool has_kernel = handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    if (torch::cuda::is_available() && has_kernel) {
      devices.emplace_back(c10::DeviceType::CUDA, 0);
    } else if (cfg.device == "cuda") {
      std::fprintf(stderr, "lora_ext_bench: no CUDA device or no CUDA kernels in this build\n");
      return 2;
    } else {
      std::fprintf(stderr, "lora_ext_bench: CUDA skipped (%s)\n",
                   torch::cuda::is_available() ? "build has no CUDA kernels" : "no GPU");
    }
  }

  std::vector<Result> results;
  std::map<std::string, Ceilings> ceilings;
  try {
    for (const auto& dev : devices) {
      Ceilings& c = ceilings[dev.str()];
      c.copy_gbps = measure_copy_gbps(dev, cfg);
      const auto main_dtype = is_cuda(dev) ? at::kBFloat16 : at::kFloat;
      gemm_gflops(c, dev, main_dtype, cfg);
      std::fprintf(stderr, "%s: %d threads, copy %.1f GB/s (read+write), %s GEMM %.1f GFLOP/s\n",
                   dev.str().c_str(), at::get_num_threads(), c.copy_gbps, dtype_name(main_dtype),
                   c.gflops[main_dtype]);
      auto r = run_device(dev, cfg, ops, c);
      results.insert(results.end(), r.begin(), r.end());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lora_ext_bench: failed: %s\n", e.what());
    return 1;
  }
  const auto tgts = targets(results);
  print_table(results, tgts);
  if (!cfg.json.empty()) write_json(cfg.json, cfg, ceilings, results, tgts);
  bool ok = true;
  for (const auto& r : results) {
    if (!r.ok()) {
      std::fprintf(stderr, "lora_ext_bench: %s on %s: lora_ext disagrees with the baseline (rel err %.2e > %.1e)\n",
                   r.workload.c_str(), r.device.c_str(), r.max_rel_err, r.tolerance);
      ok = false;
    }
  }
  return ok ? 0 : 1;
}
