// TEMPORARY: replaced by the helper that owns this file.
#include "checks.h"
#include "ops.h"

namespace flextron {

at::Tensor routed_nested_mlp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down,
                                 const at::Tensor& choice, at::IntArrayRef widths,
                                 const std::optional<at::Tensor>& scale,
                                 const std::string& activation) {
  TORCH_CHECK(false, "routed_nested_mlp: not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
routed_nested_mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                               const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                               const at::Tensor& w_down, const at::Tensor& choice,
                               at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                               const std::string& activation) {
  TORCH_CHECK(false, "routed_nested_mlp_backward: not implemented yet");
}

}  // namespace flextron
