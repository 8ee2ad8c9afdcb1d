// nested_linear_int8 on CUDA: y = (x[..., :in] @ q[:out, :in]^T) * scale[:out] (+ bias[:out]).
//
// The int8 weights serve the CPU's decode, where the bytes streamed from memory decide
// the speed (csrc/cpu/nested_linear_int8.cpp). On a GPU this op keeps the same semantics
// so that an int8 model runs anywhere: one kernel widens the weight prefix to x's dtype
// with its row scale, and cuBLAS (at::addmm) multiplies. No host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "ops.h"

namespace flextron {
namespace {

// weight[n, k] = q[n * ldq + k] * scale[n] for n < rows, k < cols; one thread per element.
template <typename Element>
__global__ void dequantize_prefix(const int8_t* __restrict__ q, int64_t ldq, const float* __restrict__ scale,
                                  int64_t rows, int64_t cols, Element* __restrict__ weight) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t n = i / cols, k = i % cols;
  weight[i] = static_cast<Element>(static_cast<float>(q[n * ldq + k]) * scale[n]);
}

}  // namespace

at::Tensor nested_linear_int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& bias, int64_t out_features,
                                   int64_t in_features) {
  constexpr const char* op = "nested_linear_int8";
  check_nested_linear_int8_args(op, x, qweight, scale, bias, out_features, in_features);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor q = qweight.stride(1) == 1 ? qweight : qweight.contiguous();  // rows of unit stride
  const at::Tensor x_prefix = x.reshape({-1, x.size(-1)}).narrow(1, 0, in_features);  // (N, in)
  const at::Tensor scale_c = scale.contiguous();  // (O,)
  at::Tensor weight = at::empty({out_features, in_features}, x.options());  // (out, in)
  const int64_t elements = out_features * in_features;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dequantize_prefix", [&] {
    dequantize_prefix<scalar_t><<<static_cast<unsigned>((elements + 255) / 256), 256, 0, stream>>>(
        q.const_data_ptr<int8_t>(), q.stride(0), scale_c.const_data_ptr<float>(), out_features,
        in_features, weight.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  const at::Tensor y = bias.has_value() ? at::addmm(bias->narrow(0, 0, out_features), x_prefix, weight.t())
                                        : at::mm(x_prefix, weight.t());
  return y.view(shape);
}

}  // namespace flextron
