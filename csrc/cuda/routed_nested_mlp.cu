// routed_nested_mlp on CUDA: token t runs the MLP at width widths[choice[t]]
// (widths strictly descending), output scaled by scale[t].
//
// Why grouped GEMMs: tokens of one choice form one GEMM on a prefix of the same
// weights, so after grouping the tokens by choice (the counting sort shared
// with route, grouping.cuh) the whole layer is a few CUTLASS GemmGrouped
// launches with one problem per (choice, projection): a narrower choice costs
// proportionally less and no weight is copied or masked. Problem sizes,
// pointers and leading dimensions are written on the device from the
// grouping's offsets (grouped_gemm.cuh) and the schedule is CUTLASS's
// device-only one, so nothing waits for the host (CUDA-graph capturable).
//
// Forward:
//   1. group_by_choice -> perm, inv_perm, offsets; gather x by perm.
//   2. grouped GEMM: for each choice c, up (and gate) rows of choice c =
//      x_sorted[rows] @ w[:padded[c], :]^T into (T, F) buffers (columns past
//      the row's padded width are never written nor read).
//   3. activate_rows: hidden = act(gate, up) in place of up, on each row's prefix,
//      and 0 on the padding [widths[c], padded[c]).
//   4. grouped GEMM: y_sorted[rows] = hidden[rows, :padded[c]] @ w_down[:, :padded[c]]^T.
// padded[c] is widths[c] rounded up to a multiple of 8 (the kernels' 16-byte accesses):
// the padding's hidden values are zeros, so the GEMMs over the padded prefix give the
// exact result for any width, at most 7 neurons' extra work per choice instead of the
// masked full-width fallback.
//   5. y = y_sorted[inv_perm] (* scale).
// On sm_90 devices, when the build includes 90a, every grouped GEMM (forward
// and backward) runs the CUTLASS 3.x ptr-array kernel (TMA + wgmma,
// sm90_grouped_gemm.cuh) on the same problem arrays, once it has matched the 2.x
// kernel on a small problem in this process (sm90_checked; FLEXTRON_ROUTED_GEMM=sm90
// skips the check, =sm80 never runs 3.x); elsewhere, after a failed check, or when
// CUTLASS declines the 3.x kernel (a one-time warning), the CUTLASS 2.x GemmGrouped below.
//
// Backward, in the band form (DESIGN §3): in sorted order neuron band j,
// [padded[j+1], padded[j]), is used by the prefix of rows [0, offsets[j+1]) (an empty
// band, when two widths pad alike, gets no tiles). Every GEMM runs on padded widths.
//   1. group, gather x and grad_out by perm; recompute up/gate (forward step 2)
//      and hidden = act(gate, up) into its own buffer.
//   2. grouped GEMM: grad_hidden[rows] = grad_out_sorted[rows] @ w_down[:, :widths[c]].
//   3. backward_rows: per row, grad_scale = <grad_hidden, hidden> (the gradient
//      w.r.t. the scale is <grad_out, unscaled output>), grad_hidden and the
//      row of grad_out are scaled, and the activation's backward writes
//      grad_up / grad_gate over up / gate (zeros on the padding, so the padded
//      neurons add nothing to grad_x and their weight gradients are zero).
//   4. grouped GEMMs: grad_x_sorted[rows] = grad_up @ w_up[:widths[c]]
//      (+ grad_gate @ w_gate[:widths[c]], a second launch with beta = 1).
//   5. one grouped GEMM over the bands (3 problems per band): with n = offsets[j+1],
//      grad_w_down[:, band] = grad_out_sorted[:n]^T @ hidden[:n, band] and
//      grad_w_up[band] = grad_up[:n, band]^T @ x_sorted[:n] (gate alike):
//      disjoint outputs, no atomics, each weight band read once.
//   6. zero_unused_neurons: a band with no rows (K = 0) gets no tiles (M = 0 in
//      its problem: K = 0 problems are not safe in grouped GEMMs) and its
//      gradient is written as zeros here; the bands in use are a prefix of the
//      neurons, so this is the suffix [used, F).
//   7. grad_x = grad_x_sorted[inv_perm].
//
// Kernels: bf16/fp16 tensor-op (sm80 mma.sync 16x8x16, fp32 accumulation,
// 128x128x32 tiles, 4 stages, 16-byte accesses), one GemmGrouped per (dtype,
// operand layouts): row x col (forward, recompute), row x row (grad_hidden,
// grad_x), col x row (weight gradients), so 6 instantiations. They need D and F
// multiples of 8 (D > 0: K = 0 GEMMs are not safe; widths are padded), contiguous
// 16-byte-aligned weights and at most kMaxGroupedChoices choices; otherwise (and
// for fp32, or when CUTLASS declines a 2.x kernel; a one-time warning per reason names
// it and the shape) the op computes the masked full-width MLP with ATen: correct,
// host-sync free, but at full-width cost.
//
// Versions: v1 grouped forward + masked dense backward; v2 band-form grouped
// backward, sm90a ptr-array forward; v3 (current) sm90a ptr-array backward too,
// fallbacks 3.x -> 2.x -> ATen; widths padded to a multiple of 8 rather than masked.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/mlp_kernels.h"
#include "cuda/activation.cuh"
#include "cuda/fallback_warning.h"
#include "cuda/grouped_gemm.cuh"
#include "cuda/grouping.cuh"
#include "ops.h"

namespace flextron {
namespace {

constexpr int64_t kMaxGroupedChoices = 32;
constexpr int64_t kMaxMaskChoices = 256;  // the masked path's widths by value (2 KiB)
constexpr int64_t kAlignment = 8;         // elements per 16-byte access

// The widths, passed to kernels by value: no host-to-device copy to wait for, and a
// CUDA graph captures them (a copy from a temporary pinned buffer would be replayed
// from memory freed after the capture).
template <int64_t Capacity>
struct Widths {
  int64_t width[Capacity];
};
using WidthTable = Widths<kMaxGroupedChoices>;

template <int64_t Capacity = kMaxGroupedChoices>
Widths<Capacity> width_table(at::IntArrayRef widths) {
  Widths<Capacity> table{};
  std::copy(widths.begin(), widths.end(), table.width);
  return table;
}

// The widths the grouped GEMMs run: each rounded up to a multiple of kAlignment (at most F,
// which is one). Non-increasing; two widths of one 8-block pad alike.
WidthTable padded_width_table(at::IntArrayRef widths) {
  WidthTable table = width_table(widths);
  for (size_t c = 0; c < widths.size(); ++c) {
    table.width[c] = (table.width[c] + kAlignment - 1) / kAlignment * kAlignment;
  }
  return table;
}

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

template <typename Element, typename LayoutA, typename LayoutB>
using GroupedGemm = cutlass::gemm::device::GemmGrouped<
    typename cutlass::gemm::kernel::DefaultGemmGrouped<
        Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment, Element, LayoutB,
        cutlass::ComplexTransform::kNone, kAlignment, Element, RowMajor, float,
        cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
        cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>,
        cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
        cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 4,
        cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel>;

// Writes problem p. The int casts are safe: T <= INT_MAX is checked on entry and
// D, F fit a CUTLASS GEMM by the same check on the weights.
template <typename Element>
__device__ void set_problem(ProblemArrays<Element> problems, int64_t p, int64_t m, int64_t n,
                            int64_t k, const Element* a, int64_t lda, const Element* b,
                            int64_t ldb, Element* d, int64_t ldd) {
  problems.sizes[p] = cutlass::gemm::GemmCoord(static_cast<int>(m), static_cast<int>(n),
                                               static_cast<int>(k));
  problems.a[p] = const_cast<Element*>(a);
  problems.lda[p] = lda;
  problems.b[p] = const_cast<Element*>(b);
  problems.ldb[p] = ldb;
  problems.d[p] = d;
  problems.ldd[p] = ldd;
}

// The operands of both passes, in sorted token order where per token.
template <typename Element>
struct Operands {
  const Element* x_sorted;  // (T, D)
  const Element* w_gate;    // (F, D) or null
  const Element* w_up;      // (F, D)
  const Element* w_down;    // (D, F)
  Element* gate;            // (T, F): gate pre-activations, then grad_gate (backward)
  Element* up;              // (T, F): up pre-activations, then hidden (forward) or grad_up
  Element* y_sorted;        // forward: (T, D) output
  // Backward only.
  Element* grad_sorted;   // (T, D): grad_out rows, scaled by the scale in backward_rows
  Element* hidden;        // (T, F)
  Element* grad_hidden;   // (T, F)
  Element* grad_x_sorted; // (T, D)
  Element* grad_w_gate;   // (F, D) or null
  Element* grad_w_up;     // (F, D)
  Element* grad_w_down;   // (D, F)
};

// Problems of the up/gate GEMMs, [0, projections * C): up (then gate) of choice c = p % C,
// (rows, width) = x_sorted[rows] @ w[:width]^T. Row-major A, column-major B.
template <typename Element>
__device__ void set_up_gate_problem(ProblemArrays<Element> problems, int64_t p, int64_t c,
                                    bool is_gate, const int64_t* offsets, const WidthTable& widths,
                                    int64_t hidden, int64_t ffn, const Operands<Element>& ops) {
  const int64_t first = offsets[c];
  set_problem(problems, p, offsets[c + 1] - first, widths.width[c], hidden,
              ops.x_sorted + first * hidden, hidden, is_gate ? ops.w_gate : ops.w_up, hidden,
              (is_gate ? ops.gate : ops.up) + first * ffn, ffn);
}

// Forward problems: [0, projections * C) up/gate; [projections * C, (projections + 1) * C)
// (rows, D) = hidden[rows, :width] @ w_down[:, :width]^T (hidden lives in `up`). One
// thread per problem.
template <typename Element>
__global__ void build_forward_problems(const int64_t* __restrict__ offsets, WidthTable widths,
                                       int64_t choices, int64_t hidden, int64_t ffn,
                                       int projections, Operands<Element> ops,
                                       ProblemArrays<Element> problems) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= (projections + 1) * choices) return;
  const int64_t c = p % choices;
  if (p < projections * choices) {
    set_up_gate_problem(problems, p, c, p >= choices, offsets, widths, hidden, ffn, ops);
    return;
  }
  const int64_t first = offsets[c];
  set_problem(problems, p, offsets[c + 1] - first, hidden, widths.width[c], ops.up + first * ffn,
              ffn, ops.w_down, ffn, ops.y_sorted + first * hidden, hidden);
}

// Where each launch's problems sit in the backward's arrays (C choices, P projections).
struct BackwardLayout {
  int64_t choices;
  int projections;
  // P * C up/gate recompute (row x col), then C grad_hidden (row x row).
  __host__ __device__ int64_t grad_hidden() const { return projections * choices; }
  // C grad_x from grad_up, then C from grad_gate if gated (row x row).
  __host__ __device__ int64_t grad_x_up() const { return grad_hidden() + choices; }
  __host__ __device__ int64_t grad_x_gate() const { return grad_x_up() + choices; }
  // (P + 1) * C weight-gradient bands: down, up, gate (col x row).
  __host__ __device__ int64_t bands() const { return grad_x_up() + projections * choices; }
  __host__ __device__ int64_t count() const { return bands() + (projections + 1) * choices; }
};

// One thread per backward problem.
template <typename Element>
__global__ void build_backward_problems(const int64_t* __restrict__ offsets, WidthTable widths,
                                        BackwardLayout layout, int64_t hidden, int64_t ffn,
                                        Operands<Element> ops, ProblemArrays<Element> problems) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t choices = layout.choices;
  if (p >= layout.count()) return;
  if (p < layout.grad_hidden()) {
    set_up_gate_problem(problems, p, p % choices, p >= choices, offsets, widths, hidden, ffn, ops);
  } else if (p < layout.grad_x_up()) {  // (rows, width) = grad_sorted[rows] @ w_down[:, :width]
    const int64_t c = p - layout.grad_hidden(), first = offsets[c];
    set_problem(problems, p, offsets[c + 1] - first, widths.width[c], hidden,
                ops.grad_sorted + first * hidden, hidden, ops.w_down, ffn,
                ops.grad_hidden + first * ffn, ffn);
  } else if (p < layout.bands()) {  // (rows, D) = grad_up|gate[rows, :width] @ w[:width]
    const int64_t q = p - layout.grad_x_up(), c = q % choices, first = offsets[c];
    const bool is_gate = q >= choices;
    set_problem(problems, p, offsets[c + 1] - first, hidden, widths.width[c],
                (is_gate ? ops.gate : ops.up) + first * ffn, ffn, is_gate ? ops.w_gate : ops.w_up,
                hidden, ops.grad_x_sorted + first * hidden, hidden);
  } else {  // band j of grad_w_down, grad_w_up, grad_w_gate; K = the rows using the band
    const int64_t q = p - layout.bands(), j = q % choices, kind = q / choices;
    const int64_t rows = offsets[j + 1];
    const int64_t lo = j + 1 < choices ? widths.width[j + 1] : 0, band = widths.width[j] - lo;
    const int64_t m_if_used = rows > 0 && band > 0 ? 1 : 0;  // no tiles for an unused or empty band
    if (kind == 0) {  // (D, band) = grad_sorted[:rows]^T @ hidden[:rows, lo:hi]
      set_problem(problems, p, m_if_used * hidden, band, rows, ops.grad_sorted, hidden,
                  ops.hidden + lo, ffn, ops.grad_w_down + lo, ffn);
    } else {  // (band, D) = grad_up|gate[:rows, lo:hi]^T @ x_sorted[:rows]
      const bool is_gate = kind == 2;
      set_problem(problems, p, m_if_used * band, hidden, rows, (is_gate ? ops.gate : ops.up) + lo,
                  ffn, ops.x_sorted, hidden,
                  (is_gate ? ops.grad_w_gate : ops.grad_w_up) + lo * hidden, hidden);
    }
  }
}

// One block per sorted row of choice c: out[r, :width] = act(gate[r, :width], up[r, :width])
// in fp32, and out[r, width:padded] = 0. `out` may be `up` (forward, in place) or a separate
// buffer (backward's hidden).
template <typename Element>
__global__ void activate_rows(const Element* gate, const Element* up, Element* out,
                              const int64_t* __restrict__ choice, const int64_t* __restrict__ perm,
                              WidthTable widths, WidthTable padded, int64_t ffn, Activation activation) {
  const int64_t row = blockIdx.x, c = choice[perm[row]];
  const int64_t width = widths.width[c];
  for (int64_t j = threadIdx.x; j < padded.width[c]; j += blockDim.x) {
    if (j >= width) {
      out[row * ffn + j] = static_cast<Element>(0.f);
      continue;
    }
    const float g = gate == nullptr ? 0.f : static_cast<float>(gate[row * ffn + j]);
    out[row * ffn + j] = static_cast<Element>(
        apply_activation(activation, g, static_cast<float>(up[row * ffn + j])));
  }
}

constexpr int kRowThreads = 256;

// One block (kRowThreads) per sorted row r, token perm[r], width w, padded width p: with
// s = scale[token] (1 without a scale), grad_scale[token] = <grad_hidden[r, :w], hidden[r, :w]>,
// then up[r, :w] <- grad_up and gate[r, :w] <- grad_gate of the activation at s * grad_hidden,
// both 0 on [w, p), and grad_sorted[r] *= s (for grad_w_down).
template <typename Element>
__global__ void backward_rows(Element* __restrict__ gate, Element* __restrict__ up,
                              const Element* __restrict__ hidden,
                              const Element* __restrict__ grad_hidden,
                              Element* __restrict__ grad_sorted, const Element* __restrict__ scale,
                              float* __restrict__ grad_scale, const int64_t* __restrict__ choice,
                              const int64_t* __restrict__ perm, WidthTable widths, WidthTable padded,
                              int64_t ffn, int64_t hidden_size, Activation activation) {
  const int64_t row = blockIdx.x, token = perm[row];
  const int64_t width = widths.width[choice[token]];
  const float s = scale == nullptr ? 1.f : static_cast<float>(scale[token]);
  const int64_t base = row * ffn;
  for (int64_t j = width + threadIdx.x; j < padded.width[choice[token]]; j += blockDim.x) {
    up[base + j] = static_cast<Element>(0.f);
    if (gate != nullptr) gate[base + j] = static_cast<Element>(0.f);
  }
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    const float gh = static_cast<float>(grad_hidden[base + j]);
    dot += gh * static_cast<float>(hidden[base + j]);
    const float g = gate == nullptr ? 0.f : static_cast<float>(gate[base + j]);
    float grad_up, grad_gate;
    activation_grad(activation, g, static_cast<float>(up[base + j]), gh * s, grad_up, grad_gate);
    up[base + j] = static_cast<Element>(grad_up);
    if (gate != nullptr) gate[base + j] = static_cast<Element>(grad_gate);
  }
  if (scale == nullptr) return;
  for (int64_t j = threadIdx.x; j < hidden_size; j += blockDim.x) {
    Element& value = grad_sorted[row * hidden_size + j];
    value = static_cast<Element>(static_cast<float>(value) * s);
  }
  // Block sum of dot: warp shuffles, then one warp over the warps' partial sums.
  __shared__ float partial[kRowThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x < 32) {
    dot = threadIdx.x < kRowThreads / 32 ? partial[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if (threadIdx.x == 0) grad_scale[token] = dot;
  }
}

// Zeros the weight gradients of the neurons no token uses, [used, F), where used is the
// widest (padded) width that has tokens (0 if none). Block (x, kind): kind 0 zeros columns
// [used, F) of grad_w_down row x (D rows); kinds 1, 2 zero row x >= used of
// grad_w_up / grad_w_gate (F rows).
template <typename Element>
__global__ void zero_unused_neurons(const int64_t* __restrict__ offsets, WidthTable widths,
                                    int64_t choices, int64_t hidden, int64_t ffn,
                                    Element* grad_w_down, Element* grad_w_up, Element* grad_w_gate) {
  int64_t used = 0;
  for (int64_t c = 0; c < choices; ++c) {
    if (offsets[c + 1] > 0) {
      used = widths.width[c];
      break;
    }
  }
  const int64_t row = blockIdx.x;
  const Element zero = static_cast<Element>(0.f);
  if (blockIdx.y == 0) {
    if (row >= hidden) return;
    for (int64_t j = used + threadIdx.x; j < ffn; j += blockDim.x) grad_w_down[row * ffn + j] = zero;
    return;
  }
  Element* grad = blockIdx.y == 1 ? grad_w_up : grad_w_gate;
  if (row >= ffn || row < used) return;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) grad[row * hidden + j] = zero;
}

// mask[t, j] = j < widths[choice[t]]: (T, F) bool, one thread per element. A choice out
// of [0, choices) trips a device-side assert, as on the grouped path.
__global__ void fill_width_mask(const int64_t* __restrict__ choice, Widths<kMaxMaskChoices> widths,
                                int64_t choices, int64_t tokens, int64_t ffn,
                                bool* __restrict__ mask) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * ffn) return;
  const int64_t c = choice[i / ffn];
  CUDA_KERNEL_ASSERT(c >= 0 && c < choices && "choice out of range");
  mask[i] = c >= 0 && c < choices && i % ffn < widths.width[c];
}

// The 2.x kernel's resident threadblocks per launch on the current device (occupancy x
// SMs; 0 when a threadblock does not fit): queried once per device, not per call.
template <typename Gemm>
int threadblocks_per_launch() {
  static std::mutex mutex;
  static std::vector<int> by_device;  // -1: not queried yet
  const int device = at::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(by_device.size()) <= device) by_device.resize(device + 1, -1);
  if (by_device[device] < 0) by_device[device] = Gemm::sufficient();
  return by_device[device];
}

// Thrown by run_grouped when CUTLASS declines a 2.x grouped GEMM before launching it: the
// op then computes the masked full-width MLP instead (what the grouped path enqueued
// before is discarded with its buffers).
struct GroupedGemmDeclined {
  std::string reason;
};

// Why the grouped CUTLASS kernels cannot take these operands ("" when they can).
std::string grouped_unsupported(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                                const at::Tensor& w_up, const at::Tensor& w_down, at::IntArrayRef widths) {
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) {
    return std::string("no grouped kernel for ") + c10::toString(x.scalar_type()) + " (bf16 and fp16 only)";
  }
  if (static_cast<int64_t>(widths.size()) > kMaxGroupedChoices) {
    return "more than " + std::to_string(kMaxGroupedChoices) + " widths";
  }
  // D = 0 would make K = 0 problems (up/gate, grad_hidden), which grouped GEMMs read out of
  // bounds on; the masked path's ATen GEMMs handle it.
  if (x.size(1) == 0) return "hidden size 0";
  if (x.size(1) % kAlignment != 0 || w_up.size(0) % kAlignment != 0) {
    return "hidden size or d_ff not a multiple of " + std::to_string(kAlignment);
  }
  auto dense_aligned = [](const at::Tensor& w) {
    return w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
  };
  if (!dense_aligned(w_up) || !dense_aligned(w_down) || (w_gate.has_value() && !dense_aligned(*w_gate))) {
    return "weights not contiguous and 16-byte aligned";
  }
  return "";
}

// "T=.. D=.. F=.. widths [..]": the shape a fallback warning names.
std::string routed_shape(const at::Tensor& x, const at::Tensor& w_up, at::IntArrayRef widths) {
  std::ostringstream shape;
  shape << "T=" << x.size(0) << " D=" << x.size(1) << " F=" << w_up.size(0) << " widths " << widths;
  return shape.str();
}

// Whether the grouped kernels take the operands; warns once per reason when they do not.
bool can_group(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
               const at::Tensor& w_up, const at::Tensor& w_down, at::IntArrayRef widths) {
  const std::string reason = grouped_unsupported(x, w_gate, w_up, w_down, widths);
  if (reason.empty()) return true;
  warn_fallback(op, reason, routed_shape(x, w_up, widths), "the masked full-width MLP (ATen)");
  return false;
}

// Runs problems [first, first + count) with the 2.x kernel of the given operand layouts:
// D = A @ B + beta * D. Throws GroupedGemmDeclined, having launched nothing, when CUTLASS
// cannot run it.
template <typename Element, typename LayoutA, typename LayoutB>
void run_grouped(ProblemArrays<Element> problems, int64_t first, int64_t count, float beta,
                 cudaStream_t stream) {
  using Gemm = GroupedGemm<Element, LayoutA, LayoutB>;
  const int threadblocks = threadblocks_per_launch<Gemm>();
  if (threadblocks <= 0) throw GroupedGemmDeclined{"no threadblock fits the GPU's shared memory"};
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, beta);  // beta = 0: C is never read
  typename Gemm::Arguments args(problems.sizes + first, static_cast<int>(count), threadblocks,
                                epilogue, problems.a + first, problems.b + first,
                                problems.d + first, problems.d + first, problems.lda + first,
                                problems.ldb + first, problems.ldd + first, problems.ldd + first);
  Gemm gemm;
  cutlass::Status status = Gemm::can_implement(args);
  if (status == cutlass::Status::kSuccess) {
    status = gemm.initialize(args, nullptr, stream);  // device-only schedule: no workspace
  }
  if (status != cutlass::Status::kSuccess) throw GroupedGemmDeclined{cutlassGetStatusString(status)};
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "routed_nested_mlp: CUTLASS grouped GEMM failed: ",
              cutlassGetStatusString(status));
}

template <typename Element>
Element* elements(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<Element*>(t.data_ptr()) : nullptr;
}

template <typename Element>
Element* elements(const std::optional<at::Tensor>& t) {
  return t.has_value() ? elements<Element>(*t) : nullptr;
}

#ifdef FLEXTRON_WITH_SM90
// Which grouped GEMM the 16-bit path runs on sm_90 devices: FLEXTRON_ROUTED_GEMM=auto (unset:
// the CUTLASS 3.x kernel once it has matched the 2.x kernel on a small problem in this
// process), sm90 (the 3.x kernel, unchecked) or sm80 (the 2.x kernel). Read per call: tests
// and gpu_smoke.py switch it.
enum class RoutedGemm { kAuto, kSm90, kSm80 };

RoutedGemm routed_gemm_choice() {
  const char* value = std::getenv("FLEXTRON_ROUTED_GEMM");
  const std::string choice = value == nullptr ? "" : value;
  if (choice.empty() || choice == "auto") return RoutedGemm::kAuto;
  if (choice == "sm90") return RoutedGemm::kSm90;
  if (choice == "sm80") return RoutedGemm::kSm80;
  TORCH_CHECK(false, "FLEXTRON_ROUTED_GEMM must be auto, sm90 or sm80, got '", choice, "'");
}

template <typename Layout>
const char* layout_name() {
  return std::is_same_v<Layout, RowMajor> ? "row-major" : "column-major";
}

// The self-check's problems, (M, N, K): partial tiles in M and N, K tails of the 32- and
// 64-deep k tiles, two groups so that the kernels move between problems.
constexpr int64_t kCheckShapes[2][3] = {{136, 72, 40}, {24, 200, 72}};

// Runs the self-check's problems on both kernels and returns what disagrees ("" when they
// agree). The operands are small integers / 4: every product and sum is exact in fp32, so the
// two kernels round the same values and agree to the last bit unless one is wrong. The
// row-major x row-major pair is the one run with beta = 1 (C == D, read in place): checked so.
template <typename Element, typename LayoutA, typename LayoutB>
std::string sm90_disagreement(cudaStream_t stream) {
  constexpr bool row_row = std::is_same_v<LayoutA, RowMajor> && std::is_same_v<LayoutB, RowMajor>;
  const float beta = row_row ? 1.f : 0.f;
  const at::ScalarType dtype = std::is_same_v<Element, cutlass::half_t> ? at::kHalf : at::kBFloat16;
  const at::TensorOptions options = at::TensorOptions().device(at::kCUDA).dtype(dtype);
  auto pattern = [&](int64_t n, int64_t stride) {  // deterministic: the global RNG is left alone
    return (at::arange(n, options.dtype(at::kLong)).mul(stride).remainder(13).sub(6)).to(dtype).div(4);
  };
  constexpr int64_t count = 2;
  std::vector<at::Tensor> a(count), b(count), d3(count), d2(count);
  std::vector<uint8_t> bytes3(count * kProblemBytes), bytes2(count * kProblemBytes);
  const ProblemArrays<Element> host3 = carve_problem_arrays<Element>(bytes3.data(), count);
  const ProblemArrays<Element> host2 = carve_problem_arrays<Element>(bytes2.data(), count);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t m = kCheckShapes[p][0], n = kCheckShapes[p][1], k = kCheckShapes[p][2];
    a[p] = pattern(m * k, 7);
    b[p] = pattern(k * n, 5);
    d2[p] = pattern(m * n, 3);  // C for beta = 1
    d3[p] = d2[p].clone();
    for (const ProblemArrays<Element>* host : {&host3, &host2}) {
      host->sizes[p] = cutlass::gemm::GemmCoord(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
      host->a[p] = elements<Element>(a[p]);
      host->lda[p] = std::is_same_v<LayoutA, RowMajor> ? k : m;
      host->b[p] = elements<Element>(b[p]);
      host->ldb[p] = std::is_same_v<LayoutB, RowMajor> ? n : k;
      host->ldd[p] = n;
    }
    host3.d[p] = elements<Element>(d3[p]);
    host2.d[p] = elements<Element>(d2[p]);
  }
  auto to_device = [&](std::vector<uint8_t>& host) {
    return at::from_blob(host.data(), {count * kProblemBytes}, at::kByte).to(at::kCUDA);
  };
  const at::Tensor arrays3 = to_device(bytes3), arrays2 = to_device(bytes2);
  const std::string declined = sm90::grouped_gemm<Element, LayoutA, LayoutB>(
      carve_problem_arrays<Element>(arrays3.data_ptr(), count), 0, count, beta, stream);
  if (!declined.empty()) return "the 3.x kernel declined the problems (" + declined + ")";
  try {
    run_grouped<Element, LayoutA, LayoutB>(carve_problem_arrays<Element>(arrays2.data_ptr(), count), 0,
                                           count, beta, stream);
  } catch (const GroupedGemmDeclined& declined) {
    return "the 2.x kernel to compare with cannot run (" + declined.reason + ")";
  }
  for (int64_t p = 0; p < count; ++p) {
    const float error = (d3[p].to(at::kFloat) - d2[p].to(at::kFloat)).abs().max().item<float>();
    const float scale = d2[p].to(at::kFloat).abs().max().item<float>();
    if (!(error <= 1e-2f * scale)) {  // NaN fails too
      std::ostringstream what;
      what << "max |3.x - 2.x| = " << error << " (max |2.x| = " << scale << ") on the " << kCheckShapes[p][0]
           << " x " << kCheckShapes[p][1] << " x " << kCheckShapes[p][2] << " (M x N x K) problem, "
           << (dtype == at::kHalf ? "fp16" : "bf16") << ", A " << layout_name<LayoutA>() << ", B "
           << layout_name<LayoutB>() << ", beta " << beta;
      return what.str();
    }
  }
  return "";
}

// Whether the 3.x kernel of this dtype and layout pair passed its self-check: run once per
// process, at the first call outside CUDA-graph capture (the check copies from the host and
// reads its result back); until then, and after a mismatch (warned once), the 2.x kernel runs.
template <typename Element, typename LayoutA, typename LayoutB>
bool sm90_checked(cudaStream_t stream) {
  static std::once_flag once;
  static std::atomic<bool> done{false}, agrees{false};
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return done && agrees;
  std::call_once(once, [&] {
    std::string disagreement;
    try {
      disagreement = sm90_disagreement<Element, LayoutA, LayoutB>(stream);
    } catch (const c10::Error& error) {  // a launch that failed: as wrong as a wrong result
      disagreement = std::string("the check raised: ") + error.what_without_backtrace();
    }
    if (!disagreement.empty()) {
      TORCH_WARN("routed_nested_mlp: the CUTLASS 3.x (sm90) grouped GEMM failed its self-check against "
                 "the 2.x kernel: ", disagreement, "; this process uses the 2.x kernel "
                 "(FLEXTRON_ROUTED_GEMM=sm90 forces the 3.x kernel)");
    }
    agrees = disagreement.empty();
    done = true;
  });
  return agrees;
}
#endif

// The routed call a grouped GEMM serves: what a fallback warning names.
struct RoutedCall {
  const char* op;
  const at::Tensor& x;
  const at::Tensor& w_up;
  at::IntArrayRef widths;
};

// Problems [first, first + count) on the sm90a ptr-array kernel where it runs and is chosen
// (FLEXTRON_ROUTED_GEMM), else (or when CUTLASS declines it: warned once per reason, with the
// call's shape) on the 2.x kernel of the same operand layouts.
template <typename Element, typename LayoutA, typename LayoutB>
void run_problems(ProblemArrays<Element> problems, int64_t first, int64_t count, float beta,
                  cudaStream_t stream, const RoutedCall& call) {
#ifdef FLEXTRON_WITH_SM90
  const RoutedGemm choice = routed_gemm_choice();
  if (choice != RoutedGemm::kSm80 && sm90::grouped_gemm_runs_here() &&
      (choice == RoutedGemm::kSm90 || sm90_checked<Element, LayoutA, LayoutB>(stream))) {
    const std::string declined = sm90::grouped_gemm<Element, LayoutA, LayoutB>(
        problems, static_cast<int>(first), static_cast<int>(count), beta, stream);
    if (declined.empty()) return;
    warn_fallback(call.op, "the sm90 grouped GEMM cannot run (" + declined + ")",
                  routed_shape(call.x, call.w_up, call.widths), "the CUTLASS 2.x grouped GEMM");
  }
#endif
  run_grouped<Element, LayoutA, LayoutB>(problems, first, count, beta, stream);
}

// The operands both passes share: sorted x, the weights and the (T, F) up/gate buffers.
template <typename Element>
Operands<Element> up_gate_operands(const at::Tensor& x_sorted, const std::optional<at::Tensor>& w_gate,
                                   const at::Tensor& w_up, const at::Tensor& w_down,
                                   const at::Tensor& gate, const at::Tensor& up) {
  Operands<Element> ops{};
  ops.x_sorted = elements<Element>(x_sorted);
  ops.w_gate = elements<Element>(w_gate);
  ops.w_up = elements<Element>(w_up);
  ops.w_down = elements<Element>(w_down);
  ops.gate = elements<Element>(gate);
  ops.up = elements<Element>(up);
  return ops;
}

// The byte buffer of `count` problems' arrays, on x's device (stream-ordered allocation).
at::Tensor problem_buffer(const at::Tensor& x, int64_t count) {
  return at::empty({count * kProblemBytes}, x.options().dtype(at::kByte));
}

// (T, F) bool: neuron j is active for token t iff j < widths[choice[t]] (masked paths).
// Past kMaxMaskChoices choices the widths go through a pinned host buffer, which a
// CUDA graph cannot capture safely.
at::Tensor width_mask(const at::Tensor& choice, at::IntArrayRef widths, int64_t ffn) {
  const int64_t tokens = choice.size(0);
  const auto choices = static_cast<int64_t>(widths.size());
  if (choices > kMaxMaskChoices) {
    at::Tensor widths_host =
        at::empty({choices}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(widths.begin(), widths.end(), widths_host.data_ptr<int64_t>());
    const at::Tensor token_width =
        widths_host.to(choice.device(), /*non_blocking=*/true).index_select(0, choice);  // (T,)
    return at::arange(ffn, choice.options()).unsqueeze(0) < token_width.unsqueeze(1);
  }
  at::Tensor mask = at::empty({tokens, ffn}, choice.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (mask.numel() + 255) / 256;
  fill_width_mask<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      choice.data_ptr<int64_t>(), width_table<kMaxMaskChoices>(widths), choices, tokens, ffn,
      mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

template <typename Element>
at::Tensor forward_grouped(const at::Tensor& x, const std::optional<at::Tensor>& w_gate,
                           const at::Tensor& w_up, const at::Tensor& w_down, const at::Tensor& choice,
                           at::IntArrayRef widths, Activation activation) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t tokens = x.size(0), hidden = x.size(1), ffn = w_up.size(0);
  const RoutedCall call{"routed_nested_mlp", x, w_up, widths};
  const int64_t choices = static_cast<int64_t>(widths.size());
  const int projections = w_gate.has_value() ? 2 : 1;
  const grouping::TokenGroups groups = grouping::group_by_choice(choice, choices, stream);
  const at::Tensor x_sorted = x.index_select(0, groups.perm);  // (T, D), contiguous
  const at::Tensor up = at::empty({tokens, ffn}, x.options());  // up, then hidden
  const at::Tensor gate = w_gate.has_value() ? at::empty({tokens, ffn}, x.options()) : at::Tensor();
  const at::Tensor y_sorted = at::empty({tokens, hidden}, x.options());

  const WidthTable table = width_table(widths), padded = padded_width_table(widths);
  const int64_t count = (projections + 1) * choices;
  const at::Tensor arrays = problem_buffer(x, count);
  const auto problems = carve_problem_arrays<Element>(arrays.data_ptr(), count);
  Operands<Element> ops = up_gate_operands<Element>(x_sorted, w_gate, w_up, w_down, gate, up);
  ops.y_sorted = elements<Element>(y_sorted);
  build_forward_problems<Element><<<1, 128, 0, stream>>>(groups.offsets.data_ptr<int64_t>(), padded,
                                                         choices, hidden, ffn, projections, ops,
                                                         problems);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  run_problems<Element, RowMajor, ColumnMajor>(problems, 0, projections * choices, 0.f, stream, call);
  activate_rows<Element><<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
      ops.gate, ops.up, ops.up, choice.data_ptr<int64_t>(), groups.perm.data_ptr<int64_t>(), table,
      padded, ffn, activation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_problems<Element, RowMajor, ColumnMajor>(problems, projections * choices, choices, 0.f, stream, call);
  return y_sorted.index_select(0, groups.inv_perm);
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Element>
Gradients backward_grouped(const at::Tensor& grad_out, const at::Tensor& x,
                           const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                           const at::Tensor& w_down, const at::Tensor& choice,
                           at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                           Activation activation) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t tokens = x.size(0), hidden = x.size(1), ffn = w_up.size(0);
  const RoutedCall call{"routed_nested_mlp_backward", x, w_up, widths};
  const int64_t choices = static_cast<int64_t>(widths.size());
  const int projections = w_gate.has_value() ? 2 : 1;
  const at::TensorOptions opts = x.options();
  const grouping::TokenGroups groups = grouping::group_by_choice(choice, choices, stream);
  const at::Tensor x_sorted = x.index_select(0, groups.perm);            // (T, D)
  const at::Tensor grad_sorted = grad_out.index_select(0, groups.perm);  // (T, D)
  const at::Tensor up = at::empty({tokens, ffn}, opts);  // up, then grad_up
  const at::Tensor gate = w_gate.has_value() ? at::empty({tokens, ffn}, opts) : at::Tensor();
  const at::Tensor hidden_act = at::empty({tokens, ffn}, opts);
  const at::Tensor grad_hidden = at::empty({tokens, ffn}, opts);
  const at::Tensor grad_x_sorted = at::empty({tokens, hidden}, opts);
  const at::Tensor grad_w_up = at::empty(w_up.sizes(), opts);
  const at::Tensor grad_w_down = at::empty(w_down.sizes(), opts);
  const at::Tensor grad_w_gate =
      w_gate.has_value() ? at::empty(w_gate->sizes(), opts) : at::empty({0}, opts);
  const at::Tensor scale_x =
      scale.has_value() ? scale->to(x.scalar_type()).contiguous() : at::Tensor();  // (T,)
  const at::Tensor grad_scale_f =
      scale.has_value() ? at::empty({tokens}, opts.dtype(at::kFloat)) : at::Tensor();

  const WidthTable table = width_table(widths), padded = padded_width_table(widths);
  const BackwardLayout layout{choices, projections};
  const at::Tensor arrays = problem_buffer(x, layout.count());
  const auto problems = carve_problem_arrays<Element>(arrays.data_ptr(), layout.count());
  Operands<Element> ops = up_gate_operands<Element>(x_sorted, w_gate, w_up, w_down, gate, up);
  ops.grad_sorted = elements<Element>(grad_sorted);
  ops.hidden = elements<Element>(hidden_act);
  ops.grad_hidden = elements<Element>(grad_hidden);
  ops.grad_x_sorted = elements<Element>(grad_x_sorted);
  ops.grad_w_gate = w_gate.has_value() ? elements<Element>(grad_w_gate) : nullptr;
  ops.grad_w_up = elements<Element>(grad_w_up);
  ops.grad_w_down = elements<Element>(grad_w_down);
  const int64_t* offsets = groups.offsets.data_ptr<int64_t>();
  build_backward_problems<Element>
      <<<static_cast<unsigned>((layout.count() + 127) / 128), 128, 0, stream>>>(
          offsets, padded, layout, hidden, ffn, ops, problems);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 1. Recompute up/gate and hidden.
  run_problems<Element, RowMajor, ColumnMajor>(problems, 0, projections * choices, 0.f, stream, call);
  const int64_t* choice_ptr = choice.data_ptr<int64_t>();
  const int64_t* perm = groups.perm.data_ptr<int64_t>();
  activate_rows<Element><<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
      ops.gate, ops.up, ops.hidden, choice_ptr, perm, table, padded, ffn, activation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 2-3. grad_hidden, then grad_scale and the activation's backward.
  run_problems<Element, RowMajor, RowMajor>(problems, layout.grad_hidden(), choices, 0.f, stream, call);
  backward_rows<Element><<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(
      ops.gate, ops.up, ops.hidden, ops.grad_hidden, ops.grad_sorted, elements<Element>(scale_x),
      scale.has_value() ? grad_scale_f.data_ptr<float>() : nullptr, choice_ptr, perm, table, padded,
      ffn, hidden, activation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 4. grad_x = grad_up @ w_up (+ grad_gate @ w_gate).
  run_problems<Element, RowMajor, RowMajor>(problems, layout.grad_x_up(), choices, 0.f, stream, call);
  if (w_gate.has_value()) {
    run_problems<Element, RowMajor, RowMajor>(problems, layout.grad_x_gate(), choices, 1.f, stream, call);
  }
  // 5-6. Weight gradients band by band, zeros for the unused neurons.
  run_problems<Element, ColumnMajor, RowMajor>(problems, layout.bands(), (projections + 1) * choices,
                                              0.f, stream, call);
  const dim3 zero_grid(static_cast<unsigned>(std::max(hidden, ffn)), projections + 1);
  zero_unused_neurons<Element><<<zero_grid, 256, 0, stream>>>(
      offsets, padded, choices, hidden, ffn, ops.grad_w_down, ops.grad_w_up, ops.grad_w_gate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor grad_scale =
      scale.has_value() ? grad_scale_f.to(scale->scalar_type()) : at::empty({0}, opts);
  return {grad_x_sorted.index_select(0, groups.inv_perm), grad_w_gate, grad_w_up, grad_w_down,
          grad_scale};
}

void warn_declined(const char* op, const GroupedGemmDeclined& declined, const at::Tensor& x,
                   const at::Tensor& w_up, at::IntArrayRef widths) {
  warn_fallback(op, "the CUTLASS 2.x grouped GEMM cannot run (" + declined.reason + ")",
                routed_shape(x, w_up, widths), "the masked full-width MLP (ATen)");
}

// The masked full-width backward with ATen (fp32, unaligned shapes, many choices).
Gradients backward_masked(const at::Tensor& grad_out, const at::Tensor& x,
                          const std::optional<at::Tensor>& w_gate, const at::Tensor& w_up,
                          const at::Tensor& w_down, const at::Tensor& choice,
                          at::IntArrayRef widths, const std::optional<at::Tensor>& scale,
                          Activation activation) {
  // Recompute the masked hidden activations at full width (T, F).
  const at::Tensor mask = width_mask(choice, widths, w_up.size(0));
  const at::Tensor gate = w_gate.has_value() ? at::mm(x, w_gate->t()) : at::Tensor();
  const at::Tensor up = at::mm(x, w_up.t());
  const at::Tensor hidden = at::empty_like(up);
  activation_out(hidden, gate, up, activation);
  hidden.masked_fill_(mask.logical_not(), 0);

  at::Tensor grad_scale = at::empty({0}, x.options());  // absent slots get distinct tensors
  at::Tensor grad_mlp = grad_out;  // gradient w.r.t. the unscaled MLP output (T, D)
  if (scale.has_value()) {
    const at::Tensor mlp_out = at::mm(hidden, w_down.t());
    grad_scale = (grad_out.to(at::kFloat) * mlp_out.to(at::kFloat)).sum(1).to(scale->scalar_type());
    grad_mlp = grad_out * scale->to(x.scalar_type()).unsqueeze(1);
  }
  const at::Tensor grad_w_down = at::mm(grad_mlp.t(), hidden);                   // (D, F)
  const at::Tensor grad_hidden = at::where(mask, at::mm(grad_mlp, w_down), 0);  // (T, F)
  activation_backward_(gate, up, grad_hidden, activation);  // up, gate <- their gradients
  at::Tensor grad_x = at::mm(up, w_up);
  if (gate.defined()) grad_x.addmm_(gate, *w_gate);
  return {grad_x, gate.defined() ? at::mm(gate.t(), x) : at::empty({0}, x.options()),
          at::mm(up.t(), x), grad_w_down, grad_scale};
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
  const Activation act = parse_activation(activation);

  at::Tensor y;
  if (can_group(op, x, w_gate, w_up, w_down, widths)) {
    try {
      y = x.scalar_type() == at::kBFloat16
              ? forward_grouped<cutlass::bfloat16_t>(x, w_gate, w_up, w_down, choice_c, widths, act)
              : forward_grouped<cutlass::half_t>(x, w_gate, w_up, w_down, choice_c, widths, act);
    } catch (const GroupedGemmDeclined& declined) {
      warn_declined(op, declined, x, w_up, widths);
    }
  }
  if (!y.defined()) {  // the masked full-width MLP
    const at::Tensor gate = w_gate.has_value() ? at::mm(x, w_gate->t()) : at::Tensor();
    at::Tensor hidden = at::mm(x, w_up.t());
    activate_(gate, hidden, act);
    hidden.masked_fill_(width_mask(choice_c, widths, w_up.size(0)).logical_not(), 0);
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
  const int64_t tokens = x.size(0);
  TORCH_CHECK(tokens <= std::numeric_limits<int>::max(), op, ": x has ", tokens,
              " tokens, more than a CUTLASS GEMM takes");
  const at::Tensor choice_c = choice.contiguous();
  const Activation act = parse_activation(activation);
  if (tokens > 0 && can_group(op, x, w_gate, w_up, w_down, widths)) {
    try {
      return x.scalar_type() == at::kBFloat16
                 ? backward_grouped<cutlass::bfloat16_t>(grad_out, x, w_gate, w_up, w_down, choice_c,
                                                         widths, scale, act)
                 : backward_grouped<cutlass::half_t>(grad_out, x, w_gate, w_up, w_down, choice_c,
                                                     widths, scale, act);
    } catch (const GroupedGemmDeclined& declined) {
      warn_declined(op, declined, x, w_up, widths);
    }
  }
  return backward_masked(grad_out, x, w_gate, w_up, w_down, choice_c, widths, scale, act);
}

}  // namespace flextron
