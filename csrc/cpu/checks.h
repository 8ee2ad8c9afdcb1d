// Argument checks shared by the CPU and CUDA kernels. Every message names the op
// and the argument, so bad input from Python is a clear RuntimeError, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

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

}  // namespace flextron
