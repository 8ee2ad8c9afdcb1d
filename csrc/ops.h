// Declarations of every flextron kernel. Schemas live in registration.cpp; the
// semantics of each op are written out in docs/ops.md and, as executable code,
// in flextron/reference.py (the test oracle).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace flextron {

// ---- CPU kernels (csrc/cpu/*.cpp) -------------------------------------------
at::Tensor nested_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             int64_t out_features, int64_t in_features);

// y = (x[..., :in] @ qweight[:out, :in]^T) * scale[:out] (+ bias[:out]), int8 weights.
at::Tensor nested_linear_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, int64_t out_features,
                                  int64_t in_features);

at::Tensor nested_mlp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, int64_t width,
                          const std::string& activation);

// Returns (choice, probs, perm, inv_perm, offsets).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& noise, double tau, bool hard);

at::Tensor routed_nested_mlp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down,
                                 const at::Tensor& choice, at::IntArrayRef widths,
                                 const std::optional<at::Tensor>& scale,
                                 const std::string& activation);

// Returns (grad_x, grad_w_gate, grad_w_up, grad_w_down, grad_scale); an absent
// gate or scale gets an empty tensor in its slot.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
routed_nested_mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, const at::Tensor& choice,
                               at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                               const std::string& activation);

at::Tensor varhead_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& heads, bool causal,
                                 std::optional<double> scale);

// Returns (grad_q, grad_k, grad_v).
std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale);

// decoder_layer for a few rows without gradients (decode), in loops of its own; nullopt where
// that path does not apply (prefill, gradients, tracing, other dtypes), and the composite runs.
std::optional<at::Tensor> decoder_layer_decode_cpu(
    const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& biases,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
    int64_t length, int64_t heads, int64_t width, double eps);

// ---- CUDA kernels (csrc/cuda/*.cu), built when FLEXTRON_WITH_CUDA ---------------
#ifdef FLEXTRON_WITH_CUDA
at::Tensor nested_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t out_features,
                              int64_t in_features);

at::Tensor nested_linear_int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& bias, int64_t out_features,
                                   int64_t in_features);

at::Tensor nested_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                           const at::Tensor& w_up, const at::Tensor& w_down, int64_t width,
                           const std::string& activation);

// Returns (choice, probs, perm, inv_perm, offsets), bit-equal to route_cpu except probs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& noise, double tau, bool hard);

at::Tensor routed_nested_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                  const at::Tensor& w_up, const at::Tensor& w_down,
                                  const at::Tensor& choice, at::IntArrayRef widths,
                                  const std::optional<at::Tensor>& scale,
                                  const std::string& activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
routed_nested_mlp_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                                const at::Tensor& w_down, const at::Tensor& choice,
                                at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                                const std::string& activation);

// heads on the CPU or on q's device (read on the host either way).
at::Tensor varhead_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& heads, bool causal,
                                  std::optional<double> scale);

// Returns (grad_q, grad_k, grad_v).
std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale);
#endif

}  // namespace flextron
