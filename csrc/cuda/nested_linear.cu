// nested_linear on CUDA: y = x[..., :in] @ weight[:out, :in]^T (+ bias[:out]) as
// one CUTLASS 2.x device GEMM that reads the weight prefix in place. The GEMM
// itself (prefix_gemm_out, prefix_gemm.h) also serves nested_mlp.cu.
//
// Why a custom GEMM and not at::addmm: the op is the building block of every
// elastic layer, and the point of Flextron is that a narrower sub-network costs
// proportionally less. Passing the weight's own leading dimension (ldb =
// weight.stride(0)) lets the kernel walk the (out, in) prefix of the full (O, I)
// weight without a copy; x is read the same way (lda = its row stride), so a
// column prefix of x costs nothing either. The bias is fused into the epilogue
// as the C operand with a zero leading dimension (one row broadcast to all rows).
//
// Layouts: x rows are row-major A (M = tokens, K = in); the row-major (O, I)
// weight is column-major B (K x N, N = out); y is row-major C/D.
//
// Kernels (one instantiation per dtype, to keep compile time low; each is built
// for every arch in FLEXTRON_CUDA_ARCHS, sm80 kernels run unchanged on sm90a):
//   - bf16 / fp16: sm80 tensor-op mma.sync 16x8x16, fp32 accumulation,
//     128x128x32 tiles, 64x64x32 warps, 4 stages, 16-byte (8-element) accesses.
//   - fp32: sm80 SIMT FFMA (exact fp32, no TF32 rounding, whatever
//     torch.backends.cuda.matmul.allow_tf32 says), 1-element accesses, so any
//     leading dimension works.
// The 16-byte kernels need x, weight, bias pointers 16-byte aligned and lda, ldb,
// in and out multiples of 8. Otherwise, and when x or weight has a non-unit
// inner stride (e.g. a transposed weight), the op falls back to at::addmm on the
// same strided views: cuBLAS takes leading dimensions too, so the fallback is
// still copy-free on the weight. A CUTLASS can_implement or initialize failure
// falls back the same way, with a one-time warning naming CUTLASS's reason.
//
// Which GEMM runs (FLEXTRON_PREFIX_GEMM=auto|cutlass|cublas forces one, read per
// call so that benchmarks and tests can compare them):
//   - auto, 16-bit on compute capability 9.x: cuBLAS on the prefix views. Its
//     Hopper kernels use wgmma/TMA; the sm80 mma.sync kernel above reaches only
//     part of an H100/H200's rate, and no CUTLASS 3.x dense kernel is built here.
//   - auto, decode-sized M (<= kDecodeRows rows), any dtype but fp32: cuBLAS,
//     whose heuristics pick small-M tiles and split-K; the fixed 128x128 tile
//     above would fill only out/128 SMs.
//   - auto otherwise, and cutlass: the CUTLASS kernels above (fp32 always takes
//     the exact SIMT kernel under auto, whatever the shape).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "common/checks.h"
#include "cuda/fallback_warning.h"
#include "cuda/prefix_gemm.h"
#include "ops.h"

namespace flextron {
namespace {

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

// The 16-bit tensor-op GEMM (bf16 or fp16 in and out, fp32 accumulation).
template <typename Element>
using TensorOpGemm = cutlass::gemm::device::Gemm<
    Element, RowMajor, Element, ColumnMajor, Element, RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
    cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>,
    cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4, 8, 8>;

// The exact-fp32 SIMT GEMM (CUTLASS's default sm80 SIMT configuration).
using SimtGemm = cutlass::gemm::device::Gemm<float, RowMajor, float, ColumnMajor, float, RowMajor,
                                             float, cutlass::arch::OpClassSimt, cutlass::arch::Sm80>;

constexpr int64_t kDecodeRows = 16;

// y (M, out) = x2 (M, >=in)[:, :in] @ w[:out, :in]^T (+ bias[:out]) when this
// kernel's alignment allows and CUTLASS accepts the problem; returns false (nothing
// launched) otherwise.
template <typename Gemm>
bool try_gemm(const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias,
              at::Tensor& y, int64_t in, int64_t out, const char* op) {
  using Element = typename Gemm::ElementA;
  constexpr int64_t elems = Gemm::kAlignmentA;
  static_assert(Gemm::kAlignmentB == elems && Gemm::kAlignmentC == elems);
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % (elems * sizeof(Element)) == 0;
  };
  auto shape = [&] {  // for a warning: built only when one is given
    return "M=" + std::to_string(x2.size(0)) + " out=" + std::to_string(out) + " in=" + std::to_string(in) +
           " " + c10::toString(x2.scalar_type());
  };
  if (x2.stride(1) != 1 || w.stride(1) != 1 || x2.stride(0) % elems != 0 ||
      w.stride(0) % elems != 0 || in % elems != 0 || out % elems != 0 || !aligned(x2) ||
      !aligned(w) || (bias.has_value() && !aligned(*bias))) {
    warn_fallback(op, "operands not unit-stride or not " + std::to_string(elems * sizeof(Element)) +
                          "-byte aligned, or in/out not multiples of " + std::to_string(elems),
                  shape(), "cuBLAS on the same views");
    return false;
  }

  const auto* x_ptr = reinterpret_cast<const Element*>(x2.data_ptr());
  const auto* w_ptr = reinterpret_cast<const Element*>(w.data_ptr());
  auto* y_ptr = reinterpret_cast<Element*>(y.data_ptr());
  // Without a bias, beta = 0 and the epilogue never reads C.
  const auto* c_ptr = bias.has_value() ? reinterpret_cast<const Element*>(bias->data_ptr()) : y_ptr;
  const int64_t ldc = bias.has_value() ? 0 : y.stride(0);
  typename Gemm::Arguments args(
      {static_cast<int>(x2.size(0)), static_cast<int>(out), static_cast<int>(in)},
      {x_ptr, x2.stride(0)}, {w_ptr, w.stride(0)}, {c_ptr, ldc}, {y_ptr, y.stride(0)},
      {1.0f, bias.has_value() ? 1.0f : 0.0f});

  Gemm gemm;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cutlass::Status status = gemm.can_implement(args);
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, x2.options().dtype(at::kByte));
  }
  if (status == cutlass::Status::kSuccess) {
    status = gemm.initialize(args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream);
  }
  if (status != cutlass::Status::kSuccess) {  // nothing launched yet: cuBLAS takes over
    warn_fallback(op, std::string("the CUTLASS GEMM cannot run (") + cutlassGetStatusString(status) + ")",
                  shape(), "cuBLAS");
    return false;
  }
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess,
              op, ": CUTLASS GEMM failed: ", cutlassGetStatusString(status));
  return true;
}

bool try_cutlass(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, int64_t out, int64_t in, const char* op) {
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return try_gemm<TensorOpGemm<cutlass::bfloat16_t>>(x, weight, bias, y, in, out, op);
    case at::kHalf:
      return try_gemm<TensorOpGemm<cutlass::half_t>>(x, weight, bias, y, in, out, op);
    default:  // float32 (check_float allows nothing else)
      return try_gemm<SimtGemm>(x, weight, bias, y, in, out, op);
  }
}

enum class PrefixGemm { kAuto, kCutlass, kCublas };

PrefixGemm forced_prefix_gemm() {
  const char* value = std::getenv("FLEXTRON_PREFIX_GEMM");
  if (value == nullptr || std::strcmp(value, "auto") == 0 || *value == '\0') return PrefixGemm::kAuto;
  if (std::strcmp(value, "cutlass") == 0) return PrefixGemm::kCutlass;
  TORCH_CHECK(std::strcmp(value, "cublas") == 0,
              "FLEXTRON_PREFIX_GEMM must be auto, cutlass or cublas, got '", value, "'");
  return PrefixGemm::kCublas;
}

// Whether the CUTLASS kernel should run (see the top of the file).
bool use_cutlass(const at::Tensor& x, int64_t rows) {
  const PrefixGemm forced = forced_prefix_gemm();
  if (forced != PrefixGemm::kAuto) return forced == PrefixGemm::kCutlass;
  if (x.scalar_type() == at::kFloat) return true;
  if (rows <= kDecodeRows) return false;
  return at::cuda::getCurrentDeviceProperties()->major != 9;  // ATen caches the properties
}

}  // namespace

void prefix_gemm_out(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t out, int64_t in,
                     const char* op) {
  if (use_cutlass(x, x.size(0)) && try_cutlass(y, x, weight, bias, out, in, op)) return;
  // cuBLAS on the same strided views (chosen, misaligned, or CUTLASS declined).
  const at::Tensor x_prefix = x.narrow(1, 0, in);
  const at::Tensor w_prefix = weight.narrow(0, 0, out).narrow(1, 0, in);
  if (bias.has_value()) {
    at::addmm_out(y, *bias, x_prefix, w_prefix.t());
  } else {
    at::mm_out(y, x_prefix, w_prefix.t());
  }
}

at::Tensor nested_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t out_features,
                              int64_t in_features) {
  constexpr const char* op = "nested_linear";
  check_nested_linear_args(op, x, weight, bias, out_features, in_features);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor x2 = x.reshape({-1, x.size(-1)});  // (M, X), a view whenever x allows one
  const int64_t rows = x2.size(0);
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), op, ": x has ", rows,
              " rows, more than a CUTLASS GEMM takes");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty({rows, out_features}, x.options());  // (M, out)
  if (rows == 0) return y.view(shape);

  // The epilogue reads the bias as a contiguous row: copy it only if it is strided (out elements).
  std::optional<at::Tensor> bias_prefix;
  if (bias.has_value()) bias_prefix = bias->narrow(0, 0, out_features).contiguous();
  prefix_gemm_out(y, x2, weight, bias_prefix, out_features, in_features, op);
  return y.view(shape);
}

}  // namespace flextron
