// TEMPORARY: replaced by the helper that owns this file.
#include "checks.h"
#include "ops.h"

namespace flextron {

at::Tensor varhead_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& heads, bool causal, std::optional<double> scale) {
  TORCH_CHECK(false, "varhead_attention: not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale) {
  TORCH_CHECK(false, "varhead_attention_backward: not implemented yet");
}

}  // namespace flextron
