// The MLP's hidden activation for one element on the device, in fp32: shared by
// the CUDA MLP kernels (nested_mlp, routed_nested_mlp). Same formulas as
// torch.nn.functional (silu(g) * u, exact and tanh GELU, relu keeping NaN).
#pragma once

#include <cuda_runtime.h>

#include "cpu/mlp_kernels.h"

namespace flextron {

// `gate` is read only for swiglu.
__device__ __forceinline__ float apply_activation(Activation activation, float gate, float up) {
  switch (activation) {
    case Activation::kSwiglu:
      return gate / (1.f + expf(-gate)) * up;
    case Activation::kGelu:
      return 0.5f * up * (1.f + erff(up * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * up * (1.f + tanhf(0.79788456080286536f * (up + 0.044715f * up * up * up)));
    default:  // kRelu; NaN stays NaN, as in torch.relu
      return up < 0.f ? 0.f : up;
  }
}

}  // namespace flextron
