// route on CUDA: per-token argmax + softmax, then a stable grouping of tokens by
// choice (perm, inv_perm, offsets), deterministic and bit-equal to the CPU op in
// choice, perm, inv_perm and offsets.
//
// Why not at::argmax + at::sort: the router runs once per layer per step, on
// few choices (C ~ 8) and many tokens, so launches and passes over T matter more
// than arithmetic. route_tokens gives a warp a tile of 32 consecutive tokens and
// each lane one token: lane j scans token j's C logits for the argmax and
// softmax (with C ~ 8, spreading one token over the lanes would idle most of
// them), and the tile is then ranked in place (grouping::rank_tile: ballot ranks
// and per-tile counts); grouping::finish_groups scans the counts and scatters
// perm/inv_perm/offsets. No atomics, no host sync.
//
// The grouping (declared in grouping.cuh, defined at the end of this file) is a
// counting sort shared with routed_nested_mlp, bit-equal to
// torch.sort(choice, stable=True):
//   1. rank_tile: a warp owns a tile of 32 consecutive tokens; __match_any_sync
//      on their choices gives each token its rank among the tile's tokens of the
//      same choice (popcount of the lower lanes) and the tile's count per
//      choice, counts[c][tile].
//   2. an exclusive scan of counts in (choice, tile) order (ATen's cumsum, CUB,
//      deterministic on integers): base[c][tile] = offsets[c] + the tokens of
//      choice c in earlier tiles.
//   3. scatter: slot = base[choice][tile] + rank; perm[slot] = t, inv_perm[t] = slot.
//
// Bit-equality with the CPU's sequential scan: the argmax is a reduction under a
// total order (a NaN beats every number, the first NaN wins; otherwise the larger
// value, ties to the lower index), which equals that scan and torch.argmax.
// Probabilities use expf and a sequential sum, so they may differ from the CPU's
// in the last bits (softmax is not part of the bit-equality promise).
// Router logits from hidden states (weight given) come from at::mm first.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "cuda/grouping.cuh"
#include "ops.h"

namespace flextron {
namespace {

constexpr int kWarp = grouping::kTile;
constexpr int kWarpsPerBlock = 8;

// An argmax candidate: tier 2 = NaN, 1 = a number.
struct Candidate {
  int tier;
  float value;
  int64_t index;
};

__device__ Candidate make_candidate(float value, int64_t index) {
  const bool nan = isnan(value);
  return {nan ? 2 : 1, value, index};
}

__device__ bool beats(const Candidate& a, const Candidate& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.tier == 1 && a.value != b.value) return a.value > b.value;
  return a.index < b.index;
}

template <typename scalar_t>
__global__ void route_tokens(const scalar_t* __restrict__ logits, const float* __restrict__ noise,
                             int64_t tokens, int64_t choices, float inv_tau, bool hard,
                             int64_t* __restrict__ choice_out, float* __restrict__ probs,
                             int* __restrict__ rank, int* __restrict__ counts, int64_t tiles) {
  const int lane = threadIdx.x % kWarp;
  const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (tile >= tiles) return;  // whole warps only: blockDim is a multiple of 32
  const int64_t first = tile * kWarp;
  const int in_tile = tokens - first < kWarp ? static_cast<int>(tokens - first) : kWarp;
  int64_t my_choice = -1;  // lane j: the choice of token first + j

  if (lane < in_tile) {  // lane j routes token first + j on its own: a scan over the choices
    const int64_t t = first + lane;
    const scalar_t* row = logits + t * choices;
    const float* noise_row = noise == nullptr ? nullptr : noise + t * choices;
    auto logit = [&](int64_t c) {
      const float z = static_cast<float>(row[c]);
      return noise_row == nullptr ? z : z + noise_row[c];
    };
    Candidate best = make_candidate(logit(0), 0);
    for (int64_t c = 1; c < choices; ++c) {
      const Candidate here = make_candidate(logit(c), c);
      if (beats(here, best)) best = here;
    }
    my_choice = best.index;
    choice_out[t] = best.index;

    float* p = probs + t * choices;
    if (hard) {  // the forward value is the one-hot; the soft gradient is in ops.py
      // A NaN row's soft part, and so its straight-through value, is NaN (as in the reference).
      for (int64_t c = 0; c < choices; ++c) p[c] = best.tier == 2 ? NAN : c == best.index ? 1.f : 0.f;
    } else {
      float total = 0.f;
      for (int64_t c = 0; c < choices; ++c) {
        p[c] = expf((logit(c) - best.value) * inv_tau);
        total += p[c];
      }
      for (int64_t c = 0; c < choices; ++c) p[c] /= total;
    }
  }

  grouping::rank_tile(lane, in_tile, my_choice, first, tile, tiles, rank, counts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& noise, double tau, bool hard) {
  constexpr const char* op = "route";
  check_route_args(op, input, weight, noise, tau);
  const c10::cuda::CUDAGuard device_guard(input.device());
  // (T, C) logits, optionally from the fused router projection
  const at::Tensor logits = (weight.has_value() ? at::mm(input, weight->t()) : input).contiguous();
  const int64_t tokens = logits.size(0), choices = logits.size(1);
  // (T, C) fp32, or undefined
  const at::Tensor noise_f = noise.has_value() ? noise->to(at::kFloat).contiguous() : at::Tensor();

  const auto index_options = input.options().dtype(at::kLong);
  at::Tensor choice = at::empty({tokens}, index_options);
  at::Tensor probs = at::empty({tokens, choices}, input.options().dtype(at::kFloat));
  if (tokens == 0) {
    return {choice, probs.to(input.scalar_type()), at::empty({0}, index_options),
            at::empty({0}, index_options), at::zeros({choices + 1}, index_options)};
  }
  const int64_t tiles = (tokens + kWarp - 1) / kWarp;
  at::Tensor rank = at::empty({tokens}, input.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({choices * tiles}, input.options().dtype(at::kInt));  // (C, tiles)

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = kWarp * kWarpsPerBlock;
  const int64_t token_blocks = (tiles + kWarpsPerBlock - 1) / kWarpsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "route_cuda", [&] {
    route_tokens<scalar_t><<<token_blocks, threads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), noise_f.defined() ? noise_f.data_ptr<float>() : nullptr,
        tokens, choices, static_cast<float>(1.0 / tau), hard, choice.data_ptr<int64_t>(),
        probs.data_ptr<float>(), rank.data_ptr<int>(), counts.data_ptr<int>(), tiles);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  grouping::TokenGroups groups = grouping::finish_groups(choice, rank, counts, choices, stream);
  return {choice, probs.to(input.scalar_type()), groups.perm, groups.inv_perm, groups.offsets};
}

}  // namespace flextron

namespace flextron::grouping {
namespace {

__global__ void rank_tokens(const int64_t* __restrict__ choice, int64_t tokens, int64_t choices,
                            int* __restrict__ rank, int* __restrict__ counts, int64_t tiles) {
  const int lane = threadIdx.x % kTile;
  const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kTile;
  if (tile >= tiles) return;  // whole warps only: blockDim is a multiple of 32
  const int64_t first = tile * kTile;
  const int in_tile = tokens - first < kTile ? static_cast<int>(tokens - first) : kTile;
  const int64_t my_choice = lane < in_tile ? choice[first + lane] : 0;
  CUDA_KERNEL_ASSERT(my_choice >= 0 && my_choice < choices && "choice out of range");
  rank_tile(lane, in_tile, my_choice, first, tile, tiles, rank, counts);
}

__global__ void scatter_tokens(const int64_t* __restrict__ choice, const int* __restrict__ rank,
                               const int64_t* __restrict__ base, int64_t tokens, int64_t choices,
                               int64_t tiles, int64_t* __restrict__ perm,
                               int64_t* __restrict__ inv_perm, int64_t* __restrict__ offsets) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t <= choices) offsets[t] = t == choices ? tokens : base[t * tiles];
  if (t >= tokens) return;
  const int64_t slot = base[choice[t] * tiles + t / kTile] + rank[t];
  perm[slot] = t;
  inv_perm[t] = slot;
}

}  // namespace

TokenGroups finish_groups(const at::Tensor& choice, const at::Tensor& rank,
                          const at::Tensor& counts, int64_t choices, cudaStream_t stream) {
  const int64_t tokens = choice.size(0);
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  const auto index_options = choice.options().dtype(at::kLong);
  TokenGroups groups{at::empty({tokens}, index_options), at::empty({tokens}, index_options),
                     at::empty({choices + 1}, index_options)};
  const at::Tensor base = at::cumsum(counts, 0, at::kLong).sub_(counts);  // exclusive scan
  const int64_t blocks = (std::max(tokens, choices + 1) + 255) / 256;
  scatter_tokens<<<blocks, 256, 0, stream>>>(
      choice.data_ptr<int64_t>(), rank.data_ptr<int>(), base.data_ptr<int64_t>(), tokens, choices,
      tiles, groups.perm.data_ptr<int64_t>(), groups.inv_perm.data_ptr<int64_t>(),
      groups.offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return groups;
}

TokenGroups group_by_choice(const at::Tensor& choice, int64_t choices, cudaStream_t stream) {
  const int64_t tokens = choice.size(0);
  const auto index_options = choice.options().dtype(at::kLong);
  if (tokens == 0) {
    return {at::empty({0}, index_options), at::empty({0}, index_options),
            at::zeros({choices + 1}, index_options)};
  }
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  at::Tensor rank = at::empty({tokens}, choice.options().dtype(at::kInt));
  at::Tensor counts = at::zeros({choices * tiles}, choice.options().dtype(at::kInt));
  const int64_t blocks = (tiles + kWarpsPerBlock - 1) / kWarpsPerBlock;
  rank_tokens<<<blocks, kTile * kWarpsPerBlock, 0, stream>>>(
      choice.data_ptr<int64_t>(), tokens, choices, rank.data_ptr<int>(), counts.data_ptr<int>(),
      tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish_groups(choice, rank, counts, choices, stream);
}

}  // namespace flextron::grouping
