// nested_mlp on the CPU: the MLP restricted to its first `width` neurons, as
// three ATen GEMMs on prefix views of the weights (no copies) with the
// activation applied in place on the narrow hidden tensor (skinny_gemm.h for
// a few rows).
#include "common/checks.h"
#include "common/mlp_kernels.h"
#include "ops.h"
#include "skinny_gemm.h"

namespace flextron {

at::Tensor nested_mlp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                          const at::Tensor& w_up, const at::Tensor& w_down, int64_t width,
                          const std::string& activation) {
  check_nested_mlp_args("nested_mlp", x, w_gate, w_up, w_down, width, activation);

  const at::Tensor x2 = x.reshape({-1, x.size(-1)});  // (N, D)
  at::Tensor hidden = linear_nt(x2, w_up.narrow(0, 0, width));  // (N, width)
  at::Tensor gate;
  if (w_gate.has_value()) gate = linear_nt(x2, w_gate->narrow(0, 0, width));  // (N, width)
  activate_(gate, hidden, parse_activation(activation));
  return linear_nt(hidden, w_down.narrow(1, 0, width)).view(x.sizes());  // (..., D)
}

}  // namespace flextron
