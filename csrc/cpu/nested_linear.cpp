// nested_linear on the CPU: one ATen GEMM on strided prefix views. The weight
// prefix weight[:out, :in] is passed with its original leading dimension, so the
// BLAS reads it in place: a narrower sub-network costs proportionally less and
// nothing is copied.
#include "checks.h"
#include "ops.h"

namespace flextron {

at::Tensor nested_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t out_features,
                             int64_t in_features) {
  constexpr const char* op = "nested_linear";
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

  const at::Tensor x_prefix = x.reshape({-1, x.size(-1)}).narrow(1, 0, in_features);  // (N, in)
  const at::Tensor w_prefix = weight.narrow(0, 0, out_features).narrow(1, 0, in_features);  // (out, in)
  at::Tensor y = at::empty({x_prefix.size(0), out_features}, x.options());  // (N, out)
  if (bias.has_value()) {
    at::addmm_out(y, bias->narrow(0, 0, out_features), x_prefix, w_prefix.t());
  } else {
    at::mm_out(y, x_prefix, w_prefix.t());
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape);
}

}  // namespace flextron
