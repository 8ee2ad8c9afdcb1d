// Every torch.ops.flextron schema, in one place, and the kernels behind them.
// Fake (meta) impls and autograd formulas are registered in flextron/ops/wrappers.py.
#include <torch/library.h>

#include "common/decode_plan.h"
#include "ops.h"

TORCH_LIBRARY(flextron, m) {
  // x[..., :in] @ weight[:out, :in]^T (+ bias[:out]); reads the weight prefix in place.
  m.def("nested_linear(Tensor x, Tensor weight, Tensor? bias, SymInt out_features, "
        "SymInt in_features) -> Tensor");
  // (x[..., :in] @ qweight[:out, :in]^T) * scale[:out] (+ bias[:out]): int8 weights, one scale per row.
  m.def("nested_linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, SymInt out_features, "
        "SymInt in_features) -> Tensor");
  // The MLP restricted to its first `width` neurons (swiglu | gelu | gelu_tanh | relu).
  m.def("nested_mlp(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, SymInt width, "
        "str activation) -> Tensor");
  // Per-token choice = argmax(logits + noise), probabilities, a stable grouping by choice.
  m.def("route(Tensor input, Tensor? weight, Tensor? noise, float tau, bool hard) -> "
        "(Tensor choice, Tensor probs, Tensor perm, Tensor inv_perm, Tensor offsets)");
  // Token t runs the MLP at width widths[choice[t]], output scaled by scale[t].
  m.def("routed_nested_mlp(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, "
        "Tensor choice, int[] widths, Tensor? scale, str activation) -> Tensor");
  // Gradients of routed_nested_mlp w.r.t. x, the three weights and the scale.
  m.def("routed_nested_mlp_backward(Tensor grad_out, Tensor x, Tensor? w_gate, Tensor w_up, "
        "Tensor w_down, Tensor choice, int[] widths, Tensor? scale, str activation) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention in which sequence b uses only its first heads[b] query heads.
  m.def("varhead_attention(Tensor q, Tensor k, Tensor v, Tensor heads, bool causal, "
        "float? scale=None) -> Tensor");
  // Gradients of varhead_attention w.r.t. q, k and v.
  m.def("varhead_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor heads, bool causal, float? scale=None) -> (Tensor, Tensor, Tensor)");
  // One pre-norm decoder layer on a KV cache, on the first `heads` query heads and `width` MLP
  // neurons; writes the new keys and values at positions [length, length + T). Composite:
  // its kernel is in common/decoder_layer.cpp.
  m.def("decoder_layer(Tensor x, Tensor input_norm, Tensor post_norm, Tensor[] weights, "
        "Tensor?[] scales, Tensor?[] biases, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int length, int heads, int width, float eps) -> Tensor");
  // Every decoder_layer of a model on a KV cache in one call (common/decode_plan.h).
  m.class_<flextron::DecodePlan>("DecodePlan")
      .def(torch::init<>())
      .def("add_layer", &flextron::DecodePlan::add_layer)
      .def("run", &flextron::DecodePlan::run);
}

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("nested_linear", &flextron::nested_linear_cpu);
  m.impl("nested_linear_int8", &flextron::nested_linear_int8_cpu);
  m.impl("nested_mlp", &flextron::nested_mlp_cpu);
  m.impl("route", &flextron::route_cpu);
  m.impl("routed_nested_mlp", &flextron::routed_nested_mlp_cpu);
  m.impl("routed_nested_mlp_backward", &flextron::routed_nested_mlp_backward_cpu);
  m.impl("varhead_attention", &flextron::varhead_attention_cpu);
  m.impl("varhead_attention_backward", &flextron::varhead_attention_backward_cpu);
}

#ifdef FLEXTRON_WITH_CUDA
// Every op has a CUDA kernel in a CUDA build. In a CPU-only build there is no CUDA
// registration, and flextron.ops raises "not built for CUDA" instead of falling
// back to the CPU.
TORCH_LIBRARY_IMPL(flextron, CUDA, m) {
  m.impl("nested_linear", &flextron::nested_linear_cuda);
  m.impl("nested_linear_int8", &flextron::nested_linear_int8_cuda);
  m.impl("nested_mlp", &flextron::nested_mlp_cuda);
  m.impl("route", &flextron::route_cuda);
  m.impl("routed_nested_mlp", &flextron::routed_nested_mlp_cuda);
  m.impl("routed_nested_mlp_backward", &flextron::routed_nested_mlp_backward_cuda);
  m.impl("varhead_attention", &flextron::varhead_attention_cuda);
  m.impl("varhead_attention_backward", &flextron::varhead_attention_backward_cuda);
}
#endif
