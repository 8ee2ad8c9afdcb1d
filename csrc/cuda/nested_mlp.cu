// nested_mlp on CUDA: the MLP restricted to its first `width` neurons,
//   y = act(x @ w_gate[:width]^T, x @ w_up[:width]^T) @ w_down[:, :width]^T,
// as three GEMMs on weight prefixes and one elementwise activation kernel.
//
// Why this shape: every GEMM is prefix_gemm_out (nested_linear.cu), which reads
// the weight prefix in place through the weight's own leading dimension
// (w_up/w_gate rows [0, width) with ldb = D; w_down columns [0, width) with
// ldb = F), so a narrower MLP costs proportionally less and no weight is copied
// or masked. It is CUTLASS (bf16/fp16 tensor-op, fp32 exact SIMT) when sizes and
// pointers are 16-byte aligned (D and width multiples of 8 for 16-bit types), else
// cuBLAS on the same strided views. Reusing that one GEMM means this file
// instantiates no CUTLASS template at all: it compiles in seconds.
//
// The activation runs once over the (N, width) hidden tensor, in fp32, written
// over `up` (no extra buffer): one read of gate and up, one write. Fusing it into
// the first GEMM's epilogue would save that pass but needs a CUTLASS
// instantiation per (dtype, activation); the pass is memory-bound and small next
// to the GEMMs (N x width elements against N x width x D multiply-adds).
//
// Backward: the autograd formula in flextron/ops.py (ATen matmuls on the same
// prefix views, hidden activations recomputed), which runs on CUDA as it is.
// Versions: v1 (current) three prefix GEMMs + one activation pass.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "common/checks.h"
#include "common/mlp_kernels.h"
#include "cuda/activation.cuh"
#include "cuda/prefix_gemm.h"
#include "ops.h"

namespace flextron {
namespace {

constexpr int kThreads = 256;

// up[i] = act(gate[i], up[i]) for i < count; gate is null for the ungated activations.
template <typename scalar_t>
__global__ void activate_in_place(const scalar_t* __restrict__ gate, scalar_t* __restrict__ up,
                                  int64_t count, Activation activation) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    const float g = gate == nullptr ? 0.f : static_cast<float>(gate[i]);
    up[i] = static_cast<scalar_t>(apply_activation(activation, g, static_cast<float>(up[i])));
  }
}

// hidden = act(gate, up) over `up`; both contiguous (N, width), gate undefined if ungated.
void activate_cuda_(const at::Tensor& gate, at::Tensor& up, Activation activation) {
  const int64_t count = up.numel();
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const auto blocks = static_cast<unsigned>(std::min((count + kThreads - 1) / kThreads, max_blocks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, up.scalar_type(), "nested_mlp", [&] {
    activate_in_place<scalar_t><<<blocks, kThreads, 0, stream>>>(
        gate.defined() ? gate.const_data_ptr<scalar_t>() : nullptr, up.mutable_data_ptr<scalar_t>(),
        count, activation);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor nested_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                           const at::Tensor& w_up, const at::Tensor& w_down, int64_t width,
                           const std::string& activation) {
  constexpr const char* op = "nested_mlp";
  check_nested_mlp_args(op, x, w_gate, w_up, w_down, width, activation);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor x2 = x.reshape({-1, x.size(-1)});  // (N, D), a view whenever x allows one
  const int64_t rows = x2.size(0), hidden = x2.size(1);
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), op, ": x has ", rows,
              " rows, more than a CUTLASS GEMM takes");
  at::Tensor y = at::empty({rows, hidden}, x.options());  // (N, D)
  if (rows == 0 || hidden == 0) return y.view(x.sizes());  // nothing to compute

  at::Tensor up = at::empty({rows, width}, x.options());  // (N, width): up, then hidden
  prefix_gemm_out(up, x2, w_up, std::nullopt, width, hidden, op);
  at::Tensor gate;
  if (w_gate.has_value()) {
    gate = at::empty({rows, width}, x.options());  // (N, width)
    prefix_gemm_out(gate, x2, *w_gate, std::nullopt, width, hidden, op);
  }
  activate_cuda_(gate, up, parse_activation(activation));
  prefix_gemm_out(y, up, w_down, std::nullopt, hidden, width, op);  // (N, D)
  return y.view(x.sizes());
}

}  // namespace flextron
