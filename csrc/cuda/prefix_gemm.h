// The GEMM on a weight prefix that every dense flextron layer on CUDA is made of
// (nested_linear, nested_mlp). Defined, with the why and the kernel list, in
// nested_linear.cu: one translation unit holds the CUTLASS instantiations, so
// the ops that reuse the GEMM add no compile time.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace flextron {

// y (M, out) = x (M, >= in)[:, :in] @ weight (>= out, >= in)[:out, :in]^T (+ bias[:out]).
// y must be a contiguous (M, out) tensor on x's device, M <= INT_MAX and M, in, out > 0;
// bias, when given, a contiguous (out,) tensor. x and weight are read in place through
// their strides: CUTLASS when the layout allows it, else cuBLAS on the same views.
// `op` names the calling op in error messages.
void prefix_gemm_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t out, int64_t in,
                     const char* op);

}  // namespace flextron
