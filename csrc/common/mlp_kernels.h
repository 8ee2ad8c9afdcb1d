// Pieces shared by the MLP kernels (nested_mlp, routed_nested_mlp): the
// activation name parsed once, the hidden activation applied in place on a
// (rows, width) view of the pre-activations (no extra (N, F) buffer), or out of
// place, and its backward. Also used by the CUDA fallback paths.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace flextron {

enum class Activation { kSwiglu, kGelu, kGeluTanh, kRelu };

// `name` must already be validated (check_mlp_weights).
inline Activation parse_activation(const std::string& name) {
  if (name == "swiglu") return Activation::kSwiglu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  return Activation::kRelu;
}

// hidden = act(gate, up), written over `up`; `gate` (swiglu only) is clobbered.
// gate, up: (N, W) views, any strides.
// Taken by value: views are cheap handles, and the in-place ATen calls want lvalues.
inline void activate_(at::Tensor gate, at::Tensor up, Activation act) {
  switch (act) {
    case Activation::kSwiglu:
      up.mul_(at::silu_(gate));
      break;
    case Activation::kGelu:
      at::gelu_(up);
      break;
    case Activation::kGeluTanh:
      at::gelu_(up, "tanh");
      break;
    case Activation::kRelu:
      at::relu_(up);
      break;
  }
}

// hidden = act(gate, up) without touching gate/up. All (N, W) views.
inline void activation_out(at::Tensor hidden, const at::Tensor& gate, const at::Tensor& up,
                           Activation act) {
  switch (act) {
    case Activation::kSwiglu:
      at::mul_out(hidden, at::silu(gate), up);
      break;
    case Activation::kGelu:
      at::gelu_out(hidden, up);
      break;
    case Activation::kGeluTanh:
      at::gelu_out(hidden, up, "tanh");
      break;
    case Activation::kRelu:
      at::clamp_min_out(hidden, up, 0);
      break;
  }
}

// The activation's backward in place: up <- grad_up, gate <- grad_gate (swiglu).
inline void activation_backward_(at::Tensor gate, at::Tensor up, const at::Tensor& grad_hidden,
                                 Activation act) {
  switch (act) {
    case Activation::kSwiglu: {
      const at::Tensor grad_silu = grad_hidden * up;  // (N, W)
      at::mul_out(up, grad_hidden, at::silu(gate));
      gate.copy_(at::silu_backward(grad_silu, gate));
      break;
    }
    case Activation::kGelu:
      up.copy_(at::gelu_backward(grad_hidden, up));
      break;
    case Activation::kGeluTanh:
      up.copy_(at::gelu_backward(grad_hidden, up, "tanh"));
      break;
    case Activation::kRelu:
      up.copy_(at::threshold_backward(grad_hidden, up, 0));
      break;
  }
}

}  // namespace flextron
