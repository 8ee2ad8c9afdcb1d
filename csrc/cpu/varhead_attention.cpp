// varhead_attention on the CPU: scaled dot-product attention in which sequence b
// uses only its first heads[b] query heads (GQA: query head h reads KV head
// h / (Hq / Hkv)); the outputs and gradients of inactive heads are exact zeros.
//
// Why this shape of kernel:
// - Work is cut into tiles of (sequence, KV head, block of 64 query rows) and run
//   with at::parallel_for. A tile stacks the rows of the group's *active* query
//   heads into one GEMM, so K and V are read once per group and inactive heads
//   cost only the zeroing of their output. The GEMMs go through ATen (BLAS) on
//   strided views: a q/k/v that is a transposed view of a (B, S, H, Dh) projection
//   is read in place. A decoding step's few query rows take the kernels of
//   skinny_gemm.h (the BLAS is slow on such shapes).
// - Causal tiles only multiply by the keys their last row can see (a key prefix),
//   which skips nearly half of the prefill work, like a flash kernel's block skip.
// - Scores, softmax and every accumulation are fp32. bf16/fp16 tiles are widened
//   per tile (BLAS has no bf16 x bf16 -> fp32 GEMM on every CPU), except a bf16
//   cache at decode time, which skinny_gemm.h reads as it is; fp32 inputs are used
//   as they are, with no copies of k or v.
// - The backward recomputes P per tile (only q, k, v are saved) and uses
//   rowsum(P * dP) = rowsum(dO * O), so O is never recomputed. Its tasks are
//   (sequence, KV head, chunk of row blocks); each task sums dK and dV over its
//   group's heads and rows into its own fp32 slot, and the slots are added at the
//   end: no two threads write the same memory. There are more chunks than one only
//   when B * Hkv alone would leave threads idle, so the extra memory stays at about
//   one KV head per thread.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "ops.h"
#include "skinny_gemm.h"

namespace flextron {
namespace {

constexpr const char* kOp = "varhead_attention";
// Query rows per tile: big enough for an efficient GEMM, small enough for the
// causal key prefix to pay off and for a 512-token prefill to spread over cores.
constexpr int64_t kRowBlock = 64;

// Validates the arguments (the shared checks, heads on the CPU) and returns the sizes.
AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& heads, bool causal, std::optional<double> scale) {
  const AttentionShape s = check_varhead_args(kOp, q, k, v, heads, causal, scale);
  TORCH_CHECK(heads.device().is_cpu(), kOp, ": heads must be on the CPU like q, got ",
              heads.device());
  check_head_counts(kOp, heads, s.q_heads);
  return s;
}

// The keys that query rows [row0, row0 + rows) can see: a prefix of length key_end.
int64_t visible_keys(const AttentionShape& s, bool causal, int64_t row0, int64_t rows) {
  return causal ? row0 + rows + (s.kv_len - s.q_len) : s.kv_len;
}

// One tile: query rows [row0, row0 + rows) of the active query heads
// [head0, head0 + active) of KV head kv_head in sequence b, stacked head-major into
// the rows of one GEMM, so K and V are read once for the whole group.
struct Tile {
  int64_t b, kv_head, head0, active, row0, rows, key_end;
};

Tile make_tile(const AttentionShape& s, const int64_t* count, bool causal, int64_t b,
               int64_t kv_head, int64_t row0) {
  const int64_t head0 = kv_head * s.group;
  const int64_t active = std::clamp<int64_t>(count[b] - head0, 0, s.group);
  const int64_t rows = std::min(kRowBlock, s.q_len - row0);
  return {b, kv_head, head0, active, row0, rows, visible_keys(s, causal, row0, rows)};
}

// t[b, head0:head0+active, row0:row0+rows] of a (B, Hq, Sq, Dh) tensor: (active, rows, Dh).
at::Tensor tile_view(const at::Tensor& t, const Tile& tile) {
  return t.as_strided({tile.active, tile.rows, t.size(3)}, {t.stride(1), t.stride(2), t.stride(3)},
                      t.storage_offset() + tile.b * t.stride(0) + tile.head0 * t.stride(1) +
                          tile.row0 * t.stride(2));
}

// t[b, kv_head, :key_end] of a (B, Hkv, Sk, Dh) tensor: (key_end, Dh), in fp32 unless
// a tile of `rows` query rows reads it as it is stored (a bf16 cache at decode time:
// skinny_gemm.h), and a view when t is fp32.
at::Tensor key_prefix(const at::Tensor& t, int64_t b, int64_t kv_head, int64_t key_end,
                      int64_t rows) {
  const int64_t offset = t.storage_offset() + b * t.stride(0) + kv_head * t.stride(1);
  const at::Tensor prefix = t.as_strided({key_end, t.size(3)}, {t.stride(2), t.stride(3)}, offset);
  return skinny::reads_bf16_weights(rows, prefix) ? prefix : prefix.to(at::kFloat);
}

// The tile's rows of t in fp32 as a matrix (active * rows, Dh); a view when t is fp32
// and the rows are evenly strided (a single head, or a whole contiguous sequence).
at::Tensor load_rows(const at::Tensor& t, const Tile& tile) {
  return tile_view(t, tile).to(at::kFloat).reshape({tile.active * tile.rows, t.size(3)});
}

// scores (active * rows, key_end) = scale * q_rows @ k_prefix^T, masked (causal) and
// softmaxed in fp32. Query row row0 + i sees keys j <= row0 + i + Sk - Sq.
at::Tensor attention_probs(const AttentionShape& s, bool causal, const Tile& tile,
                           const at::Tensor& q_rows, const at::Tensor& k_prefix) {
  const int64_t total_rows = q_rows.size(0), key_end = tile.key_end;
  at::Tensor scores = linear_nt(q_rows, k_prefix, std::nullopt, s.scale);  // (rows, key_end)
  if (causal) {
    float* data = scores.data_ptr<float>();
    const int64_t offset = s.kv_len - s.q_len;
    for (int64_t r = 0; r < total_rows; ++r) {
      const int64_t query = tile.row0 + r % tile.rows;
      const int64_t first_hidden = query + offset + 1;  // >= 1: no row is fully masked
      std::fill(data + r * key_end + std::min(first_hidden, key_end), data + (r + 1) * key_end,
                -std::numeric_limits<float>::infinity());
    }
  }
  return at::_softmax(scores, /*dim=*/1, /*half_to_float=*/false);
}

}  // namespace

at::Tensor varhead_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& heads, bool causal,
                                 std::optional<double> scale) {
  const AttentionShape s = check_inputs(q, k, v, heads, causal, scale);
  // The op's autograd is registered in Python; the ATen calls inside must not record any.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor heads_cpu = heads.contiguous();
  const int64_t* count = heads_cpu.data_ptr<int64_t>();
  at::Tensor out = at::empty({s.batch, s.q_heads, s.q_len, s.head_dim}, q.options());

  const int64_t blocks = (s.q_len + kRowBlock - 1) / kRowBlock;
  // Tiles ordered (b, kv_head, block) so that each thread's contiguous chunk holds
  // whole groups with all their blocks, cheap and expensive causal ones alike.
  at::parallel_for(0, s.batch * s.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;  // thread-local: set per worker
    for (int64_t index = begin; index < end; ++index) {
      const int64_t block = index % blocks, kv_head = (index / blocks) % s.kv_heads;
      const int64_t b = index / (blocks * s.kv_heads);
      const Tile tile = make_tile(s, count, causal, b, kv_head, block * kRowBlock);
      if (tile.active < s.group) {  // inactive heads of the group: exact zeros
        out[b].narrow(0, tile.head0 + tile.active, s.group - tile.active)
            .narrow(1, tile.row0, tile.rows)
            .zero_();
        if (tile.active == 0) continue;
      }
      const int64_t rows = tile.active * tile.rows;
      const at::Tensor k_prefix = key_prefix(k, b, kv_head, tile.key_end, rows);  // (key_end, Dh)
      const at::Tensor v_prefix = key_prefix(v, b, kv_head, tile.key_end, rows);
      const at::Tensor probs = attention_probs(s, causal, tile, load_rows(q, tile), k_prefix);
      const at::Tensor out_rows = matmul_nn(probs, v_prefix);  // (active * rows, Dh)
      tile_view(out, tile).copy_(out_rows.view({tile.active, tile.rows, s.head_dim}));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale) {
  const AttentionShape s = check_inputs(q, k, v, heads, causal, scale);
  check_varhead_grad_out(kOp, grad_out, q);
  // The op's autograd is registered in Python; the ATen calls inside must not record any.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor heads_cpu = heads.contiguous();
  const int64_t* count = heads_cpu.data_ptr<int64_t>();
  // Zeros are the exact gradients of inactive heads.
  at::Tensor grad_q = at::zeros(q.sizes(), q.options());

  // Split each (b, kv_head) into `chunks` runs of row blocks of about equal cost
  // (a causal block costs in proportion to its visible keys).
  const int64_t blocks = (s.q_len + kRowBlock - 1) / kRowBlock;
  const int64_t groups = s.batch * s.kv_heads;
  const int64_t idle_share = (at::get_num_threads() + groups - 1) / std::max<int64_t>(groups, 1);
  const int64_t chunks = std::clamp<int64_t>(idle_share, 1, std::max<int64_t>(blocks, 1));
  std::vector<int64_t> chunk_of_block(blocks);
  {
    std::vector<double> cost(blocks);
    double total = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t rows = std::min(kRowBlock, s.q_len - block * kRowBlock);
      cost[block] = double(rows) * double(visible_keys(s, causal, block * kRowBlock, rows));
      total += cost[block];
    }
    double before = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      // The chunk that holds the middle of this block's share of the work.
      chunk_of_block[block] = std::min<int64_t>(
          chunks - 1, static_cast<int64_t>(chunks * (before + cost[block] / 2) / total));
      before += cost[block];
    }
  }
  // One fp32 dK/dV slot per task: (B * Hkv, chunks, Sk, Dh); zeros for unread KV heads.
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  at::Tensor grad_k_parts = at::zeros({groups, chunks, s.kv_len, s.head_dim}, fp32);
  at::Tensor grad_v_parts = at::zeros({groups, chunks, s.kv_len, s.head_dim}, fp32);

  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;  // thread-local: set per worker
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, group_index = task / chunks;
      const int64_t b = group_index / s.kv_heads, kv_head = group_index % s.kv_heads;
      if (make_tile(s, count, causal, b, kv_head, 0).active == 0) continue;
      at::Tensor grad_k_all = grad_k_parts[group_index][chunk];  // (Sk, Dh) fp32
      at::Tensor grad_v_all = grad_v_parts[group_index][chunk];
      at::Tensor k_all, v_all;  // (Sk, Dh) fp32, widened once per task
      for (int64_t block = 0; block < blocks; ++block) {
        if (chunk_of_block[block] != chunk) continue;
        const Tile tile = make_tile(s, count, causal, b, kv_head, block * kRowBlock);
        if (!k_all.defined()) {
          k_all = k[b][kv_head].to(at::kFloat);
          v_all = v[b][kv_head].to(at::kFloat);
        }
        const at::Tensor q_rows = load_rows(q, tile);                // (active * rows, Dh)
        const at::Tensor grad_out_rows = load_rows(grad_out, tile);  // (active * rows, Dh)
        const at::Tensor k_prefix = k_all.narrow(0, 0, tile.key_end);  // (key_end, Dh)
        const at::Tensor v_prefix = v_all.narrow(0, 0, tile.key_end);
        const at::Tensor probs = attention_probs(s, causal, tile, q_rows, k_prefix);
        // dV += P^T dO (the GEMM sums over the group's heads too)
        grad_v_all.narrow(0, 0, tile.key_end).addmm_(probs.t(), grad_out_rows);
        // dS = P * (dP - rowsum(P * dP)) with dP = dO V^T; masked entries have P = 0.
        at::Tensor grad_scores = at::mm(grad_out_rows, v_prefix.t());  // (active * rows, key_end)
        const at::Tensor row_dot = (probs * grad_scores).sum(1, /*keepdim=*/true);
        grad_scores.sub_(row_dot).mul_(probs);
        // dQ = scale dS K; dK += scale dS^T Q
        const at::Tensor grad_q_rows = at::mm(grad_scores, k_prefix).mul_(s.scale);
        tile_view(grad_q, tile).copy_(grad_q_rows.view({tile.active, tile.rows, s.head_dim}));
        grad_k_all.narrow(0, 0, tile.key_end)
            .addmm_(grad_scores.t(), q_rows, /*beta=*/1, /*alpha=*/s.scale);
      }
    }
  });
  const auto gather = [&](const at::Tensor& parts, const at::Tensor& like) {
    return parts.sum(1).view(like.sizes()).to(like.scalar_type());  // (B, Hkv, Sk, Dh)
  };
  return {grad_q, gather(grad_k_parts, k), gather(grad_v_parts, v)};
}

}  // namespace flextron
