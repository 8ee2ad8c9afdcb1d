// varhead_attention on CUDA: scaled dot-product attention in which sequence b
// uses only its first heads[b] query heads (GQA: query head h reads KV head
// h / (Hq / Hkv)); the outputs and gradients of inactive heads are exact zeros.
//
// Why this shape (DESIGN §3: head prefixes are free strided views, sequences
// bucketed by head count):
// - The head counts are read on the host: one (B,) int64 copy, a synchronisation
//   when heads lives on the GPU (none when it is on the CPU). It validates the
//   counts with the same messages as the CPU op, and the model's attention layer
//   already reads max(heads) on the host to size its projections.
// - Sequences are bucketed by head count h. A bucket runs on the first
//   hq = ceil(h / group) * group query heads (whole KV groups) and the first
//   hq / group KV heads: a narrower configuration costs proportionally less. When
//   the bucket is a run of consecutive sequences (always, for a static
//   configuration: one bucket) q, k and v are read through zero-copy views
//   (q[b0:b1, :hq], with the caller's strides, e.g. the transposed views of
//   (B, S, H, Dh) projections); a scattered bucket is gathered (index_select of
//   the active heads only) and its results scattered back. Its sequence index
//   reaches the device as a kernel argument (write_index), not as a copy from
//   pageable memory: no synchronisation, and a CUDA graph captures it. With heads
//   on the CPU the whole op is graph-capturable (the graph keeps the head counts
//   it was captured with).
// - Forward: at::scaled_dot_product_attention with enable_gqa, so PyTorch picks
//   its flash / memory-efficient / math kernel for the bucket. Causal masks are
//   aligned bottom-right (query i sees keys j <= i + Sk - Sq): is_causal when
//   Sq == Sk, no mask when Sq == 1 (decode: every key is visible), else an explicit
//   (Sq, Sk) boolean mask (SDPA's is_causal is top-left aligned when Sq != Sk, and
//   its flash kernel refuses non-square causal attention). A mask keeps SDPA off
//   flash, and its memory-efficient kernel takes a mask but not GQA, so with a mask
//   and Sq >= Dh (chunked prefill) the bucket's KV heads are expanded to its query
//   heads (a copy of n x hq x Sk x Dh elements, no larger than the Sq x Sk scores
//   the math kernel would otherwise materialise per head) and SDPA runs as MHA on
//   its memory-efficient kernel. Short query blocks (Sq < Dh: speculative decode)
//   keep GQA on the math kernel, which is cheaper there than the copy.
//   The active heads h of the bucket's hq are copied into the zero-filled output.
// - Backward: recomputes attention per bucket with ATen batched GEMMs on the inputs'
//   dtype (bf16/fp16 on tensor cores), fp32 results and softmax arithmetic
//   (the CPU kernel's formulas: P recomputed, dS = P * (dP - rowsum(P * dP)),
//   dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO). The query heads of a KV group
//   are stacked as the rows of one GEMM, so dK and dV are summed over the group by
//   the GEMM itself, no atomics; grad_out of the inactive heads of a partial group
//   is zeroed first, so they add nothing to dK and dV. Query rows are processed in
//   blocks so the fp32 score buffer stays under kScoreElements; causal blocks only
//   multiply by the key prefix their last row can see.
// Versions: v1 SDPA forward + fp32 ATen recompute backward; v2 (current) the backward's
// GEMMs on 16-bit operands (fp32 accumulation). Next: the
// fused flash backward (needs the forward's logsumexp saved, so a schema change).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <vector>

#include "common/checks.h"
#include "ops.h"

namespace flextron {
namespace {

constexpr const char* kOp = "varhead_attention";
// The most fp32 score elements (bucket sequences x heads x query rows x keys) the
// backward holds per block: 128 MiB per score-sized buffer (three live at once).
constexpr int64_t kScoreElements = int64_t{1} << 25;

constexpr int kIndexChunk = 64;  // sequence indices per write_index launch

struct IndexChunk {
  int64_t value[kIndexChunk];
};

// out[i] = chunk.value[i] for i < count: the values travel as a kernel argument.
__global__ void write_index(IndexChunk chunk, int count, int64_t* __restrict__ out) {
  if (static_cast<int>(threadIdx.x) < count) out[threadIdx.x] = chunk.value[threadIdx.x];
}

// `values` as a (n,) int64 tensor on `device`, written by kernels (see the top of the file).
at::Tensor device_index(const std::vector<int64_t>& values, const at::Device& device) {
  const auto n = static_cast<int64_t>(values.size());
  at::Tensor index = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < n; first += kIndexChunk) {
    const int count = static_cast<int>(std::min<int64_t>(kIndexChunk, n - first));
    IndexChunk chunk{};
    std::copy_n(values.begin() + first, count, chunk.value);
    write_index<<<1, kIndexChunk, 0, stream>>>(chunk, count, index.data_ptr<int64_t>() + first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return index;
}

// The sequences of one head count, and the heads they compute.
struct Bucket {
  int64_t heads;                  // active query heads h
  int64_t kv_heads;               // KV heads read: ceil(h / group)
  int64_t q_heads;                // query heads computed: kv_heads * group >= h
  std::vector<int64_t> sequences;  // ascending
  at::Tensor index;               // the sequences on the device, when not consecutive

  bool consecutive() const { return !index.defined(); }
  int64_t size() const { return static_cast<int64_t>(sequences.size()); }
};

// Validates the arguments and reads the head counts: buckets, widest first.
std::vector<Bucket> make_buckets(const AttentionShape& s, const at::Tensor& q,
                                 const at::Tensor& heads) {
  TORCH_CHECK(heads.is_cpu() || heads.device() == q.device(), kOp,
              ": heads must be on the CPU or on q's device (", q.device(), "), got ",
              heads.device());
  const at::Tensor counts = heads.to(at::kCPU).contiguous();  // synchronises if on the GPU
  check_head_counts(kOp, counts, s.q_heads);
  std::map<int64_t, std::vector<int64_t>, std::greater<>> by_count;
  const int64_t* count = counts.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) by_count[count[b]].push_back(b);

  std::vector<Bucket> buckets;
  for (auto& [h, sequences] : by_count) {
    Bucket bucket;
    bucket.heads = h;
    bucket.kv_heads = (h + s.group - 1) / s.group;
    bucket.q_heads = bucket.kv_heads * s.group;
    if (sequences.back() - sequences.front() + 1 != static_cast<int64_t>(sequences.size())) {
      bucket.index = device_index(sequences, q.device());
    }
    bucket.sequences = std::move(sequences);
    buckets.push_back(std::move(bucket));
  }
  return buckets;
}

// t[bucket's sequences, :heads]: a view when the sequences are consecutive, else a gather.
at::Tensor gather(const at::Tensor& t, const Bucket& bucket, int64_t heads) {
  const at::Tensor prefix = t.narrow(1, 0, heads);
  if (bucket.consecutive()) return prefix.narrow(0, bucket.sequences.front(), bucket.size());
  return prefix.index_select(0, bucket.index);
}

// dst[bucket's sequences, :heads] = src (bucket size, heads, ...), cast to dst's dtype.
void scatter(at::Tensor& dst, const Bucket& bucket, int64_t heads, const at::Tensor& src) {
  at::Tensor prefix = dst.narrow(1, 0, heads);
  if (bucket.consecutive()) {
    prefix.narrow(0, bucket.sequences.front(), bucket.size()).copy_(src);
  } else {
    prefix.index_copy_(0, bucket.index, src.to(dst.scalar_type()));
  }
}

// a @ b (batched) with fp32 results: bf16/fp16 operands run on tensor cores with fp32
// accumulation (bmm's out_dtype overload), fp32 operands as they are.
at::Tensor bmm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

}  // namespace

at::Tensor varhead_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& heads, bool causal,
                                  std::optional<double> scale) {
  const AttentionShape s = check_varhead_args(kOp, q, k, v, heads, causal, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  // The op's autograd is registered in Python; the ATen calls inside must not record any.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const std::vector<Bucket> buckets = make_buckets(s, q, heads);
  at::Tensor out = at::zeros(q.sizes(), q.options());  // (B, Hq, Sq, Dh); inactive heads stay 0
  if (s.q_len == 0) return out;

  // Bottom-right causal alignment (see the top of the file).
  std::optional<at::Tensor> mask;
  const bool square_causal = causal && s.q_len == s.kv_len && s.q_len > 1;
  if (causal && s.q_len != s.kv_len && s.q_len > 1) {
    mask = at::ones({s.q_len, s.kv_len}, q.options().dtype(at::kBool)).tril(s.kv_len - s.q_len);
  }
  // With a mask, GQA as MHA on the memory-efficient kernel (see the top of the file).
  const bool expand_kv = mask.has_value() && s.group > 1 && s.q_len >= s.head_dim;
  for (const Bucket& bucket : buckets) {
    at::Tensor k_bucket = gather(k, bucket, bucket.kv_heads);  // (n, hkv, Sk, Dh)
    at::Tensor v_bucket = gather(v, bucket, bucket.kv_heads);
    if (expand_kv) {  // (n, hq, Sk, Dh): query head h reads KV head h / group
      auto expand = [&](const at::Tensor& t) {
        return t.unsqueeze(2)
            .expand({t.size(0), bucket.kv_heads, s.group, s.kv_len, s.head_dim})
            .reshape({t.size(0), bucket.q_heads, s.kv_len, s.head_dim});
      };
      k_bucket = expand(k_bucket);
      v_bucket = expand(v_bucket);
    }
    const at::Tensor attended = at::scaled_dot_product_attention(
        gather(q, bucket, bucket.q_heads), k_bucket, v_bucket, mask, /*dropout_p=*/0.0,
        square_causal, s.scale, /*enable_gqa=*/!expand_kv);  // (n, hq, Sq, Dh)
    scatter(out, bucket, bucket.heads, attended.narrow(1, 0, bucket.heads));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varhead_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& heads, bool causal, std::optional<double> scale) {
  const AttentionShape s = check_varhead_args(kOp, q, k, v, heads, causal, scale);
  check_varhead_grad_out(kOp, grad_out, q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const std::vector<Bucket> buckets = make_buckets(s, q, heads);
  // Zeros are the exact gradients of inactive heads and of KV heads no active head reads.
  at::Tensor grad_q = at::zeros(q.sizes(), q.options());
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  if (s.q_len == 0) return {grad_q, grad_k, grad_v};

  const int64_t sq = s.q_len, sk = s.kv_len, dh = s.head_dim, group = s.group;
  const at::ScalarType dtype = q.scalar_type();
  const at::TensorOptions fp32 = q.options().dtype(at::kFloat);
  const at::TensorOptions index = q.options().dtype(at::kLong);
  for (const Bucket& bucket : buckets) {
    const int64_t n = bucket.size(), hq = bucket.q_heads, hkv = bucket.kv_heads;
    const int64_t pairs = n * hkv;  // GEMM batch: (sequence, KV head)
    // The GEMM operands stay in the inputs' dtype (tensor cores for bf16/fp16); every product
    // is accumulated and returned in fp32 (bmm_fp32), and the gradients accumulate in fp32.
    const at::Tensor q_all = gather(q, bucket, hq);  // (n, hq, Sq, Dh)
    // grad_out of the inactive heads of a partial KV group: zeroed on a private copy.
    at::Tensor grad_all = gather(grad_out, bucket, hq)
                              .to(dtype, /*non_blocking=*/false, /*copy=*/hq > bucket.heads);
    if (hq > bucket.heads) grad_all.narrow(1, bucket.heads, hq - bucket.heads).zero_();
    const at::Tensor k_all = gather(k, bucket, hkv).reshape({pairs, sk, dh});
    const at::Tensor v_all = gather(v, bucket, hkv).reshape({pairs, sk, dh});
    at::Tensor grad_q_all = at::empty({n, hq, sq, dh}, fp32);
    at::Tensor grad_k_all = at::zeros({pairs, sk, dh}, fp32);
    at::Tensor grad_v_all = at::zeros({pairs, sk, dh}, fp32);

    const int64_t block = std::clamp<int64_t>(kScoreElements / (n * hq * sk), 1, sq);
    for (int64_t row0 = 0; row0 < sq; row0 += block) {
      const int64_t rows = std::min(block, sq - row0);
      const int64_t key_end = causal ? std::min(sk, row0 + rows + sk - sq) : sk;
      // The group's query heads stacked head-major: (pairs, group * rows, Dh).
      const at::Tensor q_rows = q_all.narrow(2, row0, rows).reshape({pairs, group * rows, dh});
      const at::Tensor grad_rows = grad_all.narrow(2, row0, rows).reshape({pairs, group * rows, dh});
      const at::Tensor k_prefix = k_all.narrow(1, 0, key_end);  // (pairs, key_end, Dh)
      const at::Tensor v_prefix = v_all.narrow(1, 0, key_end);
      at::Tensor scores = bmm_fp32(q_rows, k_prefix.transpose(1, 2)).mul_(s.scale);
      if (causal) {  // stacked row r is query row0 + r % rows; it sees keys j <= query + Sk - Sq
        const at::Tensor last_key = at::arange(group * rows, index).remainder_(rows).add_(row0 + sk - sq);
        scores.masked_fill_(at::arange(key_end, index).unsqueeze(0) > last_key.unsqueeze(1),
                            -std::numeric_limits<float>::infinity());
      }
      const at::Tensor probs = at::_softmax(scores, /*dim=*/2, /*half_to_float=*/false);
      // P and dS enter their GEMMs in the inputs' dtype, as in flash attention's backward.
      grad_v_all.narrow(1, 0, key_end).add_(bmm_fp32(probs.to(dtype).transpose(1, 2), grad_rows));
      // dS = P * (dP - rowsum(P * dP)) with dP = dO V^T; masked entries have P = 0.
      at::Tensor grad_scores = bmm_fp32(grad_rows, v_prefix.transpose(1, 2));
      grad_scores.sub_((probs * grad_scores).sum(2, /*keepdim=*/true)).mul_(probs);
      const at::Tensor grad_scores_low = grad_scores.to(dtype);
      grad_q_all.narrow(2, row0, rows)
          .copy_(bmm_fp32(grad_scores_low, k_prefix).mul_(s.scale).view({n, hq, rows, dh}));
      grad_k_all.narrow(1, 0, key_end)
          .add_(bmm_fp32(grad_scores_low.transpose(1, 2), q_rows), s.scale);
    }
    scatter(grad_q, bucket, bucket.heads, grad_q_all.narrow(1, 0, bucket.heads));
    scatter(grad_k, bucket, hkv, grad_k_all.view({n, hkv, sk, dh}));
    scatter(grad_v, bucket, hkv, grad_v_all.view({n, hkv, sk, dh}));
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace flextron
