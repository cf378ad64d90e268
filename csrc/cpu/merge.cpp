// CPU merge_/unmerge_ (and their bit-exact variants): one pass over weight,
// rows split across threads, scale * B @ A computed on the fly in fp32 from
// A and B converted to the accumulation type once (they are small: r x in and out x r).
//
// Exact round trip: merge_exact_ stores w' = round(w + d) and, per element, the
// int8 c = ord(w) - ord(round(w' - d)) (ord: the float's position on the number
// line). unmerge_exact_ recomputes the same d, and ord(round(w' - d)) + c gives w
// back exactly. The rare elements where |c| > 127 (|w| far below |d|) are
// returned with their original values instead. Before writing, unmerge verifies that
// redoing the merge from the values it would restore gives the weight back bit for
// bit, element by element, and refuses otherwise (the weight changed since the merge,
// or the merge ran on another device or kernel variant, whose d rounds differently).
#include "cpu/microkernels.h"
#include "cpu/parallel.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace lora_ext {

void restore_overflow(at::Tensor& weight, const at::Tensor& index, const at::Tensor& values) {
  if (index.numel() == 0) return;
  if (weight.is_contiguous()) {
    weight.view({-1}).index_copy_(0, index, values);
    return;
  }
  const int64_t in = weight.size(1);
  weight.index_put_({index.div(in, "floor"), index.remainder(in)}, values);
}

}  // namespace lora_ext

namespace lora_ext::cpu {
namespace {

// Rows per task: enough to amortise packing, small enough to balance the cores.
constexpr int64_t kMergeRows = 16;

// kExactMerge appends the overflow elements to overflow_index/overflow_value;
// kExactVerify reads them (sorted by index) and returns the number of mismatches.
template <typename T>
int64_t merge_pass(at::Tensor& weight, const at::Tensor& a_acc, const at::Tensor& b_acc,
                   const uint32_t* a_pairs, const uint32_t* b_pairs, double scale, MergeMode mode,
                   int8_t* residual, std::vector<int64_t>* overflow_index,
                   std::vector<T>* overflow_value) {
  const MicroKernels<T>& mk = micro_kernels<T>();
  using Acc = acc_t<T>;
  const int64_t rows = weight.size(0), in = weight.size(1), rank = a_acc.size(0);
  // Rows may be strided (a column slice of a wider matrix); columns are unit stride.
  const int64_t ldw = rows > 1 ? weight.stride(0) : in;
  T* w = mode == MergeMode::kExactVerify ? const_cast<T*>(weight.const_data_ptr<T>())
                                          : weight.mutable_data_ptr<T>();
  const Acc* a = a_acc.const_data_ptr<Acc>();
  const Acc* b = b_acc.const_data_ptr<Acc>();
  const int64_t num_tasks = (rows + kMergeRows - 1) / kMergeRows;
  const bool collect = mode == MergeMode::kExactMerge, verify = mode == MergeMode::kExactVerify;
  std::vector<std::vector<int64_t>> idx_per_thread(collect ? at::get_num_threads() : 0);
  std::vector<std::vector<T>> val_per_thread(collect ? at::get_num_threads() : 0);
  std::atomic<int64_t> mismatches{0};
  at::parallel_for(0, num_tasks, grain_for(num_tasks, rows * in * rank), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> off_buf(collect ? kMergeRows * in : 0);
    std::vector<T> val_buf(collect ? kMergeRows * in : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r0 = task * kMergeRows, n = std::min(kMergeRows, rows - r0);
      int64_t known = 0;
      if (verify) {  // this tile's part of the overflow list, as offsets within the tile
        const auto first = std::lower_bound(overflow_index->begin(), overflow_index->end(), r0 * in);
        const auto last = std::lower_bound(first, overflow_index->end(), (r0 + n) * in);
        known = last - first;
        off_buf.resize(known);
        val_buf.resize(known);
        for (int64_t k = 0; k < known; ++k) {
          off_buf[k] = first[k] - r0 * in;
          val_buf[k] = (*overflow_value)[(first - overflow_index->begin()) + k];
        }
      }
      const int64_t found = mk.merge_tile(
          w + r0 * ldw, ldw, residual ? residual + r0 * in : nullptr, n, in, a, b + r0 * rank,
          rank, a_pairs, b_pairs ? b_pairs + r0 * ((rank + 1) / 2) : nullptr,
          static_cast<Acc>(scale), mode, off_buf.data(), val_buf.data(), known);
      if (verify) {
        mismatches += found;
      } else if (found > 0) {
        auto& idx = idx_per_thread[at::get_thread_num()];
        auto& val = val_per_thread[at::get_thread_num()];
        for (int64_t k = 0; k < found; ++k) {
          idx.push_back(r0 * in + off_buf[k]);
          val.push_back(val_buf[k]);
        }
      }
    }
  });
  if (verify) return mismatches.load();
  int64_t total = 0;
  for (size_t t = 0; t < idx_per_thread.size(); ++t) {
    overflow_index->insert(overflow_index->end(), idx_per_thread[t].begin(), idx_per_thread[t].end());
    overflow_value->insert(overflow_value->end(), val_per_thread[t].begin(), val_per_thread[t].end());
    total += static_cast<int64_t>(idx_per_thread[t].size());
  }
  return total;
}

// bf16 lora_a [r, in] and lora_b [out, r] as pairs of bf16 along the rank, viewed as
// int32: a_pairs [ceil(r/2), in], b_pairs [out, ceil(r/2)] (see MicroKernels::merge_tile).
std::tuple<at::Tensor, at::Tensor> bf16_pairs(const at::Tensor& lora_a, const at::Tensor& lora_b) {
  const int64_t r = lora_a.size(0), in = lora_a.size(1), out = lora_b.size(0), half = (r + 1) / 2;
  at::Tensor a = at::zeros({2 * half, in}, lora_a.options());
  a.narrow(0, 0, r).copy_(lora_a);
  at::Tensor b = at::zeros({out, 2 * half}, lora_b.options());
  b.narrow(1, 0, r).copy_(lora_b);
  // [half, 2, in] -> [half, in, 2]: the two rank rows of a pair side by side (into fresh
  // row-major storage: .contiguous() may keep odd strides on size-1 dimensions).
  at::Tensor a_pairs = at::empty({half, in, 2}, lora_a.options());
  a_pairs.copy_(a.view({half, 2, in}).transpose(1, 2));
  return {a_pairs.view(at::kInt).view({half, in}), b.view(at::kInt).view({out, half})};
}

// Runs one pass; returns (overflow_index, overflow_values), empty unless kExactMerge.
// kExactVerify reads `verify_against` (overflow index sorted, values) and stores the
// number of mismatching elements in *mismatches.
std::tuple<at::Tensor, at::Tensor> run_merge(
    at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
    MergeMode mode, int8_t* residual,
    const std::tuple<at::Tensor, at::Tensor>* verify_against = nullptr,
    int64_t* mismatches = nullptr) {
  at::Tensor index, values;
  LORA_EXT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "merge_", [&] {
    constexpr auto acc_dtype = c10::CppTypeToScalarType<acc_t<scalar_t>>::value;
    const at::Tensor a_acc = lora_a.to(acc_dtype).contiguous();
    const at::Tensor b_acc = lora_b.to(acc_dtype).contiguous();
    at::Tensor a_pairs, b_pairs;
    if (micro_kernels<scalar_t>().bf16_pairs) std::tie(a_pairs, b_pairs) = bf16_pairs(lora_a, lora_b);
    const auto* a_pairs_ptr = a_pairs.defined() ? a_pairs.const_data_ptr<int32_t>() : nullptr;
    const auto* b_pairs_ptr = b_pairs.defined() ? b_pairs.const_data_ptr<int32_t>() : nullptr;
    std::vector<int64_t> idx;
    std::vector<scalar_t> val;
    if (verify_against != nullptr) {
      const at::Tensor i = std::get<0>(*verify_against).contiguous();
      const at::Tensor v = std::get<1>(*verify_against).contiguous();
      idx.assign(i.const_data_ptr<int64_t>(), i.const_data_ptr<int64_t>() + i.numel());
      val.assign(v.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>() + v.numel());
    }
    const int64_t n = merge_pass<scalar_t>(
        weight, a_acc, b_acc, reinterpret_cast<const uint32_t*>(a_pairs_ptr),
        reinterpret_cast<const uint32_t*>(b_pairs_ptr), scale, mode, residual, &idx, &val);
    if (mode == MergeMode::kExactVerify) {
      *mismatches = n;
      return;
    }
    index = at::empty({n}, weight.options().dtype(at::kLong));
    values = at::empty({n}, weight.options());
    if (n > 0) {
      // Thread order is arbitrary: sort by index so results are reproducible.
      const at::Tensor i_unsorted = at::from_blob(idx.data(), {n}, index.options());
      const at::Tensor v_unsorted = at::from_blob(val.data(), {n}, values.options());
      const at::Tensor perm = i_unsorted.argsort();
      index.copy_(i_unsorted.index_select(0, perm));
      values.copy_(v_unsorted.index_select(0, perm));
    }
  });
  return {index, values};
}

}  // namespace

void merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
            double scale) {
  check_merge_args(weight, lora_a, lora_b);
  run_merge(weight, lora_a, lora_b, scale, MergeMode::kAdd, nullptr);
}

void unmerge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
              double scale) {
  check_merge_args(weight, lora_a, lora_b);
  run_merge(weight, lora_a, lora_b, -scale, MergeMode::kAdd, nullptr);
}

std::tuple<at::Tensor, at::Tensor> merge_exact_(at::Tensor& weight, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, double scale,
                                                at::Tensor& residual) {
  check_merge_args(weight, lora_a, lora_b);
  check_merge_residual(weight, residual);
  return run_merge(weight, lora_a, lora_b, scale, MergeMode::kExactMerge,
                   residual.mutable_data_ptr<int8_t>());
}

void unmerge_exact_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    double scale, const at::Tensor& residual, const at::Tensor& overflow_index,
                    const at::Tensor& overflow_values) {
  check_unmerge_exact_args(weight, lora_a, lora_b, residual, overflow_index, overflow_values);
  int8_t* res = const_cast<int8_t*>(residual.const_data_ptr<int8_t>());
  // Before writing anything: every element must still be what the merge produced.
  const auto [sorted_index, order] = overflow_index.sort();
  const std::tuple<at::Tensor, at::Tensor> overflow{sorted_index, overflow_values.index_select(0, order)};
  int64_t mismatches = 0;
  run_merge(weight, lora_a, lora_b, scale, MergeMode::kExactVerify, res, &overflow, &mismatches);
  TORCH_CHECK(mismatches == 0, "unmerge_exact_: ", mismatches, " of ", weight.numel(),
              " weight elements are not what merge_exact_ produced with these lora_a, lora_b, "
              "scale and residual (the weight, the factors or the residual changed since the "
              "merge, or it was made on another device or kernel variant); weight is unchanged");
  run_merge(weight, lora_a, lora_b, scale, MergeMode::kExactUnmerge, res);
  restore_overflow(weight, overflow_index, overflow_values);
}

std::string merge_variant(const at::Tensor& weight) {
  std::string isa;
  LORA_EXT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "merge_variant",
                                   [&] { isa = micro_kernels<scalar_t>().isa; });
  return "cpu/" + isa;
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("merge_", &merge_);
  m.impl("unmerge_", &unmerge_);
  m.impl("merge_exact_", &merge_exact_);
  m.impl("unmerge_exact_", &unmerge_exact_);
  m.impl("merge_variant", &merge_variant);
}

}  // namespace lora_ext::cpu
