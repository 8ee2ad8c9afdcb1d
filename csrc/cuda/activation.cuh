// The MLP's hidden activation for one element on the device, in fp32, and its
// gradient: shared by the CUDA MLP kernels (nested_mlp, routed_nested_mlp). Same formulas as
// torch.nn.functional (silu(g) * u, exact and tanh GELU, relu keeping NaN).
#pragma once

#include <cuda_runtime.h>

#include "common/mlp_kernels.h"

namespace flextron {

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// `gate` is read only for swiglu.
__device__ __forceinline__ float apply_activation(Activation activation, float gate, float up) {
  switch (activation) {
    case Activation::kSwiglu:
      return gate * sigmoid(gate) * up;
    case Activation::kGelu:
      return 0.5f * up * (1.f + erff(up * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * up * (1.f + tanhf(0.79788456080286536f * (up + 0.044715f * up * up * up)));
    default:  // kRelu; NaN stays NaN, as in torch.relu
      return up < 0.f ? 0.f : up;
  }
}

// d hidden / d up (times gh) and d hidden / d gate (times gh, swiglu only), as ATen's
// silu_backward / gelu_backward / threshold_backward compute them.
__device__ __forceinline__ void activation_grad(Activation activation, float g, float u, float gh,
                                                float& grad_up, float& grad_gate) {
  grad_gate = 0.f;
  switch (activation) {
    case Activation::kSwiglu: {
      const float sig = sigmoid(g);
      grad_up = gh * g * sig;
      grad_gate = gh * u * sig * (1.f + g * (1.f - sig));
      return;
    }
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * u * u);
      grad_up = gh * (cdf + u * pdf);
      return;
    }
    case Activation::kGeluTanh: {
      constexpr float kBeta = 0.79788456080286536f, kKappa = 0.044715f;
      const float t = tanhf(kBeta * (u + kKappa * u * u * u));
      const float dinner = kBeta * (1.f + 3.f * kKappa * u * u);
      grad_up = gh * (0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * dinner);
      return;
    }
    default:  // kRelu: threshold_backward(gh, u, 0)
      grad_up = u <= 0.f ? 0.f : gh;
      return;
  }
}

}  // namespace flextron
