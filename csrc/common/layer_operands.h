// The operands of one decoder layer's seven projections, as decoder_layer takes them: the
// weights, and per projection an optional scale (int8 rows) and an optional bias. Shared by
// the composite (csrc/common/decoder_layer.cpp) and the CPU decode path
// (csrc/cpu/decoder_layer_decode.cpp), which differ only in how they run a projection.
#pragma once

#include <ATen/ATen.h>

namespace flextron {

// The projections in the order of decoder_layer's `weights` argument.
enum Projection : int64_t { kQ, kK, kV, kO, kGate, kUp, kDown, kProjections };

class LayerOperands {
 public:
  LayerOperands(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                const c10::List<std::optional<at::Tensor>>& biases)
      : weights_(weights), scales_(scales), biases_(biases) {}

  const at::Tensor& weight(Projection p) const { return weights_[p]; }
  std::optional<at::Tensor> scale(Projection p) const { return scales_.get(p); }
  std::optional<at::Tensor> bias(Projection p) const { return biases_.get(p); }

  // Whether the MLP can run as one fused nested_mlp: float weights, no biases.
  bool fused_mlp() const {
    for (const Projection p : {kGate, kUp, kDown}) {
      if (scales_.get(p).has_value() || biases_.get(p).has_value()) return false;
    }
    return true;
  }

 private:
  at::TensorList weights_;
  const c10::List<std::optional<at::Tensor>>& scales_;
  const c10::List<std::optional<at::Tensor>>& biases_;
};

}  // namespace flextron
