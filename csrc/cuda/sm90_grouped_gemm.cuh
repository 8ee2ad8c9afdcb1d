// The sm90a grouped GEMM of routed_nested_mlp: CUTLASS 3.x ptr-array GEMM in
// grouped mode (TMA loads and stores, wgmma, warp-specialized cooperative
// kernel, persistent tile scheduler), for sm_90a only. Included by one
// translation unit per pair of operand layouts (routed_nested_mlp_sm90*.cu), so
// a parallel build compiles the instantiations side by side.
//
// Why: the 2.x GemmGrouped (mma.sync) reaches only part of an H100/H200's bf16
// rate; wgmma with TMA is the Hopper path. The problems are the 2.x path's own
// device arrays (grouped_gemm.cuh: sizes as GemmCoord, leading dimensions); a
// small kernel rewrites them as the 3.x kernel's per-group shapes and cute
// strides, so the host still never learns the group sizes (no host sync,
// CUDA-graph capturable). Groups with M = 0 get no tiles: the backward gives an
// unused weight-gradient band (K = 0 rows) M = 0.
//
// Configuration: fp32 accumulation, 128x128x64 tiles, cluster 1x1x1 (groups of
// different M do not share multicast), stages filling shared memory after the
// epilogue's carve-out. 16-bit wgmma reads both K-major and MN-major shared
// memory tiles, so every layout pair routed_nested_mlp uses runs here: row x col
// (up/gate, forward down), row x row (grad_hidden, grad_x), col x row (weight
// gradients). Only row x row reads a C operand (grad_x adds the gate's half with
// beta = 1); the others have none (ElementC = void: no TMA descriptor and no
// shared memory for a source that does not exist).
//
// Host work per call: one byte buffer holds the 3.x arrays and the kernel's
// workspace (one allocation from the caching allocator); CUTLASS's initialize
// encodes the TMA descriptors on the host, as every 3.x GEMM does.
#pragma once

#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

#include "cuda/grouped_gemm.cuh"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the sm90 grouped GEMMs need CUDA 12.3+ (modifiable TMA descriptors for ptr-array GEMMs)"
#endif

namespace flextron::sm90 {
namespace detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// Row x row is the pair with a C operand (grad_x of a gated MLP accumulates with beta = 1).
template <typename LayoutA, typename LayoutB>
constexpr bool kReadsC = std::is_same_v<LayoutA, RowMajor> && std::is_same_v<LayoutB, RowMajor>;

template <typename Element, typename LayoutA, typename LayoutB>
struct PtrArrayGemm {
  using LayoutD = RowMajor;
  using ElementC = std::conditional_t<kReadsC<LayoutA, LayoutB>, Element, void>;
  static constexpr int kAlignment = 8;  // 16 bytes, as TMA requires
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, LayoutD*,
      kAlignment, Element, LayoutD*, kAlignment,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, ElementC, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
};

// The 3.x kernel's per-group arrays, carved from one byte buffer.
template <typename Config, typename Element>
struct GroupArrays {
  typename Config::Shape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
};

// One thread per group: GemmCoord + leading dimensions -> cute shapes and strides.
template <typename Config, typename Element, typename LayoutA, typename LayoutB>
__global__ void to_group_arrays(ProblemArrays<Element> problems, int count,
                                GroupArrays<Config, Element> groups) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= count) return;
  const cutlass::gemm::GemmCoord size = problems.sizes[g];
  groups.shapes[g] = cute::make_shape(size.m(), size.n(), size.k());
  groups.a[g] = problems.a[g];
  groups.b[g] = problems.b[g];
  groups.d[g] = problems.d[g];
  if constexpr (std::is_same_v<LayoutA, RowMajor>) {
    groups.stride_a[g] = cute::make_stride(problems.lda[g], cute::Int<1>{}, cute::Int<0>{});
  } else {
    groups.stride_a[g] = cute::make_stride(cute::Int<1>{}, problems.lda[g], cute::Int<0>{});
  }
  if constexpr (std::is_same_v<LayoutB, ColumnMajor>) {
    groups.stride_b[g] = cute::make_stride(problems.ldb[g], cute::Int<1>{}, cute::Int<0>{});
  } else {
    groups.stride_b[g] = cute::make_stride(cute::Int<1>{}, problems.ldb[g], cute::Int<0>{});
  }
  groups.stride_d[g] = cute::make_stride(problems.ldd[g], cute::Int<1>{}, cute::Int<0>{});
}

constexpr int64_t round_up(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }
constexpr int64_t round16(int64_t bytes) { return round_up(bytes, 16); }

// Problems [first, first + count) with D = A @ B + beta * D; "" when they ran, else (nothing
// launched) CUTLASS's reason for declining them, which the caller's fallback warning names.
template <typename Element, typename LayoutA, typename LayoutB>
std::string run(ProblemArrays<Element> problems, int first, int count, float beta, cudaStream_t stream) {
  using Config = PtrArrayGemm<Element, LayoutA, LayoutB>;
  using Gemm = typename Config::Gemm;
  constexpr bool reads_c = kReadsC<LayoutA, LayoutB>;
  TORCH_CHECK(beta == 0.f || reads_c,
              "routed_nested_mlp: this sm90 grouped GEMM has no C operand (beta must be 0)");

  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {count, nullptr, nullptr};  // shapes on the device only; set below
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;
  args.hw_info.device_id = at::cuda::current_device();
  args.hw_info.sm_count = props->multiProcessorCount;
  // The workspace (per-SM TMA descriptors, scheduler state) depends on the group count
  // and SM count only, so it is sized before the arrays exist. It comes first in the
  // buffer: TMA descriptors need 64-byte alignment, and the allocator's blocks have more.
  const int64_t workspace_bytes = round_up(static_cast<int64_t>(Gemm::get_workspace_size(args)), 128);

  const int64_t sizes[] = {workspace_bytes,
                           round16(count * sizeof(typename Config::Shape)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(typename Config::StrideA)),
                           round16(count * sizeof(typename Config::StrideB)),
                           round16(count * sizeof(typename Config::StrideD))};
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
  const at::Tensor buffer =
      at::empty({total}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));  // one allocation
  char* cursor = static_cast<char*>(buffer.data_ptr());
  auto take = [&](int index) {
    char* at = cursor;
    cursor += sizes[index];
    return at;
  };
  void* workspace = take(0);
  GroupArrays<Config, Element> groups{
      reinterpret_cast<typename Config::Shape*>(take(1)),
      reinterpret_cast<const Element**>(take(2)),
      reinterpret_cast<const Element**>(take(3)),
      reinterpret_cast<Element**>(take(4)),
      reinterpret_cast<typename Config::StrideA*>(take(5)),
      reinterpret_cast<typename Config::StrideB*>(take(6)),
      reinterpret_cast<typename Config::StrideD*>(take(7))};

  args.problem_shape = {count, groups.shapes, nullptr};
  args.mainloop = {groups.a, groups.stride_a, groups.b, groups.stride_b};
  if constexpr (reads_c) {
    args.epilogue.ptr_C = const_cast<const Element**>(groups.d);  // C = D, read when beta != 0
  } else {
    args.epilogue.ptr_C = nullptr;  // no C operand (void): D = A @ B
  }
  args.epilogue.dC = groups.stride_d;
  args.epilogue.ptr_D = groups.d;
  args.epilogue.dD = groups.stride_d;

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  ProblemArrays<Element> range{problems.a + first,   problems.b + first,   problems.d + first,
                               problems.lda + first, problems.ldb + first, problems.ldd + first,
                               problems.sizes + first};
  to_group_arrays<Config, Element, LayoutA, LayoutB>
      <<<(count + 127) / 128, 128, 0, stream>>>(range, count, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "routed_nested_mlp: sm90 grouped GEMM failed: ",
              cutlassGetStatusString(status));
  return "";
}

}  // namespace detail

template <typename Element, typename LayoutA, typename LayoutB>
std::string grouped_gemm(ProblemArrays<Element> problems, int first, int count, float beta,
                         cudaStream_t stream) {
  return detail::run<Element, LayoutA, LayoutB>(problems, first, count, beta, stream);
}

// Explicit instantiations for both 16-bit dtypes, one layout pair per translation unit.
#define FLEXTRON_SM90_GROUPED_GEMM(LayoutA, LayoutB)                                              \
  template std::string grouped_gemm<cutlass::bfloat16_t, LayoutA, LayoutB>(                       \
      ProblemArrays<cutlass::bfloat16_t>, int, int, float, cudaStream_t);                         \
  template std::string grouped_gemm<cutlass::half_t, LayoutA, LayoutB>(                           \
      ProblemArrays<cutlass::half_t>, int, int, float, cudaStream_t);

}  // namespace flextron::sm90
