// CUDA multi_lora. Decode (few rows): one kernel pair reading each row's adapter
// with 16-byte loads (BGMV-like). Prefill (many rows): rows grouped by adapter on the
// device and fed to the tiled row GEMMs (SGMV-like). Neither syncs with the host nor
// sizes a grid from data, so both are safe inside CUDA-graph capture.
#include "cuda/rows.cuh"
#include "dispatch.h"
#include "ops.h"

#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <torch/library.h>

namespace lora_ext::cuda {
namespace {

// Up to this many rows the decode kernels win: re-reading an adapter shared by a
// few rows hits L2, and no grouping pass is needed.
constexpr int64_t kDecodeMaxRows = 128;
constexpr int kShrinkWarps = 4;
constexpr int kExpandThreads = 256;
constexpr int kGroupThreads = 1024;

// ---------------------------------------------------------------------------
// indices / ranks: copied to int32 with out-of-range values replaced (-1 for an
// index, rank 0 for a rank) and a flag raised, so kernels never read out of bounds.

template <typename I>
__global__ void prepare_values_kernel(const I* in, int64_t n, int64_t lo, int64_t hi,
                                      int invalid, int* out, int* flag) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(in[t]);
    const bool ok = v >= lo && v <= hi;
    out[t] = ok ? static_cast<int>(v) : invalid;
    if (!ok) *flag = 1;
  }
}

at::Tensor prepare_values(const at::Tensor& values, int64_t lo, int64_t hi, int invalid,
                          int* flag) {
  const at::Tensor v = values.contiguous();
  at::Tensor out = at::empty({v.numel()}, v.options().dtype(at::kInt));
  if (v.numel() == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(v.numel(), 256), 1024));
  AT_DISPATCH_INDEX_TYPES(v.scalar_type(), "lora_ext_prepare_values", [&] {
    prepare_values_kernel<index_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.const_data_ptr<index_t>(), v.numel(), lo, hi, invalid, out.mutable_data_ptr<int>(),
        flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

struct Prepared {
  at::Tensor indices;  // int32 [T], values in [-1, N)
  at::Tensor ranks;    // int32 [N], values in [0, R]; undefined: all R
  const int* ranks_ptr() const { return ranks.defined() ? ranks.const_data_ptr<int>() : nullptr; }
};

// Raises (naming the first bad entry) when an index or a rank is out of range. That
// needs a host sync, so it is skipped while the stream is being captured into a CUDA
// graph; the kernels then treat bad entries as "no adapter".
Prepared prepare_indices(const at::Tensor& indices, const std::optional<at::Tensor>& ranks,
                         int64_t N, int64_t R, const char* op) {
  at::Tensor flags = at::zeros({2}, indices.options().dtype(at::kInt));
  Prepared p;
  p.indices = prepare_values(indices, -1, N - 1, -1, flags.mutable_data_ptr<int>());
  const bool has_ranks = ranks.has_value() && ranks->defined();
  if (has_ranks) p.ranks = prepare_values(*ranks, 1, R, 0, flags.mutable_data_ptr<int>() + 1);
  if (at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None) return p;
  const at::Tensor host = flags.cpu();
  const int* f = host.const_data_ptr<int>();
  if (f[0] != 0) {
    const at::Tensor bad = at::logical_or(indices.lt(-1), indices.ge(N)).nonzero();
    const int64_t t = bad[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": indices[", t, "] = ", indices[t].item<int64_t>(),
                " is out of range; expected -1 (no adapter) or an adapter in [0, ", N, ")");
  }
  if (f[1] != 0) {
    const at::Tensor bad = at::logical_or(ranks->lt(1), ranks->gt(R)).nonzero();
    const int64_t i = bad[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": ranks[", i, "] = ", (*ranks)[i].item<int64_t>(),
                " is out of range; expected 1 <= rank <= R = a_stack.size(1) = ", R);
  }
  return p;
}

// ---------------------------------------------------------------------------
// Grouping rows by adapter: one block builds a counting sort of the rows (perm),
// per-adapter offsets, and groups of at most kGroupRows rows of one adapter.

// Exclusive prefix sum over the block; *total gets the block's sum. Every thread calls it.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int s = lane < num_warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += u;
    }
    if (lane < num_warps) warp_sums[lane] = s;  // inclusive over warps
  }
  __syncthreads();
  *total = warp_sums[num_warps - 1];
  const int excl = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - v;
  __syncthreads();  // warp_sums is reused by the next call
  return excl;
}

// counts must be zero on entry. Rows are placed in row order within each adapter (a
// stable sort), so weight gradients, which sum an adapter's rows in perm's order, come
// out the same on every run.
__global__ void __launch_bounds__(kGroupThreads)
    group_rows_kernel(const int* indices, int64_t T, int64_t N, int* counts, int* offsets,
                      int* cursor, int* perm, int* groups, int* num_groups) {
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int i = sanitize_index(indices[t], N);
    if (i >= 0) atomicAdd(&counts[i], 1);
  }
  __syncthreads();
  int row_base = 0, group_base = 0;
  for (int64_t c0 = 0; c0 < N; c0 += blockDim.x) {
    const int64_t i = c0 + threadIdx.x;
    const int cnt = i < N ? counts[i] : 0;
    const int ng = (cnt + kGroupRows - 1) / kGroupRows;
    int row_total, group_total;
    const int row_off = row_base + block_exclusive_scan(cnt, &row_total);
    const int group_off = group_base + block_exclusive_scan(ng, &group_total);
    if (i < N) {
      offsets[i] = row_off;
      cursor[i] = row_off;
      for (int j = 0; j < ng; ++j) {
        int* gp = groups + 3 * (static_cast<int64_t>(group_off) + j);
        gp[0] = row_off + j * kGroupRows;
        gp[1] = min(kGroupRows, cnt - j * kGroupRows);
        gp[2] = static_cast<int>(i);
      }
    }
    row_base += row_total;
    group_base += group_total;
  }
  if (threadIdx.x == 0) {
    offsets[N] = row_base;
    *num_groups = group_base;
  }
  __syncthreads();
  // Chunks of blockDim rows; in each, the warps take turns, and within a warp the lanes of
  // one adapter (__match_any_sync) take consecutive places in lane order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t c0 = 0; c0 < T; c0 += blockDim.x) {
    const int64_t t = c0 + threadIdx.x;
    const int i = t < T ? sanitize_index(indices[t], N) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, i);
    const int leader = __ffs(peers) - 1;
    const int before = __popc(peers & lanes_below);
    for (int w = 0; w < num_warps; ++w) {
      if (warp == w && i >= 0) {  // every lane of `peers` is here
        int base = 0;
        if (lane == leader) {
          base = cursor[i];
          cursor[i] = base + __popc(peers);
        }
        base = __shfl_sync(peers, base, leader);
        perm[base + before] = static_cast<int>(t);
      }
      __syncthreads();  // cursor's new values, for the next warp
    }
  }
}

struct Grouping {
  at::Tensor workspace;
  RowGroups groups;
  const int* perm;
  const int* offsets;  // [N + 1]
};

Grouping group_rows(const at::Tensor& idx32, int64_t T, int64_t N) {
  const int64_t max_g = ceil_div(T, kGroupRows) + std::min(T, N);
  // counts | offsets | cursor | perm | groups | num_groups (counts must start at zero)
  Grouping g;
  g.workspace = at::zeros({N + (N + 1) + N + T + 3 * max_g + 1}, idx32.options());
  int* counts = g.workspace.mutable_data_ptr<int>();
  int* offsets = counts + N;
  int* cursor = offsets + N + 1;
  int* perm = cursor + N;
  int* groups = perm + T;
  int* num_groups = groups + 3 * max_g;
  group_rows_kernel<<<1, kGroupThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      idx32.const_data_ptr<int>(), T, N, counts, offsets, cursor, perm, groups, num_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  g.groups = RowGroups{perm, groups, num_groups, T};
  g.perm = perm;
  g.offsets = offsets;
  return g;
}

// ---------------------------------------------------------------------------
// Decode kernels.

// h[t, k] = scales[i] * dot(x[t], A[i, k]) for k < rank_i, i = indices[t] >= 0.
// One warp per (row, k); blockIdx.y picks kShrinkWarps consecutive k.
template <typename T, bool Vec>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    decode_shrink_kernel(const T* __restrict__ x, const T* __restrict__ a,
                         const int* __restrict__ indices, const int* __restrict__ ranks,
                         const acc_t<T>* __restrict__ scales, acc_t<T>* __restrict__ h,
                         int64_t in, int64_t N, int R) {
  using Acc = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k = blockIdx.y * kShrinkWarps + warp;
  const int i = sanitize_index(indices[t], N);
  if (i < 0 || k >= adapter_rank(ranks, i, R)) return;  // whole warps leave together
  const T* xr = x + t * in;
  const T* ar = a + (static_cast<int64_t>(i) * R + k) * in;
  Acc acc = 0;
  if constexpr (Vec) {
    constexpr int V = kVec<T>, U = 4;  // U vectors in flight per lane
    const int64_t nv = in / V;
    int64_t v = lane;
    for (; v + (U - 1) * 32 < nv; v += U * 32) {
      Acc av[U][V], xv[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        load_vec(ar + (v + u * 32) * V, av[u]);
        load_vec(xr + (v + u * 32) * V, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int e = 0; e < V; ++e) acc = fma_acc(av[u][e], xv[u][e], acc);
    }
    for (; v < nv; v += 32) {
      Acc av[V], xv[V];
      load_vec(ar + v * V, av);
      load_vec(xr + v * V, xv);
#pragma unroll
      for (int e = 0; e < V; ++e) acc = fma_acc(av[e], xv[e], acc);
    }
  } else {
    for (int64_t j = lane; j < in; j += 32) acc = fma_acc(to_acc(ar[j]), to_acc(xr[j]), acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) h[t * R + k] = acc * scales[i];
}

// y[t, o] = base[t, o] (or 0) + sum_{k < rank_i} h[t, k] * B[i, o, k]; rows with no
// adapter get base (or 0). y and base share the row stride ldy; base may be y itself
// (in place). One thread per output element.
template <typename T, bool Vec>
__global__ void __launch_bounds__(kExpandThreads)
    decode_expand_kernel(const acc_t<T>* __restrict__ h, const T* __restrict__ b,
                         const int* __restrict__ indices, const int* __restrict__ ranks,
                         const T* base, T* y, int64_t out, int64_t ldy, int64_t N, int R) {
  using Acc = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= out) return;
  const int i = sanitize_index(indices[t], N);
  if (i < 0 && base == y) return;  // in place: nothing to add
  Acc acc = 0;
  if (i >= 0) {
    const int rank = adapter_rank(ranks, i, R);
    const Acc* hr = h + t * R;
    const T* br = b + (static_cast<int64_t>(i) * out + o) * R;
    if constexpr (Vec) {
      // R % V == 0, so the vector holding k = rank - 1 still lies inside the row.
      constexpr int V = kVec<T>;
      for (int k0 = 0; k0 < rank; k0 += V) {
        Acc bv[V];
        load_vec(br + k0, bv);
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (k0 + e < rank) acc = fma_acc(hr[k0 + e], bv[e], acc);
      }
    } else {
      for (int k = 0; k < rank; ++k) acc = fma_acc(hr[k], to_acc(br[k]), acc);
    }
  }
  const Acc b0 = base != nullptr ? to_acc(base[t * ldy + o]) : Acc(0);
  y[t * ldy + o] = from_acc<T>(b0 + acc);
}

// base: null, a [T, out] tensor with row stride ldy, or y itself.
template <typename T>
void decode_forward(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                    const Prepared& p, const acc_t<T>* scales, const T* base, T* y,
                    int64_t ldy) {
  const int64_t T_ = x.size(0), in = x.size(1), N = a.size(0), out = b.size(1);
  const int R = static_cast<int>(a.size(1));
  at::Tensor h = at::empty({T_, R}, x.options().dtype(acc_dtype(x.scalar_type())));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = x.const_data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  const int* idx = p.indices.const_data_ptr<int>();
  const int* ranks = p.ranks_ptr();
  acc_t<T>* hp = h.mutable_data_ptr<acc_t<T>>();

  const dim3 sgrid(static_cast<unsigned>(T_), static_cast<unsigned>(ceil_div(R, kShrinkWarps)));
  const bool vec_a = in % kVec<T> == 0 && aligned16(xp) && aligned16(ap);
  LORA_EXT_BOOL_SWITCH(vec_a, kVecA, [&] {
    decode_shrink_kernel<T, kVecA><<<sgrid, kShrinkWarps * 32, 0, stream>>>(
        xp, ap, idx, ranks, scales, hp, in, N, R);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 egrid(static_cast<unsigned>(T_), static_cast<unsigned>(ceil_div(out, kExpandThreads)));
  const bool vec_b = R % kVec<T> == 0 && aligned16(bp);
  LORA_EXT_BOOL_SWITCH(vec_b, kVecB, [&] {
    decode_expand_kernel<T, kVecB><<<egrid, kExpandThreads, 0, stream>>>(
        hp, bp, idx, ranks, base, y, out, ldy, N, R);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Prefill: rows grouped by adapter, then y[t] += update for rows with an adapter
// (row stride ldy); rows with none are not touched.
template <typename T>
void prefill_add(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                 const Prepared& p, const acc_t<T>* scales, T* y, int64_t ldy) {
  using Acc = acc_t<T>;
  const int64_t T_ = x.size(0), in = x.size(1), N = a.size(0), R = a.size(1), out = b.size(1);
  const Grouping g = group_rows(p.indices, T_, N);
  at::Tensor h = at::empty({T_, R}, x.options().dtype(acc_dtype(x.scalar_type())));
  launch_shrink<T, true>(g.groups, T_, N, x.const_data_ptr<T>(), in, in,
                         AdapterOperand<T>{a.const_data_ptr<T>(), R * in, in, 1}, p.ranks_ptr(),
                         static_cast<int>(R), scales, h.mutable_data_ptr<Acc>(), R);
  launch_expand<T, true, true>(g.groups, T_, N, h.const_data_ptr<Acc>(), R,
                               AdapterOperand<T>{b.const_data_ptr<T>(), out * R, R, 1},
                               p.ranks_ptr(), static_cast<int>(R), out, y, ldy, nullptr, Acc(1));
}

void check_sizes(int64_t T, int64_t N, int64_t R, int64_t out, const char* op) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(T < kMax && N < kMax && R < kMax, op,
              ": T, N and R must each be below 2^31 on CUDA, got T = ", T, ", N = ", N,
              ", R = ", R);
  TORCH_CHECK(ceil_div(out, kExpandThreads) <= 65535 && ceil_div(R, kShrinkWarps) <= 65535, op,
              ": out (", out, ") or R (", R, ") too large for the CUDA kernels");
}

}  // namespace

at::Tensor multi_lora(const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& b_in,
                      const at::Tensor& indices, const at::Tensor& scales_in,
                      const std::optional<at::Tensor>& ranks_in,
                      const std::optional<at::Tensor>& base_in) {
  check_multi_lora_args(x_in, a_in, b_in, indices, scales_in, ranks_in, base_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = x_in.size(0), N = a_in.size(0), R = a_in.size(1);
  const int64_t out = b_in.size(1);
  check_sizes(T, N, R, out, "multi_lora");
  const Prepared p = prepare_indices(indices, ranks_in, N, R, "multi_lora");
  const bool has_base = base_in.has_value() && base_in->defined();
  if (T == 0 || out == 0) return at::empty({T, out}, x_in.options());

  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const auto acc_type = acc_dtype(x.scalar_type());
  const at::Tensor scales = scales_in.to(acc_type).contiguous();
  at::Tensor y;
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora", [&] {
    using T_ = scalar_t;
    using Acc = acc_t<T_>;
    // The decode kernels split each row's sum over a warp, in another order than the
    // tiled ones: deterministic mode takes the tiled kernels for every T.
    if (T <= kDecodeMaxRows && !rows_invariant()) {
      const at::Tensor base = has_base ? base_in->contiguous() : at::Tensor();
      y = at::empty({T, out}, x.options());
      decode_forward<T_>(x, a, b, p, scales.const_data_ptr<Acc>(),
                         has_base ? base.const_data_ptr<T_>() : nullptr, y.mutable_data_ptr<T_>(),
                         out);
      return;
    }
    // Rows without an adapter keep base (or zero); the others get the update added.
    y = has_base ? base_in->clone(at::MemoryFormat::Contiguous) : at::zeros({T, out}, x.options());
    prefill_add<T_>(x, a, b, p, scales.const_data_ptr<Acc>(), y.mutable_data_ptr<T_>(), out);
  });
  return y;
}

void multi_lora_add_(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a_in,
                     const at::Tensor& b_in, const at::Tensor& indices,
                     const at::Tensor& scales_in, const std::optional<at::Tensor>& ranks_in) {
  check_multi_lora_add_args(y, x_in, a_in, b_in, indices, scales_in, ranks_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = x_in.size(0), N = a_in.size(0), R = a_in.size(1), out = b_in.size(1);
  check_sizes(T, N, R, out, "multi_lora_add_");
  // Raises on a bad index or rank before y is touched.
  const Prepared p = prepare_indices(indices, ranks_in, N, R, "multi_lora_add_");
  if (T == 0 || out == 0) return;
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor scales = scales_in.to(acc_dtype(x.scalar_type())).contiguous();
  const int64_t ldy = T > 1 ? y.stride(0) : out;
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_add_", [&] {
    using Acc = acc_t<scalar_t>;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (T <= kDecodeMaxRows && !rows_invariant()) {
      decode_forward<scalar_t>(x, a, b, p, scales.const_data_ptr<Acc>(), yp, yp, ldy);
    } else {
      prefill_add<scalar_t>(x, a, b, p, scales.const_data_ptr<Acc>(), yp, ldy);
    }
  });
}

GradTuple3 multi_lora_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                               const at::Tensor& a_in, const at::Tensor& b_in,
                               const at::Tensor& indices, const at::Tensor& scales_in,
                               const std::optional<at::Tensor>& ranks_in,
                               std::array<bool, 3> output_mask) {
  check_multi_lora_backward_args(grad_in, x_in, a_in, b_in, indices, scales_in, ranks_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = x_in.size(0), in = x_in.size(1), N = a_in.size(0), R = a_in.size(1);
  const int64_t out = b_in.size(1);
  check_sizes(T, N, R, out, "multi_lora_backward");
  const Prepared p = prepare_indices(indices, ranks_in, N, R, "multi_lora_backward");
  const auto [need_x, need_a, need_b] = output_mask;

  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor g = grad_in.contiguous();
  const auto acc_type = acc_dtype(x.scalar_type());
  const at::Tensor scales = scales_in.to(acc_type).contiguous();
  const at::Tensor empty = x.new_empty({0});
  at::Tensor grad_x = need_x ? at::zeros_like(x) : empty;
  at::Tensor grad_a = need_a ? at::zeros_like(a) : empty;
  at::Tensor grad_b = need_b ? at::zeros_like(b) : empty;
  if (T == 0 || !(need_x || need_a || need_b)) return {grad_x, grad_a, grad_b};

  const Grouping grp = group_rows(p.indices, T, N);
  const int* ranks = p.ranks_ptr();
  const int Ri = static_cast<int>(R);
  LORA_EXT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_backward", [&] {
    using T_ = scalar_t;
    using Acc = acc_t<T_>;
    const Acc* sc = scales.const_data_ptr<Acc>();
    const T_* xp = x.const_data_ptr<T_>();
    const T_* gp = g.const_data_ptr<T_>();
    const AdapterOperand<T_> a_rows{a.const_data_ptr<T_>(), R * in, in, 1};  // A_i(k=j, n=r)
    const AdapterOperand<T_> a_cols{a.const_data_ptr<T_>(), R * in, 1, in};  // A_i(k=r, n=j)
    const AdapterOperand<T_> b_cols{b.const_data_ptr<T_>(), out * R, 1, R};  // B_i(k=o, n=r)
    // us[t, r] = scale_i * (g_t B_i)[r]: shared by grad_x and grad_a.
    at::Tensor us;
    if (need_x || need_a) {
      us = at::empty({T, R}, x.options().dtype(acc_type));
      launch_shrink<T_, false>(grp.groups, T, N, gp, out, out, b_cols, ranks, Ri, sc,
                               us.mutable_data_ptr<Acc>(), R);
    }
    if (need_x) {
      launch_expand<T_, false, true>(grp.groups, T, N, us.const_data_ptr<Acc>(), R, a_cols,
                                     ranks, Ri, in, grad_x.mutable_data_ptr<T_>(), in, nullptr,
                                     Acc(1));
    }
    if (need_a) {
      // grad_A_i[r, j] = sum over its rows of us[t, r] x[t, j]
      launch_weight_grad<T_, Acc, T_>(grp.perm, grp.offsets, N, us.const_data_ptr<Acc>(), R,
                                        xp, in, grad_a.mutable_data_ptr<T_>(), R * in, in, ranks,
                                        Ri, /*m_is_rank=*/true, R, /*n_is_rank=*/false, in);
    }
    if (need_b) {
      // hs[t, r] = scale_i * (A_i x_t)[r]; grad_B_i[o, r] = sum over its rows of g[t, o] hs[t, r]
      at::Tensor hs = at::empty({T, R}, x.options().dtype(acc_type));
      launch_shrink<T_, true>(grp.groups, T, N, xp, in, in, a_rows, ranks, Ri, sc,
                              hs.mutable_data_ptr<Acc>(), R);
      launch_weight_grad<T_, T_, Acc>(grp.perm, grp.offsets, N, gp, out,
                                      hs.const_data_ptr<Acc>(), R,
                                        grad_b.mutable_data_ptr<T_>(), out * R, R, ranks, Ri,
                                        /*m_is_rank=*/false, out, /*n_is_rank=*/true, R);
    }
  });
  return {grad_x, grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("multi_lora", &multi_lora);
  m.impl("multi_lora_add_", &multi_lora_add_);
  m.impl("multi_lora_backward", &multi_lora_backward);
}

}  // namespace lora_ext::cuda
