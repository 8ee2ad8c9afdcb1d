// DecodePlan (torch.classes.flextron.DecodePlan): a model's layers on a KV cache in one call,
// each layer's decoder_layer with the operands it was given once, at prefill.
//
// Why: called from Python, each decoder_layer costs ~10 us of argument conversion (21
// tensors) and dispatch before any work, and the Python around it a few more: at batch 1,
// where a SmolLM2 layer streams its weights in 100-250 us, that is 5-10% of a decode step.
// Here the layers' calls go through the dispatcher from C++ (the op's own kernels, autograd
// and profiling, as from Python), with their operands held by the plan.
#include "common/decode_plan.h"

#include <utility>

namespace flextron {

DecodePlan::DecodePlan()
    : op_(c10::Dispatcher::singleton().findSchemaOrThrow("flextron::decoder_layer", "").typed<DecoderLayerFn>()) {}

void DecodePlan::add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> weights,
                           c10::List<std::optional<at::Tensor>> scales, c10::List<std::optional<at::Tensor>> biases,
                           at::Tensor k_cache, at::Tensor v_cache, int64_t heads, int64_t width, double eps) {
  layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), std::move(weights), std::move(scales),
                          std::move(biases), std::move(k_cache), std::move(v_cache), heads, width, eps});
}

at::Tensor DecodePlan::run(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t length) {
  for (Layer& layer : layers_) {
    x = op_.call(x, layer.input_norm, layer.post_norm, layer.weights, layer.scales, layer.biases, cos, sin,
                 layer.k_cache, layer.v_cache, length, layer.heads, layer.width, layer.eps);
  }
  return x;
}

}  // namespace flextron
