// The device-side description of a grouped GEMM shared by the CUTLASS 2.x path
// (routed_nested_mlp.cu, every arch) and the CUTLASS 3.x ptr-array path for
// sm90a (routed_nested_mlp_sm90.cu): one entry per problem, written by a kernel
// from the token grouping's offsets, so no launch waits for the host.
// Problem p computes D_p (M x N, row-major, ldd) = A_p (M x K) @ B_p (K x N); the
// layouts of A and B are fixed by the kernel that runs the range of problems.
#pragma once

#include <cuda_runtime.h>

#include <cutlass/gemm_coord.h>
#include <cutlass/layout/matrix.h>

#include <cstdint>
#include <string>

namespace flextron {

template <typename Element>
struct ProblemArrays {
  Element** a;
  Element** b;
  Element** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
  cutlass::gemm::GemmCoord* sizes;  // (M, N, K); M = 0 means no tiles
};

// Bytes of one problem's entries: six 8-byte pointers / leading dimensions and the size.
constexpr int64_t kProblemBytes = 6 * 8 + static_cast<int64_t>(sizeof(cutlass::gemm::GemmCoord));

// Carves `count` problems' arrays out of a byte buffer of count * kProblemBytes bytes.
template <typename Element>
ProblemArrays<Element> carve_problem_arrays(void* buffer, int64_t count) {
  auto* base = static_cast<int64_t*>(buffer);
  return {reinterpret_cast<Element**>(base),
          reinterpret_cast<Element**>(base + count),
          reinterpret_cast<Element**>(base + 2 * count),
          base + 3 * count,
          base + 4 * count,
          base + 5 * count,
          reinterpret_cast<cutlass::gemm::GemmCoord*>(base + 6 * count)};
}

#ifdef FLEXTRON_WITH_SM90
namespace sm90 {
// True when the current device is an sm_90 part (H100/H200), which the sm90a
// kernels of this build run on (FLEXTRON_ROUTED_GEMM chooses whether they do).
bool grouped_gemm_runs_here();

// Problems [first, first + count): D (row-major) = A @ B + beta * D, fp32
// accumulation, alpha = 1. Instantiated for cutlass::bfloat16_t and cutlass::half_t
// with (LayoutA, LayoutB) = (RowMajor, ColumnMajor), (RowMajor, RowMajor) (the only
// pair that takes beta != 0) and (ColumnMajor, RowMajor). Returns "" when the problems
// ran, else CUTLASS's reason for declining them (nothing launched): the caller then warns
// once, naming the reason and the shape, and runs the 2.x kernel.
template <typename Element, typename LayoutA, typename LayoutB>
std::string grouped_gemm(ProblemArrays<Element> problems, int first, int count, float beta,
                         cudaStream_t stream);
}  // namespace sm90
#endif

}  // namespace flextron
