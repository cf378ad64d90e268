// CPU multi_lora: rows grouped by adapter, so each used adapter's A and B are
// read once per call however many rows use it, with work proportional to its rank.
#include "cpu/lora_rows.h"
#include "cpu/microkernels.h"
#include "cpu/parallel.h"
#include "dispatch.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

namespace lora_ext::cpu {

namespace {

template <typename I>
AdapterGroups group_rows_of(const I* v, int64_t num_rows, int64_t num_adapters) {
  std::vector<int64_t> count(num_adapters + 1, 0);  // slot 0 counts -1 rows
  for (int64_t t = 0; t < num_rows; ++t) {
    TORCH_CHECK(v[t] >= -1 && v[t] < num_adapters, "multi_lora: indices[", t, "] = ", v[t],
                " is out of range; expected -1 (no adapter) or an adapter in [0, ",
                num_adapters, ")");
    ++count[v[t] + 1];
  }
  AdapterGroups g;
  g.skipped.reserve(count[0]);
  std::vector<int64_t> start(num_adapters, 0);
  int64_t pos = 0;
  for (int64_t i = 0; i < num_adapters; ++i) {
    if (count[i + 1] == 0) continue;
    g.adapter.push_back(i);
    g.offset.push_back(pos);
    start[i] = pos;
    pos += count[i + 1];
  }
  g.offset.push_back(pos);
  g.order.resize(pos);
  for (int64_t t = 0; t < num_rows; ++t) {
    if (v[t] < 0) {
      g.skipped.push_back(t);
    } else {
      g.order[start[v[t]]++] = t;
    }
  }
  return g;
}

}  // namespace

AdapterGroups group_rows(const at::Tensor& indices, int64_t num_adapters) {
  // Read in their own type: no int64 copy per call (decode calls are a few microseconds).
  const at::Tensor idx = indices.contiguous();
  if (idx.scalar_type() == at::kInt)
    return group_rows_of(idx.const_data_ptr<int32_t>(), idx.numel(), num_adapters);
  const at::Tensor idx64 = idx.to(at::kLong);
  return group_rows_of(idx64.const_data_ptr<int64_t>(), idx64.numel(), num_adapters);
}

AdapterGroups single_group(int64_t num_rows) {
  AdapterGroups g;
  g.order.resize(num_rows);
  for (int64_t t = 0; t < num_rows; ++t) g.order[t] = t;
  if (num_rows > 0) {
    g.adapter = {0};
    g.offset = {0, num_rows};
  } else {
    g.offset = {0};
  }
  return g;
}

bool rows_invariant() { return at::globalContext().deterministicAlgorithms(); }

template <typename T>
void lora_rows_forward(const RowsProblem<T>& p, const AdapterGroups& groups) {
  using Acc = acc_t<T>;
  const MicroKernels<T>& mk = micro_kernels<T>();
  const int64_t num_groups = groups.size();
  int64_t max_rank = 0;
  for (int64_t g = 0; g < num_groups; ++g) max_rank = std::max(max_rank, p.ranks[groups.adapter[g]]);
  // The kernels below pick a shape of work by group size, and the shapes sum in different
  // orders: the dot-product shrink (small groups) and the panel shrink (large ones); the
  // dot-product expand (a few rows) and the packed one. Deterministic mode keeps one order
  // per op for every group: the dot-product shrink, and the packed expand's order (a small
  // group packs each block of B into a per-task tile). Measured cost: BENCHMARKS.md.
  const bool invariant = rows_invariant();

  const int64_t base_ld = p.base_ld < 0 ? p.ldy : p.base_ld;
  // Rows with no adapter: y = base (or 0).
  const int64_t row_bytes = p.out * static_cast<int64_t>(sizeof(T));
  const int64_t num_skipped = p.y == nullptr ? 0 : static_cast<int64_t>(groups.skipped.size());
  at::parallel_for(0, num_skipped, grain_for(num_skipped, num_skipped * p.out), [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t t = groups.skipped[s];
      if (p.base == nullptr) {
        std::memset(p.y + t * p.ldy, 0, row_bytes);
      } else if (p.base != p.y) {
        std::memcpy(p.y + t * p.ldy, p.base + t * base_ld, row_bytes);
      }
    }
  });
  if (num_groups == 0) return;

  auto group_rows_of = [&](int64_t g) { return groups.offset[g + 1] - groups.offset[g]; };

  // Groups of kPanelRows rows or more shrink from A packed in panels (shrink_panels, a
  // GEMM micro-kernel) where the build has one for the shape (panel_bytes > 0): packed
  // once per call, by group. Packing reads and writes all of A, which fewer rows do not
  // win back (W2's groups of about 12 rows: 0.142 -> 0.166 ms with panels, warm).
  constexpr int64_t kPanelRows = 64;
  std::vector<int64_t> panel_offset(num_groups, -1);  // in floats, into `panels`
  int64_t panel_floats = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t rank = p.ranks[groups.adapter[g]];
    const int64_t bytes = mk.panel_bytes(rank, p.in);
    if (invariant || group_rows_of(g) < kPanelRows || bytes == 0) continue;
    panel_offset[g] = panel_floats;
    panel_floats += bytes / static_cast<int64_t>(sizeof(float));
  }
  // 64-byte aligned (a panel step is one cache line); uninitialised: pack_at writes it all.
  const std::unique_ptr<float[]> panel_storage(panel_floats > 0 ? new float[panel_floats + 16]
                                                                : nullptr);
  float* const panels = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(panel_storage.get()) + 63) & ~uintptr_t(63));
  if (panel_floats > 0) {
    at::parallel_for(0, num_groups, grain_for(num_groups, panel_floats), [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        if (panel_offset[g] < 0) continue;
        const int64_t i = groups.adapter[g];
        mk.pack_at(p.a + i * p.a_stride, p.ranks[i], p.in, panels + panel_offset[g]);
      }
    });
  }

  // Shrink: xa[q] = A_i[:r] @ x[order[q]], in fp32, for chunks of rows of one adapter.
  constexpr int64_t kShrinkRows = 16;
  // Rows padded with zeros to a multiple of kXaPad, which expand_dot reads whole.
  const int64_t xa_stride = (max_rank + kXaPad - 1) / kXaPad * kXaPad;
  std::vector<Acc> xa(groups.order.size() * xa_stride);
  std::vector<std::pair<int64_t, int64_t>> shrink_items;  // (group, first position)
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t q = groups.offset[g]; q < groups.offset[g + 1]; q += kShrinkRows)
      shrink_items.emplace_back(g, q);
  // Multiply-adds of each phase, for the grain sizes.
  int64_t lora_work = 0;
  for (int64_t g = 0; g < num_groups; ++g)
    lora_work += (groups.offset[g + 1] - groups.offset[g]) * p.ranks[groups.adapter[g]];
  const int64_t num_shrink = static_cast<int64_t>(shrink_items.size());
  at::parallel_for(0, num_shrink, grain_for(num_shrink, lora_work * p.in), [&](int64_t lo, int64_t hi) {
    const T* x_rows[kShrinkRows];
    Acc* xa_rows[kShrinkRows];
    for (int64_t it = lo; it < hi; ++it) {
      const auto [g, q0] = shrink_items[it];
      const int64_t i = groups.adapter[g];
      const int64_t n = std::min(kShrinkRows, groups.offset[g + 1] - q0);
      for (int64_t k = 0; k < n; ++k) {
        x_rows[k] = p.x + groups.order[q0 + k] * p.in;
        xa_rows[k] = xa.data() + (q0 + k) * xa_stride;
      }
      if (panel_offset[g] >= 0) {
        mk.shrink_panels(x_rows, xa_rows, n, panels + panel_offset[g], p.ranks[i], p.in);
      } else {
        mk.shrink(x_rows, xa_rows, n, p.a + i * p.a_stride, p.ranks[i], p.in);
      }
    }
  });
  if (p.xa_out != nullptr) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t rank = p.ranks[groups.adapter[g]], ld = p.xa_ld > 0 ? p.xa_ld : rank;
      for (int64_t q = groups.offset[g]; q < groups.offset[g + 1]; ++q)
        std::memcpy(p.xa_out + groups.order[q] * ld, xa.data() + q * xa_stride, rank * sizeof(Acc));
    }
  }
  if (p.y == nullptr) return;

  // Expand: y[t] = base[t] + scale * B_i[:, :r] @ xa[t]. Two shapes of work:
  // - groups of at most kDotRows rows (decode): one item per (group, block of outputs),
  //   reading B in place with expand_dot (packing B would cost more than it saves;
  //   measured with callgrind on decode batches);
  // - larger groups (prefill): B_i packed (transposed) once per call, then one item per
  //   (group, chunk of rows) that walks the output blocks, so y and base are streamed
  //   row by row rather than in scattered column blocks.
  constexpr int64_t kDotRows = 3;
  constexpr int64_t kExpandRows = 16;
  const int64_t ob = mk.out_block;
  const int64_t num_blocks = (p.out + ob - 1) / ob;
  auto fill_rows = [&](int64_t q0, int64_t n, int64_t o0, const Acc** xa_rows, const T** base_rows,
                       T** y_rows) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t t = groups.order[q0 + k];
      xa_rows[k] = xa.data() + (q0 + k) * xa_stride;
      base_rows[k] = p.base ? p.base + t * base_ld + o0 : nullptr;
      y_rows[k] = p.y + t * p.ldy + o0;
    }
  };

  std::vector<int64_t> few_groups, packed_groups, packed_offset;
  int64_t packed_size = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (group_rows_of(g) <= kDotRows) {
      few_groups.push_back(g);
    } else {
      packed_groups.push_back(g);
      packed_offset.push_back(packed_size);
      packed_size += num_blocks * p.ranks[groups.adapter[g]] * ob;
    }
  }

  const int64_t num_few = static_cast<int64_t>(few_groups.size()) * num_blocks;
  at::parallel_for(0, num_few, grain_for(num_few, num_few * ob * max_rank), [&](int64_t lo, int64_t hi) {
    const Acc* xa_rows[kDotRows];
    const T* base_rows[kDotRows];
    T* y_rows[kDotRows];
    // Deterministic mode: this block of B packed here, then the packed expand.
    const std::unique_ptr<Acc[]> tile(invariant ? new Acc[max_rank * ob] : nullptr);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t g = few_groups[it / num_blocks], o0 = (it % num_blocks) * ob;
      const int64_t i = groups.adapter[g];
      fill_rows(groups.offset[g], group_rows_of(g), o0, xa_rows, base_rows, y_rows);
      if (invariant) {
        const int64_t nout = std::min(ob, p.out - o0);
        mk.pack_bt(p.b + i * p.b_stride + o0 * p.ldb, p.ldb, nout, p.ranks[i], tile.get());
        mk.expand(xa_rows, p.base ? base_rows : nullptr, y_rows, group_rows_of(g), tile.get(),
                  p.ranks[i], nout, p.scales[i]);
        continue;
      }
      // Adapter i's B ends at row `out`, so this is safe whatever follows it in memory.
      const int64_t b_readable = (p.out - o0) * p.ldb;
      mk.expand_dot(xa_rows, p.base ? base_rows : nullptr, y_rows, group_rows_of(g),
                    p.b + i * p.b_stride + o0 * p.ldb, p.ldb, b_readable, p.ranks[i],
                    std::min(ob, p.out - o0), p.scales[i]);
    }
  });
  if (packed_groups.empty()) return;

  // Uninitialised: pack_bt writes every element (zeroing a decode-sized call's megabyte
  // cost more than packing it).
  const std::unique_ptr<Acc[]> packed(new Acc[packed_size]);
  const int64_t num_pack = static_cast<int64_t>(packed_groups.size()) * num_blocks;
  at::parallel_for(0, num_pack, grain_for(num_pack, num_pack * ob * max_rank), [&](int64_t lo, int64_t hi) {
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t k = it / num_blocks, blk = it % num_blocks, o0 = blk * ob;
      const int64_t i = groups.adapter[packed_groups[k]], rank = p.ranks[i];
      mk.pack_bt(p.b + i * p.b_stride + o0 * p.ldb, p.ldb, std::min(ob, p.out - o0), rank,
                 packed.get() + packed_offset[k] + blk * rank * ob);
    }
  });

  std::vector<std::pair<int64_t, int64_t>> chunks;  // (index into packed_groups, first position)
  int64_t packed_work = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(packed_groups.size()); ++k) {
    const int64_t g = packed_groups[k];
    packed_work += group_rows_of(g) * p.ranks[groups.adapter[g]] * p.out;
    for (int64_t q = groups.offset[g]; q < groups.offset[g + 1]; q += kExpandRows) chunks.emplace_back(k, q);
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, num_chunks, grain_for(num_chunks, packed_work), [&](int64_t lo, int64_t hi) {
    const Acc* xa_rows[kExpandRows];
    const T* base_rows[kExpandRows];
    T* y_rows[kExpandRows];
    for (int64_t it = lo; it < hi; ++it) {
      const auto [k, q0] = chunks[it];
      const int64_t g = packed_groups[k], i = groups.adapter[g], rank = p.ranks[i];
      const int64_t n = std::min(kExpandRows, groups.offset[g + 1] - q0);
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t o0 = blk * ob;
        fill_rows(q0, n, o0, xa_rows, base_rows, y_rows);
        mk.expand(xa_rows, p.base ? base_rows : nullptr, y_rows, n,
                  packed.get() + packed_offset[k] + blk * rank * ob, rank,
                  std::min(ob, p.out - o0), p.scales[i]);
      }
    }
  });
}

template void lora_rows_forward<double>(const RowsProblem<double>&, const AdapterGroups&);
template void lora_rows_forward<float>(const RowsProblem<float>&, const AdapterGroups&);
template void lora_rows_forward<c10::Half>(const RowsProblem<c10::Half>&, const AdapterGroups&);
template void lora_rows_forward<c10::BFloat16>(const RowsProblem<c10::BFloat16>&,
                                               const AdapterGroups&);

// Not at::mm: ATen's GEMM runs these 16-wide shapes at a third of its rate, and its order
// of summing the rows is its own (lora_rows.h).
at::Tensor rank_outer(const at::Tensor& lhs, const at::Tensor& rhs, double scale) {
  const int64_t rows = rhs.size(0), n = rhs.size(1), rank = lhs.size(1);
  at::Tensor out = at::empty({rank, n}, lhs.options());
  LORA_EXT_DISPATCH_FLOATING_TYPES(rhs.scalar_type(), "rank_outer", [&] {
    using Acc = acc_t<scalar_t>;
    const MicroKernels<scalar_t>& mk = micro_kernels<scalar_t>();
    const int64_t cols = mk.outer_cols, blocks = (n + cols - 1) / cols;
    const Acc* l = lhs.const_data_ptr<Acc>();
    const scalar_t* r = rhs.const_data_ptr<scalar_t>();
    Acc* o = out.mutable_data_ptr<Acc>();
    // One call per task: each thread streams its column range of every row once.
    at::parallel_for(0, blocks, grain_for(blocks, rows * rank * n), [&](int64_t lo, int64_t hi) {
      const int64_t c0 = lo * cols, c1 = std::min(hi * cols, n);
      mk.rank_outer(l, rank, r + c0, n, rows, c1 - c0, static_cast<Acc>(scale), o + c0, n);
    });
  });
  return out;
}

namespace {

// ranks as int64 on the CPU, all R when absent; raises if one is outside [1, R].
at::Tensor checked_ranks(const std::optional<at::Tensor>& ranks, int64_t num_adapters,
                         int64_t max_rank) {
  if (!ranks.has_value() || !ranks->defined())
    return at::full({num_adapters}, max_rank, at::TensorOptions().dtype(at::kLong));
  at::Tensor r = ranks->to(at::kLong).contiguous();
  const int64_t* v = r.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < num_adapters; ++i)
    TORCH_CHECK(v[i] >= 1 && v[i] <= max_rank, "multi_lora: ranks[", i, "] = ", v[i],
                " is out of range; expected 1 <= rank <= R = a_stack.size(1) = ", max_rank);
  return r;
}

// The shared forward of multi_lora and multi_lora_add_: y[t] = base[t] + update, where
// base may be undefined (zeros) or y itself (in place; y may be a column slice).
void multi_lora_into(const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& b_in,
                     const at::Tensor& indices, const at::Tensor& scales_in,
                     const std::optional<at::Tensor>& ranks_in, const at::Tensor& base,
                     at::Tensor& y) {
  const int64_t num_adapters = a_in.size(0), max_rank = a_in.size(1);
  // Both raise on a bad value before y is touched.
  const at::Tensor ranks = checked_ranks(ranks_in, num_adapters, max_rank);
  const AdapterGroups groups = group_rows(indices, num_adapters);

  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t out = b.size(1);
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora", [&] {
    using Acc = acc_t<scalar_t>;
    const at::Tensor scales = scales_in.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    const RowsProblem<scalar_t> p{x.const_data_ptr<scalar_t>(),
                                  x.size(1),
                                  a.const_data_ptr<scalar_t>(),
                                  max_rank * x.size(1),
                                  b.const_data_ptr<scalar_t>(),
                                  out * max_rank,
                                  max_rank,
                                  out,
                                  scales.const_data_ptr<Acc>(),
                                  ranks.const_data_ptr<int64_t>(),
                                  !base.defined()     ? nullptr
                                  : base.is_same(y)   ? y_ptr
                                                      : base.const_data_ptr<scalar_t>(),
                                  y_ptr,
                                  y.size(0) > 1 ? y.stride(0) : out};
    lora_rows_forward(p, groups);
  });
}

}  // namespace

at::Tensor multi_lora(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& b_stack,
                      const at::Tensor& indices, const at::Tensor& scales,
                      const std::optional<at::Tensor>& ranks,
                      const std::optional<at::Tensor>& base_in) {
  check_multi_lora_args(x, a_stack, b_stack, indices, scales, ranks, base_in);
  const bool has_base = base_in.has_value() && base_in->defined();
  const at::Tensor base = has_base ? base_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), b_stack.size(1)}, x.options());
  multi_lora_into(x, a_stack, b_stack, indices, scales, ranks, base, y);
  return y;
}

void multi_lora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,
                     const at::Tensor& b_stack, const at::Tensor& indices,
                     const at::Tensor& scales, const std::optional<at::Tensor>& ranks) {
  check_multi_lora_add_args(y, x, a_stack, b_stack, indices, scales, ranks);
  multi_lora_into(x, a_stack, b_stack, indices, scales, ranks, y, y);
}

GradTuple3 multi_lora_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                               const at::Tensor& a_stack, const at::Tensor& b_stack,
                               const at::Tensor& indices, const at::Tensor& scales_in,
                               const std::optional<at::Tensor>& ranks_in,
                               std::array<bool, 3> output_mask) {
  check_multi_lora_backward_args(grad_in, x_in, a_stack, b_stack, indices, scales_in, ranks_in);
  const int64_t num_adapters = a_stack.size(0), max_rank = a_stack.size(1);
  const int64_t T = x_in.size(0), in = x_in.size(1), out = b_stack.size(1);
  const at::Tensor ranks = checked_ranks(ranks_in, num_adapters, max_rank);
  AdapterGroups groups = group_rows(indices, num_adapters);
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const auto [need_x, need_a, need_b] = output_mask;

  at::Tensor grad_x = need_x ? at::zeros_like(x) : x.new_empty({0});
  at::Tensor grad_a = need_a ? at::zeros_like(a_stack, at::MemoryFormat::Contiguous) : x.new_empty({0});
  at::Tensor grad_b = need_b ? at::zeros_like(b_stack, at::MemoryFormat::Contiguous) : x.new_empty({0});
  const int64_t num_groups = groups.size();
  if (num_groups == 0 || !(need_x || need_a || need_b)) return {grad_x, grad_a, grad_b};

  // The used adapters only, renumbered 0..num_groups-1 (a stack may hold many more).
  const std::vector<int64_t> adapter_of = groups.adapter;
  const at::Tensor used = at::tensor(adapter_of, at::TensorOptions().dtype(at::kLong));
  for (int64_t g = 0; g < num_groups; ++g) groups.adapter[g] = g;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scales = scales_in.to(acc).index_select(0, used).contiguous();
  const at::Tensor rank_of = ranks.index_select(0, used).contiguous();
  const at::Tensor order = at::from_blob(groups.order.data(),
                                         {static_cast<int64_t>(groups.order.size())},
                                         at::TensorOptions().dtype(at::kLong));
  // Row by row with the forward's kernels (so a row's grad_x does not depend on the rest
  // of the batch in deterministic mode), all in fp32, each gradient rounded once:
  // gb[t] = B_i^T g[t] (shrink), grad_x[t] = s_i A_i^T gb[t] (expand), xa[t] = A_i x[t];
  // then per adapter grad_A_i = s_i gb^T x and grad_B_i = s_i (xa^T g)^T over its rows,
  // summed in row order by rank_outer.
  at::Tensor gb, xa;
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_backward", [&] {
    using Acc = acc_t<scalar_t>;
    const Acc* s = scales.const_data_ptr<Acc>();
    const int64_t* r = rank_of.const_data_ptr<int64_t>();
    if (need_x || need_a) {
      const at::Tensor bt = b_stack.index_select(0, used).transpose(1, 2).contiguous();  // [U, R, out]
      const at::Tensor at_ = a_stack.index_select(0, used).transpose(1, 2).contiguous();  // [U, in, R]
      gb = at::empty({T, max_rank}, x.options().dtype(acc));
      RowsProblem<scalar_t> p{grad.const_data_ptr<scalar_t>(), out, bt.const_data_ptr<scalar_t>(),
                              max_rank * out, at_.const_data_ptr<scalar_t>(), in * max_rank,
                              max_rank, in, s, r, nullptr,
                              need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, in};
      p.xa_out = gb.mutable_data_ptr<Acc>();
      p.xa_ld = max_rank;
      lora_rows_forward(p, groups);
    }
    if (need_b) {
      const at::Tensor a_used = a_stack.index_select(0, used).contiguous();  // [U, R, in]
      xa = at::empty({T, max_rank}, x.options().dtype(acc));
      RowsProblem<scalar_t> p{x.const_data_ptr<scalar_t>(), in, a_used.const_data_ptr<scalar_t>(),
                              max_rank * in, nullptr, 0, 0, 0, s, r, nullptr, nullptr, 0};
      p.xa_out = xa.mutable_data_ptr<Acc>();
      p.xa_ld = max_rank;
      lora_rows_forward(p, groups);
    }
  });
  const int64_t* rank_ptr = rank_of.const_data_ptr<int64_t>();
  const at::Tensor scale_of = scales.to(at::kDouble);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t i = adapter_of[g], rk = rank_ptr[g];
    const double s = scale_of.const_data_ptr<double>()[g];
    const at::Tensor rows = order.slice(0, groups.offset[g], groups.offset[g + 1]);
    if (need_a) {
      const at::Tensor lhs = gb.index_select(0, rows).narrow(1, 0, rk).contiguous();  // [n, r]
      grad_a[i].narrow(0, 0, rk).copy_(rank_outer(lhs, x.index_select(0, rows), s));
    }
    if (need_b) {
      const at::Tensor lhs = xa.index_select(0, rows).narrow(1, 0, rk).contiguous();  // [n, r]
      grad_b[i].narrow(1, 0, rk).copy_(rank_outer(lhs, grad.index_select(0, rows), s).t());
    }
  }
  return {grad_x, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("multi_lora", &multi_lora);
  m.impl("multi_lora_add_", &multi_lora_add_);
  m.impl("multi_lora_backward", &multi_lora_backward);
}

}  // namespace lora_ext::cpu
