// nested_linear on the CPU: one ATen GEMM on strided prefix views. The weight
// prefix weight[:out, :in] is passed with its original leading dimension, so the
// BLAS reads it in place: a narrower sub-network costs proportionally less and
// nothing is copied. A few rows (decoding) take the bandwidth-bound kernel of
// skinny_gemm.h instead.
#include "common/checks.h"
#include "ops.h"
#include "skinny_gemm.h"

namespace flextron {

at::Tensor nested_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t out_features,
                             int64_t in_features) {
  constexpr const char* op = "nested_linear";
  check_nested_linear_args(op, x, weight, bias, out_features, in_features);

  const at::Tensor x_prefix = x.reshape({-1, x.size(-1)}).narrow(1, 0, in_features);  // (N, in)
  const at::Tensor w_prefix = weight.narrow(0, 0, out_features).narrow(1, 0, in_features);  // (out, in)
  std::optional<at::Tensor> bias_prefix;
  if (bias.has_value()) bias_prefix = bias->narrow(0, 0, out_features);
  const at::Tensor y = linear_nt(x_prefix, w_prefix, bias_prefix);  // (N, out)
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

}  // namespace flextron
