// CUDA kernels of DoRA (as csrc/cpu/dora.cpp):
// - dora_weight_norm: one block per output row o; each thread walks its columns k of
//   W[o] + scale * B[o] @ A[:, k], with B[o] in shared memory, rounds each element to T
//   (as a merged weight is) and sums its square in fp32; a block reduction gives the norm.
//   B @ A is never formed; A (r x in) stays in L2 across rows.
// - multi_dora_add_: multi_lora_add_, then an epilogue kernel applying each row's
//   row_scale and the bias.
#include "cuda/common.cuh"
#include "dispatch.h"
#include "ops.h"

#include <torch/library.h>

namespace lora_ext::cuda {
namespace {

constexpr int kNormThreads = 256;

template <typename T>
__global__ void weight_norm_kernel(const T* __restrict__ w, int64_t ldw, const T* __restrict__ a,
                                   const T* __restrict__ b, int64_t in, int64_t rank,
                                   acc_t<T> scale, acc_t<T>* __restrict__ norm) {
  using Acc = acc_t<T>;
  extern __shared__ unsigned char shared_raw[];
  Acc* b_row = reinterpret_cast<Acc*>(shared_raw);  // [rank]
  __shared__ Acc partial[kNormThreads / 32];
  const int64_t o = blockIdx.x;
  for (int64_t j = threadIdx.x; j < rank; j += blockDim.x) b_row[j] = to_acc(b[o * rank + j]);
  __syncthreads();
  Acc sum = 0;
  for (int64_t k = threadIdx.x; k < in; k += blockDim.x) {
    Acc d = 0;
    for (int64_t j = 0; j < rank; ++j) d = fma_acc(b_row[j], to_acc(a[j * in + k]), d);
    const Acc v = to_acc(from_acc<T>(fma_acc(scale, d, to_acc(w[o * ldw + k]))));
    sum = fma_acc(v, v, sum);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = 0;
    for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
    norm[o] = sqrt(total);
  }
}

template <typename T, typename I>
__global__ void dora_epilogue_kernel(T* __restrict__ y, int64_t ldy, int64_t rows, int64_t out,
                                     const I* __restrict__ indices,
                                     const acc_t<T>* __restrict__ row_scale,
                                     const T* __restrict__ bias) {
  using Acc = acc_t<T>;
  const int64_t t = blockIdx.y;
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= rows || o >= out) return;
  const int64_t i = static_cast<int64_t>(indices[t]);
  if (i < 0 && bias == nullptr) return;
  Acc v = to_acc(y[t * ldy + o]);
  if (i >= 0) v *= row_scale[i * out + o];
  if (bias != nullptr) v += to_acc(bias[o]);
  y[t * ldy + o] = from_acc<T>(v);
}

}  // namespace

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, double scale) {
  check_dora_weight_norm_args(weight, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t out = weight.size(0), in = weight.size(1), rank = lora_a.size(0);
  at::Tensor norm = at::empty({out}, weight.options().dtype(acc_dtype(weight.scalar_type())));
  if (out == 0) return norm;
  const at::Tensor a = lora_a.contiguous(), b = lora_b.contiguous();
  const int64_t ldw = out > 1 ? weight.stride(0) : in;
  LORA_EXT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "dora_weight_norm", [&] {
    using Acc = acc_t<scalar_t>;
    const size_t shared = static_cast<size_t>(rank) * sizeof(Acc);
    TORCH_CHECK(shared <= 48 * 1024, "dora_weight_norm: rank ", rank, " is too large for this kernel");
    weight_norm_kernel<scalar_t><<<out, kNormThreads, shared, at::cuda::getCurrentCUDAStream()>>>(
        weight.const_data_ptr<scalar_t>(), ldw, a.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), in, rank, static_cast<Acc>(scale),
        norm.mutable_data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return norm;
}

void multi_dora_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_stack,
                     const at::Tensor& b_stack, const at::Tensor& indices,
                     const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                     const at::Tensor& row_scale, const std::optional<at::Tensor>& bias) {
  check_multi_dora_add_args(y, x, a_stack, b_stack, indices, scales, ranks, row_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  // Validates indices and ranks before writing y.
  multi_lora_add_(y, x, a_stack, b_stack, indices, scales, ranks);
  const int64_t rows = y.size(0), out = y.size(1), ldy = rows > 1 ? y.stride(0) : out;
  if (rows == 0 || out == 0) return;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor g = row_scale.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor idx = indices.contiguous();
  const dim3 grid((out + 255) / 256, rows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  LORA_EXT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "multi_dora_add_", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* bp = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    if (idx.scalar_type() == at::kInt) {
      dora_epilogue_kernel<scalar_t, int32_t><<<grid, 256, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), ldy, rows, out, idx.const_data_ptr<int32_t>(),
          g.const_data_ptr<Acc>(), bp);
    } else {
      dora_epilogue_kernel<scalar_t, int64_t><<<grid, 256, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), ldy, rows, out, idx.const_data_ptr<int64_t>(),
          g.const_data_ptr<Acc>(), bp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dora_weight_norm", &dora_weight_norm);
  m.impl("multi_dora_add_", &multi_dora_add_);
}

}  // namespace lora_ext::cuda
