// varhead_attention on the CPU: scaled dot-product attention in which sequence b
// uses only its first heads[b] query heads (GQA: query head h reads KV head
// h / (Hq / Hkv)); the outputs and gradients of inactive heads are exact zeros.
//
// Why this shape of kernel:
// - The work is split into tiles of one (sequence, query head, block of query
//   rows) and run with at::parallel_for. Each tile does its two GEMMs through
//   ATen (BLAS) on strided views of q/k/v, so a q that is a transposed view of a
//   (B, S, H, Dh) projection is read in place, and an inactive head costs nothing
//   but zeroing its output.
// - Causal tiles only multiply by the keys their last row can see (a key prefix),
//   which skips nearly half of the prefill work, like a flash kernel's block skip.
// - The scores, the softmax and every accumulation are fp32. bf16/fp16 inputs are
//   widened once up front (BLAS has no bf16 x bf16 -> fp32 GEMM on every CPU);
//   fp32 inputs are used as they are, with no copies of k or v.
// - The backward recomputes P per tile (nothing but q, k, v is saved) and uses
//   rowsum(P * dP) = rowsum(dO * O), so O is never recomputed. It runs one task
//   per (sequence, KV head): the query heads of a KV group accumulate dK and dV
//   serially inside the task, so no two threads ever write the same rows.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "ops.h"

namespace flextron {
namespace {

constexpr const char* kOp = "varhead_attention";
// Query rows per tile: big enough for an efficient GEMM, small enough for the
// causal key prefix to pay off and for a 512-token prefill to spread over cores.
constexpr int64_t kRowBlock = 64;

struct AttentionShape {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, group;
  double scale;
};

// Validates the arguments and returns the sizes. Every message names the argument.
AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& heads, bool causal, std::optional<double> scale) {
  check_dim(kOp, "q", q, 4, "(B, Hq, Sq, Dh)");
  check_dim(kOp, "k", k, 4, "(B, Hkv, Sk, Dh)");
  check_dim(kOp, "v", v, 4, "(B, Hkv, Sk, Dh)");
  check_float(kOp, "q", q);
  check_same(kOp, "k", k, q, "q");
  check_same(kOp, "v", v, q, "q");
  TORCH_CHECK(heads.scalar_type() == at::kLong, kOp, ": heads must be int64, got ",
              heads.scalar_type());
  TORCH_CHECK(heads.device().is_cpu(), kOp, ": heads must be on the CPU like q, got ",
              heads.device());
  const AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0,
                         0.0};
  TORCH_CHECK(heads.dim() == 1 && heads.size(0) == s.batch, kOp, ": heads must have shape (",
              s.batch, ",) (one head count per sequence of q), got ", heads.sizes());
  TORCH_CHECK(k.size(0) == s.batch, kOp, ": k has batch ", k.size(0), " but q has ", s.batch);
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, ": v has shape ", v.sizes(), " but k has ", k.sizes());
  TORCH_CHECK(k.size(3) == s.head_dim, kOp, ": k has head dim ", k.size(3), " but q has ",
              s.head_dim);
  TORCH_CHECK(s.head_dim > 0, kOp, ": q must have a head dim of at least 1, got shape ",
              q.sizes());
  TORCH_CHECK(s.kv_len > 0, kOp, ": k must have at least one key (Sk >= 1), got shape ",
              k.sizes());
  TORCH_CHECK(s.kv_heads > 0 && s.q_heads % s.kv_heads == 0, kOp, ": q has ", s.q_heads,
              " heads, not a multiple of the ", s.kv_heads, " heads of k");
  TORCH_CHECK(!causal || s.kv_len >= s.q_len, kOp, ": causal attention needs at least as many keys",
              " as queries, but k has Sk=", s.kv_len, " and q has Sq=", s.q_len);
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), kOp, ": scale must be finite, got ", *scale);
  }
  const at::Tensor heads_cpu = heads.contiguous();
  const int64_t* count = heads_cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(count[b] >= 1, kOp, ": heads[", b, "] = ", count[b],
                " is too few heads (each sequence needs at least 1)");
    TORCH_CHECK(count[b] <= s.q_heads, kOp, ": heads[", b, "] = ", count[b],
                " is too many heads (q has ", s.q_heads, ")");
  }
  AttentionShape out = s;
  out.group = s.q_heads / s.kv_heads;
  out.scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  return out;
}

// The keys a tile of query rows [row0, row0 + rows) can see: a prefix of length key_end.
int64_t visible_keys(const AttentionShape& s, bool causal, int64_t row0, int64_t rows) {
  return causal ? row0 + rows + (s.kv_len - s.q_len) : s.kv_len;
}

// scores (rows, key_end) = scale * q_tile @ k_prefix^T, masked (causal) and
// softmaxed in fp32. Row i (query row0 + i) sees keys j <= row0 + i + Sk - Sq.
at::Tensor attention_probs(const AttentionShape& s, bool causal, const at::Tensor& q_tile,
                           const at::Tensor& k_prefix, int64_t row0) {
  const int64_t rows = q_tile.size(0), key_end = k_prefix.size(0);
  at::Tensor scores = at::empty({rows, key_end}, q_tile.options());  // (rows, key_end)
  at::addmm_out(scores, scores, q_tile, k_prefix.t(), /*beta=*/0, /*alpha=*/s.scale);
  if (causal) {
    float* data = scores.data_ptr<float>();
    const int64_t offset = s.kv_len - s.q_len;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t first_hidden = row0 + i + offset + 1;  // always >= 1: no row is fully masked
      std::fill(data + i * key_end + std::min(first_hidden, key_end), data + (i + 1) * key_end,
                -std::numeric_limits<float>::infinity());
    }
  }
  return at::_softmax(scores, /*dim=*/1, /*half_to_float=*/false);
}

// A view in fp32: the tensor itself when it is fp32 already, else a widened copy.
at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
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
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);  // (B, H*, S*, Dh)
  const bool write_direct = q.scalar_type() == at::kFloat;
  at::Tensor out = at::empty({s.batch, s.q_heads, s.q_len, s.head_dim}, q.options());

  const int64_t blocks = (s.q_len + kRowBlock - 1) / kRowBlock;
  // Tiles ordered (b, h, block) so that each thread's contiguous chunk holds whole
  // heads with all their blocks, cheap and expensive causal ones alike.
  at::parallel_for(0, s.batch * s.q_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;  // thread-local: set per worker
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t block = tile % blocks, h = (tile / blocks) % s.q_heads;
      const int64_t b = tile / (blocks * s.q_heads);
      const int64_t row0 = block * kRowBlock, rows = std::min(kRowBlock, s.q_len - row0);
      at::Tensor out_tile = out[b][h].narrow(0, row0, rows);  // (rows, Dh)
      if (h >= count[b]) {
        out_tile.zero_();  // inactive head
        continue;
      }
      const int64_t kv_head = h / s.group;
      const int64_t key_end = visible_keys(s, causal, row0, rows);
      const at::Tensor q_tile = qf[b][h].narrow(0, row0, rows);        // (rows, Dh)
      const at::Tensor k_prefix = kf[b][kv_head].narrow(0, 0, key_end);  // (key_end, Dh)
      const at::Tensor v_prefix = vf[b][kv_head].narrow(0, 0, key_end);  // (key_end, Dh)
      const at::Tensor probs = attention_probs(s, causal, q_tile, k_prefix, row0);
      if (write_direct) {
        at::mm_out(out_tile, probs, v_prefix);
      } else {
        out_tile.copy_(at::mm(probs, v_prefix));  // fp32 -> input dtype
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale) {
  const AttentionShape s = check_inputs(q, k, v, heads, causal, scale);
  // The op's autograd is registered in Python; the ATen calls inside must not record any.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_same(kOp, "grad_out", grad_out, q, "q");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), kOp, ": grad_out has shape ", grad_out.sizes(),
              " but q has ", q.sizes());
  const at::Tensor heads_cpu = heads.contiguous();
  const int64_t* count = heads_cpu.data_ptr<int64_t>();
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);
  const at::Tensor grad_outf = as_float(grad_out);  // (B, Hq, Sq, Dh)
  // fp32 accumulators; zeros are the exact gradients of inactive heads and of KV
  // heads that no active query head reads.
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  at::Tensor grad_q = at::zeros(q.sizes(), fp32);
  at::Tensor grad_k = at::zeros(k.sizes(), fp32);
  at::Tensor grad_v = at::zeros(v.sizes(), fp32);

  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd_in_worker;  // thread-local: set per worker
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.kv_heads, kv_head = task % s.kv_heads;
      const at::Tensor k_all = kf[b][kv_head], v_all = vf[b][kv_head];  // (Sk, Dh)
      at::Tensor grad_k_all = grad_k[b][kv_head], grad_v_all = grad_v[b][kv_head];
      const int64_t head_end = std::min(count[b], (kv_head + 1) * s.group);
      for (int64_t h = kv_head * s.group; h < head_end; ++h) {
        for (int64_t row0 = 0; row0 < s.q_len; row0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, s.q_len - row0);
          const int64_t key_end = visible_keys(s, causal, row0, rows);
          const at::Tensor q_tile = qf[b][h].narrow(0, row0, rows);          // (rows, Dh)
          const at::Tensor grad_out_tile = grad_outf[b][h].narrow(0, row0, rows);  // (rows, Dh)
          const at::Tensor k_prefix = k_all.narrow(0, 0, key_end);          // (key_end, Dh)
          const at::Tensor v_prefix = v_all.narrow(0, 0, key_end);
          const at::Tensor probs = attention_probs(s, causal, q_tile, k_prefix, row0);
          // dV += P^T dO
          at::Tensor grad_v_prefix = grad_v_all.narrow(0, 0, key_end);
          grad_v_prefix.addmm_(probs.t(), grad_out_tile);
          // dS = P * (dP - rowsum(P * dP)), dP = dO V^T; masked entries have P = 0.
          at::Tensor grad_scores = at::mm(grad_out_tile, v_prefix.t());  // (rows, key_end)
          const at::Tensor row_dot = (probs * grad_scores).sum(1, /*keepdim=*/true);  // (rows, 1)
          grad_scores.sub_(row_dot).mul_(probs);
          // dQ = scale dS K, dK += scale dS^T Q
          at::Tensor grad_q_tile = grad_q[b][h].narrow(0, row0, rows);
          at::addmm_out(grad_q_tile, grad_q_tile, grad_scores, k_prefix, /*beta=*/0,
                        /*alpha=*/s.scale);
          at::Tensor grad_k_prefix = grad_k_all.narrow(0, 0, key_end);
          grad_k_prefix.addmm_(grad_scores.t(), q_tile, /*beta=*/1, /*alpha=*/s.scale);
        }
      }
    }
  });
  const auto to_input = [&](const at::Tensor& t) { return t.to(q.scalar_type()); };
  return {to_input(grad_q), to_input(grad_k), to_input(grad_v)};
}

}  // namespace flextron
