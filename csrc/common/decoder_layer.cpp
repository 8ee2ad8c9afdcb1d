// decoder_layer: one pre-norm Llama decoder layer on a KV cache, on nested prefixes of its
// weights (attention on the first `heads` query heads, the MLP on the first `width` neurons).
//
// Why an op: at decode a layer is ~50 small tensor operations around four GEMV-sized kernels,
// and from Python each costs several microseconds of interpreter and binding time, a third of
// a bf16 decode step on a CPU. Here the same operations run from C++ through the dispatcher.
// It is composed of ATen ops and the other flextron ops (CompositeImplicitAutograd), so it
// runs on every device those ops have kernels for, and its autograd and fake come from theirs.
// On the CPU, a few rows that record no gradient take a path of plain loops around the
// kernels instead (csrc/cpu/decoder_layer_decode.cpp): the same numbers, without the ~50
// small ATen operations' allocation and dispatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "common/layer_operands.h"
#include "ops.h"


namespace flextron {
namespace {

// RMSNorm computed in fp32 and cast back before the weight, as Hugging Face Llama does.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor x32 = x.to(at::kFloat);  // (B, T, D)
  return weight * (x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
}

// Rotary embedding, rotate-half convention: x (B, h, T, hd), cos and sin (T, hd).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// The projections through their ops (the dispatcher: autograd, fakes, every device).
class Projections : public LayerOperands {
 public:
  using LayerOperands::LayerOperands;

  // x[..., :in] through projection p's first `out` rows: nested_linear, or nested_linear_int8
  // when the projection has a scale (int8 rows).
  at::Tensor apply(Projection p, const at::Tensor& x, int64_t out, int64_t in) const {
    static const auto linear = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("flextron::nested_linear", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t,
                                                     int64_t)>();
    static const auto linear_int8 = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("flextron::nested_linear_int8", "")
                                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&,
                                                          const std::optional<at::Tensor>&,
                                                          int64_t, int64_t)>();
    const std::optional<at::Tensor> s = scale(p);
    if (s.has_value()) return linear_int8.call(x, weight(p), *s, bias(p), out, in);
    return linear.call(x, weight(p), bias(p), out, in);
  }
};

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                         at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                         const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         int64_t length, int64_t heads, int64_t width, double eps) {
  constexpr const char* op = "decoder_layer";
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kProjections &&
                  static_cast<int64_t>(scales.size()) == kProjections &&
                  static_cast<int64_t>(biases.size()) == kProjections,
              op, ": weights, scales and biases must list 7 projections (q, k, v, o, gate, up, down), got ",
              weights.size(), ", ", scales.size(), " and ", biases.size());
  TORCH_CHECK(x.dim() == 3, op, ": x must be (batch, tokens, hidden), got ", x.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must both be (batch, kv_heads, max_length, head_dim), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t kv_total = k_cache.size(1), hd = k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == B, op, ": the caches hold ", k_cache.size(0), " sequences, x ", B);
  TORCH_CHECK(length >= 0 && length + T <= k_cache.size(2), op, ": positions [", length, ", ", length + T,
              ") do not fit a cache of ", k_cache.size(2));
  const Projections proj(weights, scales, biases);
  const int64_t num_heads = proj.weight(kQ).size(0) / hd;
  TORCH_CHECK(num_heads % kv_total == 0, op, ": ", num_heads, " query heads do not form groups over ",
              kv_total, " KV heads");
  TORCH_CHECK(heads >= 1 && heads <= num_heads, op, ": heads must be in [1, ", num_heads, "], got ", heads);
  const int64_t mlp_size = proj.weight(kGate).size(0);
  TORCH_CHECK(width >= 1 && width <= mlp_size, op, ": width must be in [1, ", mlp_size, "], got ", width);

  if (x.device().is_cpu()) {
    std::optional<at::Tensor> decoded = decoder_layer_decode_cpu(x, input_norm, post_norm, weights, scales, biases,
                                                                 cos, sin, k_cache, v_cache, length, heads, width, eps);
    if (decoded.has_value()) return *decoded;
  }

  // Attention computes whole KV groups; heads past `heads` in the last group output zeros.
  const int64_t group = num_heads / kv_total;
  const int64_t kv_heads = (heads + group - 1) / group, q_heads = kv_heads * group;
  const at::Tensor h = rms_norm(x, input_norm, eps);  // (B, T, D)
  const at::Tensor q = rotate(proj.apply(kQ, h, q_heads * hd, D).view({B, T, q_heads, hd}).transpose(1, 2),
                              cos, sin);  // (B, qh, T, hd)
  const at::Tensor k = rotate(proj.apply(kK, h, kv_heads * hd, D).view({B, T, kv_heads, hd}).transpose(1, 2),
                              cos, sin);  // (B, kvh, T, hd)
  const at::Tensor v = proj.apply(kV, h, kv_heads * hd, D).view({B, T, kv_heads, hd}).transpose(1, 2);
  k_cache.narrow(1, 0, kv_heads).narrow(2, length, T).copy_(k);
  v_cache.narrow(1, 0, kv_heads).narrow(2, length, T).copy_(v);
  const at::Tensor keys = k_cache.narrow(1, 0, kv_heads).narrow(2, 0, length + T);  // (B, kvh, S, hd)
  const at::Tensor values = v_cache.narrow(1, 0, kv_heads).narrow(2, 0, length + T);
  static const auto attention = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("flextron::varhead_attention", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, bool, std::optional<double>)>();
  const at::Tensor per_sequence = at::full({B}, heads, x.options().dtype(at::kLong));
  const at::Tensor y = attention.call(q, keys, values, per_sequence, /*causal=*/true, std::nullopt)
                           .transpose(1, 2)
                           .reshape({B, T, q_heads * hd});
  const at::Tensor attended = x + proj.apply(kO, y, D, q_heads * hd);  // (B, T, D)

  const at::Tensor m = rms_norm(attended, post_norm, eps);
  if (proj.fused_mlp()) {
    static const auto mlp = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("flextron::nested_mlp", "")
                                .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                                  const at::Tensor&, const at::Tensor&, int64_t,
                                                  const std::string&)>();
    static const std::string swiglu = "swiglu";
    return attended + mlp.call(m, proj.weight(kGate), proj.weight(kUp), proj.weight(kDown), width, swiglu);
  }
  const at::Tensor hidden = at::silu(proj.apply(kGate, m, width, D)) * proj.apply(kUp, m, width, D);
  return attended + proj.apply(kDown, hidden, D, width);
}

}  // namespace

// Composite: autograd, fakes and every device come from the ops it calls.
TORCH_LIBRARY_IMPL(flextron, CompositeImplicitAutograd, m) { m.impl("decoder_layer", &decoder_layer); }

}  // namespace flextron
