// routed_nested_mlp on CUDA: token t runs the MLP at width widths[choice[t]]
// (widths strictly descending), output scaled by scale[t].
//
// Why grouped GEMMs: tokens of one choice form one GEMM on a prefix of the same
// weights, so after grouping the tokens by choice (the counting sort shared
// with route, grouping.cuh) the whole layer is two CUTLASS 2.x GemmGrouped
// launches with one problem per (choice, projection): a narrower choice costs
// proportionally less and no weight is copied or masked. Problem sizes and
// pointers are written on the device from the grouping's offsets and the
// schedule is CUTLASS's device-only one, so nothing waits for the host:
//   1. group_by_choice -> perm, inv_perm, offsets; gather x by perm.
//   2. GemmGrouped #1: for each choice c, up (and gate) rows of choice c =
//      x_sorted[rows] @ w[:widths[c], :]^T into (T, F) buffers (columns past
//      the row's width are never written nor read).
//   3. activate_rows: hidden = act(gate, up) in place of up, on each row's prefix.
//   4. GemmGrouped #2: y_sorted[rows] = hidden[rows, :widths[c]] @ w_down[:, :widths[c]]^T.
//   5. y = y_sorted[inv_perm] (* scale).
// Groups without tokens have no tiles; every K (D or widths[c]) is positive.
//
// Kernel: bf16/fp16 tensor-op (sm80 mma.sync 16x8x16, fp32 accumulation,
// 128x128x32 tiles, 4 stages, 16-byte accesses), one instantiation per dtype.
// It needs D, F and every width multiples of 8, contiguous 16-byte-aligned
// weights and at most kMaxGroupedChoices choices; otherwise (and for fp32) the
// op computes the masked full-width MLP with ATen: correct, host-sync free,
// but at full-width cost.
//
// Backward: the masked full-width formula with ATen matmuls (recomputing the
// hidden activations); neurons no token uses get exactly-zero gradients.
// Versions: v1 (current) grouped forward + masked dense backward. Next: grouped
// backward in the band form (disjoint weight-gradient writes), DESIGN §3.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include <limits>

#include "cpu/checks.h"
#include "cpu/mlp_kernels.h"
#include "cuda/activation.cuh"
#include "cuda/grouping.cuh"
#include "ops.h"

namespace flextron {
namespace {

constexpr int64_t kMaxGroupedChoices = 32;
constexpr int64_t kAlignment = 8;  // elements per 16-byte access

// The widths, passed to kernels by value (no host-to-device copy to wait for).
struct WidthTable {
  int64_t width[kMaxGroupedChoices];
};

template <typename Element>
using GroupedGemm = cutlass::gemm::device::GemmGrouped<
    typename cutlass::gemm::kernel::DefaultGemmGrouped<
        Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignment, Element,
        cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignment, Element,
        cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
        cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
        cutlass::gemm::GemmShape<16, 8, 16>,
        cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
        cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4,
        cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel>;

// The device arrays GemmGrouped reads: one entry per problem.
template <typename Element>
struct ProblemArrays {
  Element** a;
  Element** b;
  Element** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
  cutlass::gemm::GemmCoord* sizes;
};

// One thread per problem. Problems [0, projections * C): up (then gate) of choice
// c = p % C; problems [projections * C, (projections + 1) * C): down of choice c.
template <typename Element>
__global__ void build_problems(const int64_t* __restrict__ offsets, WidthTable widths,
                               int64_t choices, int64_t hidden, int64_t ffn, int projections,
                               const Element* x_sorted, const Element* w_up, const Element* w_gate,
                               const Element* w_down, Element* up, Element* gate, Element* y_sorted,
                               ProblemArrays<Element> problems) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= (projections + 1) * choices) return;
  const int64_t c = p % choices;
  const int64_t first = offsets[c];
  const int rows = static_cast<int>(offsets[c + 1] - first);
  const int width = static_cast<int>(widths.width[c]);
  if (p < projections * choices) {  // (rows, width) = x_sorted[rows] @ w[:width]^T
    const bool is_gate = p >= choices;
    problems.sizes[p] = cutlass::gemm::GemmCoord(rows, width, static_cast<int>(hidden));
    problems.a[p] = const_cast<Element*>(x_sorted) + first * hidden;
    problems.lda[p] = hidden;
    problems.b[p] = const_cast<Element*>(is_gate ? w_gate : w_up);
    problems.ldb[p] = hidden;
    problems.d[p] = (is_gate ? gate : up) + first * ffn;
    problems.ldd[p] = ffn;
  } else {  // (rows, D) = hidden[rows, :width] @ w_down[:, :width]^T; hidden lives in `up`
    problems.sizes[p] = cutlass::gemm::GemmCoord(rows, static_cast<int>(hidden), width);
    problems.a[p] = up + first * ffn;
    problems.lda[p] = ffn;
    problems.b[p] = const_cast<Element*>(w_down);
    problems.ldb[p] = ffn;
    problems.d[p] = y_sorted + first * hidden;
    problems.ldd[p] = hidden;
  }
}

// One block per sorted row: up[r, :width] = act(gate[r, :width], up[r, :width]) in fp32.
template <typename Element>
__global__ void activate_rows(const Element* __restrict__ gate, Element* __restrict__ up,
                              const int64_t* __restrict__ choice, const int64_t* __restrict__ perm,
                              WidthTable widths, int64_t ffn, Activation activation) {
  const int64_t row = blockIdx.x;
  const int64_t width = widths.width[choice[perm[row]]];
  Element* up_row = up + row * ffn;
  const Element* gate_row = gate == nullptr ? nullptr : gate + row * ffn;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    const float g = gate_row == nullptr ? 0.f : static_cast<float>(gate_row[j]);
    up_row[j] = static_cast<Element>(apply_activation(activation, g, static_cast<float>(up_row[j])));
  }
}

// The MLP's hidden activation (ATen), `gate` undefined for the ungated ones.
at::Tensor activate(const at::Tensor& gate, const at::Tensor& up, const std::string& activation) {
  if (activation == "swiglu") return at::silu(gate) * up;
  if (activation == "relu") return at::relu(up);
  return at::gelu(up, activation == "gelu_tanh" ? "tanh" : "none");
}

// (T, F) bool: neuron j is active for token t iff j < widths[choice[t]].
at::Tensor width_mask(const at::Tensor& choice, at::IntArrayRef widths, int64_t ffn) {
  at::Tensor widths_host = at::empty({static_cast<int64_t>(widths.size())},
                                     at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(widths.begin(), widths.end(), widths_host.data_ptr<int64_t>());
  const at::Tensor token_width =
      widths_host.to(choice.device(), /*non_blocking=*/true).index_select(0, choice);  // (T,)
  return at::arange(ffn, choice.options()).unsqueeze(0) < token_width.unsqueeze(1);
}

bool can_group(const at::Tensor& x, const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
               const at::Tensor& w_down, at::IntArrayRef widths) {
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) return false;
  if (static_cast<int64_t>(widths.size()) > kMaxGroupedChoices) return false;
  if (x.size(1) % kAlignment != 0 || w_up.size(0) % kAlignment != 0) return false;
  for (const int64_t width : widths) {
    if (width % kAlignment != 0) return false;
  }
  auto dense_aligned = [](const at::Tensor& w) {
    return w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  };
  return dense_aligned(w_up) && dense_aligned(w_down) && (!w_gate.has_value() || dense_aligned(*w_gate));
}

template <typename Element>
void run_grouped(ProblemArrays<Element> problems, int first, int count, cudaStream_t stream) {
  using Gemm = GroupedGemm<Element>;
  const int threadblocks = Gemm::sufficient();
  TORCH_CHECK(threadblocks > 0, "routed_nested_mlp: no threadblock fits this GPU's shared memory");
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);  // beta = 0: C is never read
  typename Gemm::Arguments args(problems.sizes + first, count, threadblocks, epilogue,
                                problems.a + first, problems.b + first, problems.d + first,
                                problems.d + first, problems.lda + first, problems.ldb + first,
                                problems.ldd + first, problems.ldd + first);
  Gemm gemm;
  cutlass::Status status = gemm.initialize(args, nullptr, stream);  // device-only: no workspace
  TORCH_CHECK(status == cutlass::Status::kSuccess, "routed_nested_mlp: CUTLASS grouped GEMM set-up failed: ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "routed_nested_mlp: CUTLASS grouped GEMM failed: ",
              cutlassGetStatusString(status));
}

template <typename Element>
at::Tensor forward_grouped(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                           const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& choice,
                           at::IntArrayRef widths, const std::string& activation) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t tokens = x.size(0), hidden = x.size(1), ffn = w_up.size(0);
  const int64_t choices = static_cast<int64_t>(widths.size());
  const int projections = w_gate.has_value() ? 2 : 1;
  const grouping::TokenGroups groups = grouping::group_by_choice(choice, choices, stream);
  const at::Tensor x_sorted = x.index_select(0, groups.perm);  // (T, D), contiguous
  at::Tensor up = at::empty({tokens, ffn}, x.options());       // up, then hidden
  at::Tensor gate = w_gate.has_value() ? at::empty({tokens, ffn}, x.options()) : at::Tensor();
  at::Tensor y_sorted = at::empty({tokens, hidden}, x.options());

  WidthTable table{};
  std::copy(widths.begin(), widths.end(), table.width);
  const int64_t count = (projections + 1) * choices;
  // One byte buffer for the problem arrays: pointers and leading dims (8 bytes), then sizes.
  at::Tensor arrays = at::empty({count * (6 * 8 + static_cast<int64_t>(sizeof(cutlass::gemm::GemmCoord)))},
                                x.options().dtype(at::kByte));
  auto* base = reinterpret_cast<int64_t*>(arrays.data_ptr());
  ProblemArrays<Element> problems{
      reinterpret_cast<Element**>(base),         reinterpret_cast<Element**>(base + count),
      reinterpret_cast<Element**>(base + 2 * count), base + 3 * count,
      base + 4 * count,                          base + 5 * count,
      reinterpret_cast<cutlass::gemm::GemmCoord*>(base + 6 * count)};
  const auto* x_ptr = reinterpret_cast<const Element*>(x_sorted.data_ptr());
  auto elements = [](const at::Tensor& t) { return reinterpret_cast<Element*>(t.data_ptr()); };
  build_problems<Element><<<1, 128, 0, stream>>>(
      groups.offsets.data_ptr<int64_t>(), table, choices, hidden, ffn, projections, x_ptr,
      elements(w_up), w_gate.has_value() ? elements(*w_gate) : nullptr, elements(w_down),
      elements(up), gate.defined() ? elements(gate) : nullptr, elements(y_sorted), problems);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  run_grouped<Element>(problems, 0, static_cast<int>(projections * choices), stream);
  activate_rows<Element><<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
      gate.defined() ? elements(gate) : nullptr, elements(up), choice.data_ptr<int64_t>(),
      groups.perm.data_ptr<int64_t>(), table, ffn, parse_activation(activation));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_grouped<Element>(problems, static_cast<int>(projections * choices),
                       static_cast<int>(choices), stream);
  return y_sorted.index_select(0, groups.inv_perm);
}

}  // namespace

at::Tensor routed_nested_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                  const at::Tensor& w_up, const at::Tensor& w_down,
                                  const at::Tensor& choice, at::IntArrayRef widths,
                                  const std::optional<at::Tensor>& scale,
                                  const std::string& activation) {
  constexpr const char* op = "routed_nested_mlp";
  check_routed_args(op, x, w_gate, w_up, w_down, choice, widths, scale, activation);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t tokens = x.size(0);
  TORCH_CHECK(tokens <= std::numeric_limits<int>::max(), op, ": x has ", tokens,
              " tokens, more than a CUTLASS GEMM takes");
  if (tokens == 0) return at::zeros_like(x);
  const at::Tensor choice_c = choice.contiguous();

  at::Tensor y;
  if (can_group(x, w_gate, w_up, w_down, widths)) {
    y = x.scalar_type() == at::kBFloat16
            ? forward_grouped<cutlass::bfloat16_t>(x, w_gate, w_up, w_down, choice_c, widths, activation)
            : forward_grouped<cutlass::half_t>(x, w_gate, w_up, w_down, choice_c, widths, activation);
  } else {  // the masked full-width MLP
    const at::Tensor gate = w_gate.has_value() ? at::mm(x, w_gate->t()) : at::Tensor();
    const at::Tensor hidden = at::where(width_mask(choice_c, widths, w_up.size(0)),
                                        activate(gate, at::mm(x, w_up.t()), activation), 0);
    y = at::mm(hidden, w_down.t());
  }
  if (scale.has_value()) y.mul_(scale->to(y.scalar_type()).unsqueeze(1));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
routed_nested_mlp_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                                const at::Tensor& w_down, const at::Tensor& choice,
                                at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                                const std::string& activation) {
  constexpr const char* op = "routed_nested_mlp_backward";
  check_routed_backward_args(op, grad_out, x, w_gate, w_up, w_down, choice, widths, scale,
                             activation);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor empty = at::empty({0}, x.options());

  // Recompute the masked hidden activations at full width (T, F).
  const at::Tensor mask = width_mask(choice.contiguous(), widths, w_up.size(0));
  const at::Tensor gate = w_gate.has_value() ? at::mm(x, w_gate->t()) : at::Tensor();
  const at::Tensor up = at::mm(x, w_up.t());
  const at::Tensor hidden = at::where(mask, activate(gate, up, activation), 0);

  at::Tensor grad_scale = empty;
  at::Tensor grad_mlp = grad_out;  // gradient w.r.t. the unscaled MLP output (T, D)
  if (scale.has_value()) {
    const at::Tensor mlp_out = at::mm(hidden, w_down.t());
    grad_scale = (grad_out.to(at::kFloat) * mlp_out.to(at::kFloat)).sum(1).to(scale->scalar_type());
    grad_mlp = grad_out * scale->to(x.scalar_type()).unsqueeze(1);
  }
  const at::Tensor grad_w_down = at::mm(grad_mlp.t(), hidden);                   // (D, F)
  const at::Tensor grad_hidden = at::where(mask, at::mm(grad_mlp, w_down), 0);  // (T, F)
  at::Tensor grad_up, grad_gate;
  if (activation == "swiglu") {
    grad_up = grad_hidden * at::silu(gate);
    grad_gate = at::silu_backward(grad_hidden * up, gate);
  } else if (activation == "relu") {
    grad_up = at::threshold_backward(grad_hidden, up, 0);
  } else {
    grad_up = at::gelu_backward(grad_hidden, up, activation == "gelu_tanh" ? "tanh" : "none");
  }
  at::Tensor grad_x = at::mm(grad_up, w_up);
  if (grad_gate.defined()) grad_x.addmm_(grad_gate, *w_gate);
  return {grad_x, grad_gate.defined() ? at::mm(grad_gate.t(), x) : empty, at::mm(grad_up.t(), x),
          grad_w_down, grad_scale};
}

}  // namespace flextron
