// The sm90a grouped GEMM (sm90_grouped_gemm.cuh) for column-major A x row-major B:
// routed_nested_mlp's weight-gradient bands.
#include "cuda/sm90_grouped_gemm.cuh"

namespace flextron::sm90 {
FLEXTRON_SM90_GROUPED_GEMM(detail::ColumnMajor, detail::RowMajor)
}  // namespace flextron::sm90
