// DecodePlan: a model's decoder layers on a KV cache in one call (decode_plan.cpp), registered
// as torch.classes.flextron.DecodePlan (registration.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>

#include <optional>
#include <vector>

namespace flextron {

// The decoder_layer op, as its schema types it.
using DecoderLayerFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                                  const c10::List<std::optional<at::Tensor>>&,
                                  const c10::List<std::optional<at::Tensor>>&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double);

// add_layer once per layer with its decoder_layer operands (in layer order), then
// run(x, cos, sin, length) per step: every layer's decoder_layer in turn, x (B, T, D) -> (B, T, D).
class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan();
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> weights,
                 c10::List<std::optional<at::Tensor>> scales, c10::List<std::optional<at::Tensor>> biases,
                 at::Tensor k_cache, at::Tensor v_cache, int64_t heads, int64_t width, double eps);
  at::Tensor run(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t length);

 private:
  struct Layer {
    at::Tensor input_norm, post_norm;
    std::vector<at::Tensor> weights;
    c10::List<std::optional<at::Tensor>> scales, biases;
    at::Tensor k_cache, v_cache;
    int64_t heads, width;
    double eps;
  };
  std::vector<Layer> layers_;
  c10::TypedOperatorHandle<DecoderLayerFn> op_;
};

}  // namespace flextron
