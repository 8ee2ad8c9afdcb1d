// The sm90a grouped GEMM of routed_nested_mlp: CUTLASS 3.x ptr-array GEMM in
// grouped mode (TMA loads and stores, wgmma, warp-specialized cooperative
// kernel, persistent tile scheduler). Compiled for sm_90a only (CMake gives this
// file its own -gencode); routed_nested_mlp.cu calls it on sm_90 devices.
//
// Why: the 2.x GemmGrouped (mma.sync) reaches only part of an H100/H200's bf16
// rate; wgmma with TMA is the Hopper path. The problems are the 2.x path's own
// device arrays (grouped_gemm.cuh: sizes as GemmCoord, leading dimensions);
// a one-block kernel rewrites them as the 3.x kernel's per-group shapes and
// cute strides, so the host still never learns the group sizes (no host sync,
// CUDA-graph capturable). Groups with M = 0 (choices without tokens) get no
// tiles; K is never 0 here (K = D or a width).
//
// Configuration: A row-major (K-major), B column-major (a K-major weight prefix),
// D row-major, fp32 accumulation, 128x128x64 tiles, cluster 1x1x1 (groups of
// different M do not share multicast), stages filling shared memory after the
// epilogue's carve-out, no C operand (ElementC = void: no TMA descriptor for a source
// that does not exist). One instantiation per 16-bit dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <cstdlib>

#include "cuda/grouped_gemm.cuh"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "routed_nested_mlp_sm90.cu needs CUDA 12.3+ (modifiable TMA descriptors for ptr-array GEMMs)"
#endif

namespace flextron::sm90 {
namespace {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)

template <typename Element>
struct PtrArrayGemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 8;  // 16 bytes, as TMA requires
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment,
      Element, LayoutD*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;

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
template <typename Element>
struct GroupArrays {
  using Config = PtrArrayGemm<Element>;
  typename Config::Shape* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
};

// One thread per group: GemmCoord + leading dimensions -> cute shapes and strides
// (row-major A: (lda, 1); column-major B, i.e. (N, K) K-major: (ldb, 1); row-major D: (ldd, 1)).
template <typename Element>
__global__ void to_group_arrays(ProblemArrays<Element> problems, int count,
                                GroupArrays<Element> groups) {
  const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= count) return;
  const cutlass::gemm::GemmCoord size = problems.sizes[g];
  groups.shapes[g] = cute::make_shape(size.m(), size.n(), size.k());
  groups.a[g] = problems.a[g];
  groups.b[g] = problems.b[g];
  groups.d[g] = problems.d[g];
  groups.stride_a[g] = cute::make_stride(problems.lda[g], cute::Int<1>{}, cute::Int<0>{});
  groups.stride_b[g] = cute::make_stride(problems.ldb[g], cute::Int<1>{}, cute::Int<0>{});
  groups.stride_d[g] = cute::make_stride(problems.ldd[g], cute::Int<1>{}, cute::Int<0>{});
}

// Bytes of each array for `count` groups, 16-byte rounded.
constexpr int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace

bool grouped_gemm_usable() {
  if (std::getenv("FLEXTRON_DISABLE_SM90") != nullptr) return false;  // read per call: tests flip it
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return props->major == 9 && props->minor == 0;
}

template <typename Element>
void grouped_gemm_row_col(ProblemArrays<Element> problems, int first, int count,
                          cudaStream_t stream) {
  using Config = PtrArrayGemm<Element>;
  using Gemm = typename Config::Gemm;
  const int64_t sizes[] = {round16(count * sizeof(typename Config::Shape)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(Element*)),
                           round16(count * sizeof(typename Config::StrideA)),
                           round16(count * sizeof(typename Config::StrideB)),
                           round16(count * sizeof(typename Config::StrideD))};
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
  const auto byte_options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
  const at::Tensor arrays = at::empty({total}, byte_options);
  auto* base = static_cast<char*>(arrays.data_ptr());
  char* cursor = base;
  auto take = [&](int index) {
    char* at = cursor;
    cursor += sizes[index];
    return at;
  };
  GroupArrays<Element> groups{
      reinterpret_cast<typename Config::Shape*>(take(0)),
      reinterpret_cast<const Element**>(take(1)),
      reinterpret_cast<const Element**>(take(2)),
      reinterpret_cast<Element**>(take(3)),
      reinterpret_cast<typename Config::StrideA*>(take(4)),
      reinterpret_cast<typename Config::StrideB*>(take(5)),
      reinterpret_cast<typename Config::StrideD*>(take(6))};
  ProblemArrays<Element> range{problems.a + first,   problems.b + first,   problems.d + first,
                               problems.lda + first, problems.ldb + first, problems.ldd + first,
                               problems.sizes + first};
  to_group_arrays<Element><<<(count + 127) / 128, 128, 0, stream>>>(range, count, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = at::cuda::current_device();
  hw_info.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {count, groups.shapes, nullptr};  // shapes on the device only
  args.mainloop = {groups.a, groups.stride_a, groups.b, groups.stride_b};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;  // no C operand (void): D = A @ B
  args.epilogue.dC = groups.stride_d;
  args.epilogue.ptr_D = groups.d;
  args.epilogue.dD = groups.stride_d;
  args.hw_info = hw_info;

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCH_CHECK(status == cutlass::Status::kSuccess,
              "routed_nested_mlp: the sm90 grouped GEMM cannot run these problems: ",
              cutlassGetStatusString(status));
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))}, byte_options);
  status = gemm.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess,
              "routed_nested_mlp: sm90 grouped GEMM set-up failed: ", cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess,
              "routed_nested_mlp: sm90 grouped GEMM failed: ", cutlassGetStatusString(status));
}

template void grouped_gemm_row_col<cutlass::bfloat16_t>(ProblemArrays<cutlass::bfloat16_t>, int,
                                                        int, cudaStream_t);
template void grouped_gemm_row_col<cutlass::half_t>(ProblemArrays<cutlass::half_t>, int, int,
                                                    cudaStream_t);

}  // namespace flextron::sm90
