// Stable grouping of tokens by choice on CUDA: a counting sort shared by route
// and routed_nested_mlp (defined, with the why, at the end of route.cu).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flextron::grouping {

constexpr int kTile = 32;  // tokens per tile: one warp, one lane per token

// Called by every lane of the warp that owns `tile` (tokens first .. first + in_tile - 1);
// lane j < in_tile holds token first + j's choice. Writes each token's stable rank
// among the tile's tokens of its choice, and the tile's count per choice to
// counts[choice * tiles + tile] (counts zeroed beforehand).
__device__ __forceinline__ void rank_tile(int lane, int in_tile, int64_t my_choice, int64_t first,
                                          int64_t tile, int64_t tiles, int* rank, int* counts) {
  const unsigned active = in_tile == kTile ? 0xffffffffu : (1u << in_tile) - 1u;
  if (lane < in_tile) {
    const unsigned same = __match_any_sync(active, my_choice);
    rank[first + lane] = __popc(same & ((1u << lane) - 1u));
    if (lane == __ffs(same) - 1) counts[my_choice * tiles + tile] = __popc(same);
  }
}

struct TokenGroups {
  at::Tensor perm;      // (T,) int64: tokens sorted by choice, stable
  at::Tensor inv_perm;  // (T,) int64: inv_perm[perm[i]] = i
  at::Tensor offsets;   // (C + 1,) int64: tokens of choice c are perm[offsets[c]:offsets[c + 1]]
};

// Scan and scatter, once rank (T,) int32 and counts (C * tiles,) int32 are filled.
TokenGroups finish_groups(const at::Tensor& choice, const at::Tensor& rank,
                          const at::Tensor& counts, int64_t choices, cudaStream_t stream);

// The whole grouping for a (T,) int64 choice on the device; choices out of
// [0, choices) trip a device-side assert (as PyTorch's indexing ops do).
TokenGroups group_by_choice(const at::Tensor& choice, int64_t choices, cudaStream_t stream);

}  // namespace flextron::grouping
