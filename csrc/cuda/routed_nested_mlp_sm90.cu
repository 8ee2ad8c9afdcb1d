// The sm90a grouped GEMM (sm90_grouped_gemm.cuh) for row-major A x column-major B:
// the up/gate GEMMs and the forward's down GEMM of routed_nested_mlp. Compiled
// for sm_90a only (CMake gives the sm90 files their own -gencode).
#include "cuda/sm90_grouped_gemm.cuh"

namespace flextron::sm90 {

bool grouped_gemm_runs_here() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();  // cached by ATen
  return props->major == 9 && props->minor == 0;
}

FLEXTRON_SM90_GROUPED_GEMM(detail::RowMajor, detail::ColumnMajor)

}  // namespace flextron::sm90
