// Argument checks shared by the CPU and CUDA kernels. Every message names the op
// and the argument, so bad input from Python is a clear RuntimeError, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace flextron {

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", like_name, " has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", shape, ", got shape ",
              t.sizes());
}

inline void check_width(const char* op, const char* name, int64_t width, int64_t max_width) {
  TORCH_CHECK(width > 0 && width <= max_width, op, ": ", name, " must be in [1, ", max_width,
              "], got ", width);
}

// MLP weights: w_gate/w_up (F, D), w_down (D, F), all like x; gate present iff gated activation.
inline void check_mlp_weights(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                              const at::Tensor& w_up, const at::Tensor& w_down,
                              const std::string& activation) {
  check_float(op, "x", x);
  check_dim(op, "w_up", w_up, 2, "(F, D)");
  check_dim(op, "w_down", w_down, 2, "(D, F)");
  check_same(op, "w_up", w_up, x, "x");
  check_same(op, "w_down", w_down, x, "x");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(w_up.size(1) == hidden, op, ": w_up has ", w_up.size(1), " input features but x has ",
              hidden);
  TORCH_CHECK(w_down.size(0) == hidden && w_down.size(1) == w_up.size(0), op,
              ": w_down must be (", hidden, ", ", w_up.size(0), "), got ", w_down.sizes());
  const bool gated = activation == "swiglu";
  TORCH_CHECK(gated || activation == "gelu" || activation == "gelu_tanh" || activation == "relu", op,
              ": activation must be swiglu, gelu, gelu_tanh or relu, got '", activation, "'");
  if (gated) {
    TORCH_CHECK(w_gate.has_value(), op, ": activation 'swiglu' needs w_gate");
    check_dim(op, "w_gate", *w_gate, 2, "(F, D)");
    check_same(op, "w_gate", *w_gate, x, "x");
    TORCH_CHECK(w_gate->sizes() == w_up.sizes(), op, ": w_gate has shape ", w_gate->sizes(),
                " but w_up has ", w_up.sizes());
  } else {
    TORCH_CHECK(!w_gate.has_value(), op, ": activation '", activation, "' takes no w_gate");
  }
}

// nested_mlp: x (..., D) with at least one dimension, MLP weights, 1 <= width <= F.
inline void check_nested_mlp_args(const char* op, const at::Tensor& x,
                                  const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                                  const at::Tensor& w_down, int64_t width,
                                  const std::string& activation) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_mlp_weights(op, x, w_gate, w_up, w_down, activation);
  check_width(op, "width", width, w_up.size(0));
}

// nested_linear: x (..., X >= in), weight (O, I), bias (O,) or absent, 1 <= out <= O, 1 <= in <= I.
inline void check_nested_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t out_features,
                                     int64_t in_features) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_dim(op, "weight", weight, 2, "(out, in)");
  check_same(op, "weight", weight, x, "x");
  check_width(op, "out_features", out_features, weight.size(0));
  check_width(op, "in_features", in_features, weight.size(1));
  TORCH_CHECK(x.size(-1) >= in_features, op, ": x has ", x.size(-1),
              " features, fewer than in_features=", in_features);
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1, "(out,)");
    check_same(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->size(0) == weight.size(0), op, ": bias has ", bias->size(0),
                " entries but weight has ", weight.size(0), " rows");
  }
}

// nested_linear_int8: x (..., X >= in) float, qweight (O, I) int8 on x's device, scale (O,)
// float32, bias (O,) like x or absent, 1 <= out <= O, 1 <= in <= I.
inline void check_nested_linear_int8_args(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                          const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                                          int64_t out_features, int64_t in_features) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_dim(op, "qweight", qweight, 2, "(out, in)");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.device() == x.device(), op, ": qweight is on ", qweight.device(), " but x is on ",
              x.device());
  check_dim(op, "scale", scale, 1, "(out,)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), op, ": scale is on ", scale.device(), " but x is on ", x.device());
  TORCH_CHECK(scale.size(0) == qweight.size(0), op, ": scale has ", scale.size(0),
              " entries but qweight has ", qweight.size(0), " rows");
  check_width(op, "out_features", out_features, qweight.size(0));
  check_width(op, "in_features", in_features, qweight.size(1));
  TORCH_CHECK(x.size(-1) >= in_features, op, ": x has ", x.size(-1), " features, fewer than in_features=",
              in_features);
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1, "(out,)");
    check_same(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->size(0) == qweight.size(0), op, ": bias has ", bias->size(0),
                " entries but qweight has ", qweight.size(0), " rows");
  }
}

// route: input (T, C) logits or (T, D) with weight (C, D); tau > 0; noise (T, C) or absent.
inline void check_route_args(const char* op, const at::Tensor& input,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& noise, double tau) {
  check_float(op, "input", input);
  check_dim(op, "input", input, 2, "(tokens, choices) or (tokens, hidden)");
  TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
  int64_t choices = input.size(1);
  if (weight.has_value()) {
    check_dim(op, "weight", *weight, 2, "(choices, hidden)");
    check_same(op, "weight", *weight, input, "input");
    TORCH_CHECK(weight->size(1) == input.size(1), op, ": weight has ", weight->size(1),
                " input features but input has ", input.size(1));
    choices = weight->size(0);
  }
  TORCH_CHECK(choices >= 1, op, ": need at least one choice");
  if (noise.has_value()) {
    const std::vector<int64_t> expected{input.size(0), choices};
    TORCH_CHECK(noise->sizes() == at::IntArrayRef(expected), op, ": noise must have shape ",
                at::IntArrayRef(expected), ", got ", noise->sizes());
    TORCH_CHECK(noise->device() == input.device(), op, ": noise is on ", noise->device(),
                " but input is on ", input.device());
    TORCH_CHECK(noise->scalar_type() == at::kFloat || noise->scalar_type() == input.scalar_type(), op,
                ": noise must be float32 or the input's dtype (", input.scalar_type(), "), got ",
                noise->scalar_type());
  }
}

// routed_nested_mlp: x (T, D), MLP weights, choice (T,) int64, widths strictly descending
// in [1, F], scale (T,) or absent. (choice values are checked where they are read.)
inline void check_routed_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                       const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& choice,
                       at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                       const std::string& activation) {
  check_float(op, "x", x);
  check_dim(op, "x", x, 2, "(T, D)");
  check_mlp_weights(op, x, w_gate, w_up, w_down, activation);
  const int64_t max_width = w_up.size(0);
  TORCH_CHECK(!widths.empty(), op, ": widths must hold at least one width");
  for (size_t i = 0; i < widths.size(); ++i) {
    TORCH_CHECK(widths[i] > 0 && widths[i] <= max_width, op, ": widths[", i, "] must be in [1, ",
                max_width, "], got ", widths[i]);
    TORCH_CHECK(i == 0 || widths[i] < widths[i - 1], op,
                ": widths must be strictly descending (choice 0 is the widest), got ", widths);
  }
  check_dim(op, "choice", choice, 1, "(T,)");
  TORCH_CHECK(choice.scalar_type() == at::kLong, op, ": choice must be int64, got ",
              choice.scalar_type());
  TORCH_CHECK(choice.device() == x.device(), op, ": choice is on ", choice.device(),
              " but x is on ", x.device());
  TORCH_CHECK(choice.size(0) == x.size(0), op, ": choice has ", choice.size(0),
              " entries but x has ", x.size(0), " tokens");
  if (scale.has_value()) {
    check_float(op, "scale", *scale);
    check_dim(op, "scale", *scale, 1, "(T,)");
    TORCH_CHECK(scale->device() == x.device(), op, ": scale is on ", scale->device(),
                " but x is on ", x.device());
    TORCH_CHECK(scale->size(0) == x.size(0), op, ": scale has ", scale->size(0),
                " entries but x has ", x.size(0), " tokens");
  }
}

// routed_nested_mlp_backward: the forward's arguments plus grad_out shaped like x.
inline void check_routed_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                       const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                                       const at::Tensor& w_down, const at::Tensor& choice,
                                       at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                                       const std::string& activation) {
  check_routed_args(op, x, w_gate, w_up, w_down, choice, widths, scale, activation);
  check_same(op, "grad_out", grad_out, x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but x has ", x.sizes());
}

// varhead_attention sizes, and the scale in effect (1/sqrt(Dh) by default).
struct AttentionShape {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, group;
  double scale;
};

// varhead_attention: q (B, Hq, Sq, Dh), k and v (B, Hkv, Sk, Dh) like q, Hq a multiple of
// Hkv, Sk >= 1 (>= Sq if causal), heads (B,) int64 whose values are checked on the host by
// check_head_counts. Where heads may live is the kernel's to check.
inline AttentionShape check_varhead_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& heads, bool causal,
                                         std::optional<double> scale) {
  check_dim(op, "q", q, 4, "(B, Hq, Sq, Dh)");
  check_dim(op, "k", k, 4, "(B, Hkv, Sk, Dh)");
  check_dim(op, "v", v, 4, "(B, Hkv, Sk, Dh)");
  check_float(op, "q", q);
  check_same(op, "k", k, q, "q");
  check_same(op, "v", v, q, "q");
  TORCH_CHECK(heads.scalar_type() == at::kLong, op, ": heads must be int64, got ",
              heads.scalar_type());
  AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, 0.0};
  TORCH_CHECK(heads.dim() == 1 && heads.size(0) == s.batch, op, ": heads must have shape (",
              s.batch, ",) (one head count per sequence of q), got ", heads.sizes());
  TORCH_CHECK(k.size(0) == s.batch, op, ": k has batch ", k.size(0), " but q has ", s.batch);
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has ", k.sizes());
  TORCH_CHECK(k.size(3) == s.head_dim, op, ": k has head dim ", k.size(3), " but q has ",
              s.head_dim);
  TORCH_CHECK(s.head_dim > 0, op, ": q must have a head dim of at least 1, got shape ", q.sizes());
  TORCH_CHECK(s.kv_len > 0, op, ": k must have at least one key (Sk >= 1), got shape ", k.sizes());
  TORCH_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, op, ": q has ", s.q_heads,
              " heads, not a multiple of the ", s.kv_heads, " heads of k");
  TORCH_CHECK(!causal || s.kv_len >= s.q_len, op, ": causal attention needs at least as many keys",
              " as queries, but k has Sk=", s.kv_len, " and q has Sq=", s.q_len);
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  }
  s.group = s.q_heads / s.kv_heads;
  s.scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  return s;
}

// Every head count in [1, Hq]; heads_cpu is (B,) int64 on the CPU.
inline void check_head_counts(const char* op, const at::Tensor& heads_cpu, int64_t q_heads) {
  const at::Tensor counts = heads_cpu.contiguous();
  const int64_t* count = counts.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < counts.numel(); ++b) {
    TORCH_CHECK(count[b] >= 1, op, ": heads[", b, "] = ", count[b],
                " is too few heads (each sequence needs at least 1)");
    TORCH_CHECK(count[b] <= q_heads, op, ": heads[", b, "] = ", count[b],
                " is too many heads (q has ", q_heads, ")");
  }
}

// varhead_attention_backward: grad_out shaped and typed like q.
inline void check_varhead_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& q) {
  check_same(op, "grad_out", grad_out, q, "q");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but q has ", q.sizes());
}

}  // namespace flextron
