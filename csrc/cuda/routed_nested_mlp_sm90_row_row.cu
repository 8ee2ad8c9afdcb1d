// The sm90a grouped GEMM (sm90_grouped_gemm.cuh) for row-major A x row-major B,
// with a C operand: routed_nested_mlp's grad_hidden and grad_x GEMMs.
#include "cuda/sm90_grouped_gemm.cuh"

namespace flextron::sm90 {
FLEXTRON_SM90_GROUPED_GEMM(detail::RowMajor, detail::RowMajor)
}  // namespace flextron::sm90
