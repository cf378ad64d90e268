// The grouped LoRA forward shared by multi_lora (many adapters) and lora_linear
// (one adapter over every row).
#pragma once

#include "cpu/microkernels.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lora_ext::cpu {

// Rows of a batch grouped by adapter (a stable counting sort, O(T + N)).
struct AdapterGroups {
  std::vector<int64_t> order;    // row ids, adapter by adapter
  std::vector<int64_t> adapter;  // adapter id of each group
  std::vector<int64_t> offset;   // group g is order[offset[g] .. offset[g + 1])
  std::vector<int64_t> skipped;  // rows with index -1

  int64_t size() const { return static_cast<int64_t>(adapter.size()); }
};

// Groups rows by indices (int32/int64, on the CPU); raises if a value is outside [-1, N).
AdapterGroups group_rows(const at::Tensor& indices, int64_t num_adapters);
// Every row in one group using adapter 0.
AdapterGroups single_group(int64_t num_rows);

// y[t] = base[t] + scales[i] * B_i[:, :ranks[i]] @ (A_i[:ranks[i]] @ x[t]) for the
// rows of each group (i its adapter), y[t] = base[t] (or 0) for skipped rows.
template <typename T>
struct RowsProblem {
  const T* x;          // [T, in]
  int64_t in;
  const T* a;          // adapter i's A rows at a + i * a_stride, row stride in
  int64_t a_stride;
  const T* b;          // adapter i's B at b + i * b_stride, row stride ldb
  int64_t b_stride;
  int64_t ldb;
  int64_t out;
  const acc_t<T>* scales;  // [N]
  const int64_t* ranks;  // [N]
  const T* base;       // [T, out] or null; may equal y (then y is updated in place)
  T* y;                // [T, out], or null: the shrink only (xa_out must be set)
  int64_t ldy;         // row stride of y (>= out; > out for a column slice)
  int64_t base_ld = -1;  // row stride of base: -1 the same as y's, 0 one row for all (a bias)
  // When set, receives the intermediate A_i[:rank] @ x[t] of every grouped row t at
  // xa_out + t * xa_ld (its rank's values; fp32, what the backward needs). Rows of no
  // group are not written.
  acc_t<T>* xa_out = nullptr;
  int64_t xa_ld = 0;
};

// Whether each row's result must not depend on the rest of the batch (its group's size,
// the other adapters, the thread count): under torch.use_deterministic_algorithms(True).
bool rows_invariant();

template <typename T>
void lora_rows_forward(const RowsProblem<T>& p, const AdapterGroups& groups);

// scale * lhs^T @ rhs as [r, n] in the acc dtype: a rank-r weight gradient, one pass over
// rhs, each column summed over the rows in order (threads split the columns, so the result
// does not depend on their number). lhs: [rows, r] acc dtype, contiguous; rhs: [rows, n]
// contiguous.
at::Tensor rank_outer(const at::Tensor& lhs, const at::Tensor& rhs, double scale);

}  // namespace lora_ext::cpu
