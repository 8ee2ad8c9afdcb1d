// Pieces shared by the CPU MLP kernels (nested_mlp, routed_nested_mlp): the
// activation name parsed once, and the hidden activation applied in place on a
// (rows, width) view of the pre-activations, so no extra (N, F) buffer is made.
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

}  // namespace flextron
