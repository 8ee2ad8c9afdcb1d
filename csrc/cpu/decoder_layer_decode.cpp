// decoder_layer at decode time on the CPU: a few rows of x, no gradient, in loops of its own.
//
// Why: at decode the composite decoder_layer is ~50 small ATen operations and seven
// dispatcher calls around kernels that stream a layer's weights. Each small operation costs
// a microsecond or more of allocation and dispatch, and together they were about a quarter
// of a bf16 decode step. Here the norms, RoPE, the cache writes, attention over the cache
// and the residual adds are plain loops over the few rows, and the projections call the CPU
// kernels directly (the few-row kernels of skinny_gemm.h and nested_linear_int8.cpp).
//
// The numbers are the composite's: the same fp32 sums, and a rounding to x's dtype at each
// point where the composite's ATen operation rounds (so bf16 matches it to bf16 rounding).
// Attention scores, softmax and the weighted sum of values are fp32.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/layer_operands.h"
#include "ops.h"
#include "skinny_gemm.h"

namespace flextron {
#ifdef FLEXTRON_SKINNY_AVX2
namespace {

// The value of v after rounding to T, as an ATen operation that outputs T would store it.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Whether t is an ordinary CPU tensor with data: not a fake, functional or batched wrapper.
bool plain_cpu(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kWrappers{c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                          c10::DispatchKey::FuncTorchBatched,
                                          c10::DispatchKey::FuncTorchGradWrapper};
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(kWrappers) &&
         t.has_storage();
}

// RMSNorm of `rows` rows of D values: fp32 statistics, the normalised value rounded to T, then
// the weight's product rounded to T (as the composite's `weight * normed.to(T)`).
template <typename T>
void rms_norm_rows(const T* x, const T* weight, int64_t rows, int64_t D, float eps, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * D;
    float squares = 0.f;
    for (int64_t i = 0; i < D; ++i) squares += float(row[i]) * float(row[i]);
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[r * D + i] = T(float(weight[i]) * rounded<T>(float(row[i]) * inv));
  }
}

// Rotary embedding (rotate-half) in place on `heads` heads of hd values per row; cos, sin:
// (rows_per_sequence, hd), row r of a sequence at position r. Products and sum rounded as the
// composite's `t * cos + rotated * sin`.
template <typename T>
void rotate_rows(T* t, int64_t rows, int64_t T_len, int64_t heads, int64_t hd, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  std::vector<float> original(hd);
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + (r % T_len) * hd;
    const T* s = sin + (r % T_len) * hd;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = t + (r * heads + h) * hd;
      for (int64_t i = 0; i < hd; ++i) original[i] = float(v[i]);
      for (int64_t i = 0; i < hd; ++i) {
        const float partner = i < half ? -original[i + half] : original[i - half];
        v[i] = T(rounded<T>(original[i] * float(c[i])) + rounded<T>(partner * float(s[i])));
      }
    }
  }
}

#define FLEXTRON_AVX2 __attribute__((target("avx2,fma")))

// e^x for 8 lanes of x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2,
// e^r by its Taylor polynomial to degree 7 (relative error under 1e-8), 2^n in the exponent
// bits. Below -87 (under fp32's smallest normal number) the result is 0. Why: the scalar
// std::exp of every score was a third of attention's time at decode.
FLEXTRON_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts, the first with few enough bits that n times it is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(power)));
}

// The 4 sums of the 8 lanes of a, b, c and d, in that order.
FLEXTRON_AVX2 inline __m128 horizontal_sums(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// scores[s] = scale * <query, keys[s]> for s < count: 4 keys at a time, their sums reduced together.
template <typename T>
FLEXTRON_AVX2 void dot_rows(const float* query, const T* keys, int64_t count, int64_t hd, float scale,
                            float* scores) {
  int64_t s = 0;
  for (; s + 4 <= count; s += 4) {
    __m256 dot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256 qv = _mm256_loadu_ps(query + i);
      for (int j = 0; j < 4; ++j) dot[j] = _mm256_fmadd_ps(qv, skinny::load8(keys + (s + j) * hd + i), dot[j]);
    }
    _mm_storeu_ps(scores + s, _mm_mul_ps(horizontal_sums(dot[0], dot[1], dot[2], dot[3]), _mm_set1_ps(scale)));
  }
  for (; s < count; ++s) {
    __m256 dot = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 8)
      dot = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), skinny::load8(keys + s * hd + i), dot);
    scores[s] = skinny::horizontal_sum(dot) * scale;
  }
}

// scores[s] = e^(scores[s] - top) for s < count; returns their sum.
FLEXTRON_AVX2 float softmax_numerators(float* scores, int64_t count, float top) {
  __m256 total = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= count; s += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + s, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = skinny::horizontal_sum(total);
  for (; s < count; ++s) sum += (scores[s] = std::exp(scores[s] - top));
  return sum;
}

// sum[: 8 V] = Σ_s p[s] · values[s, : 8 V] for s < count (rows hd apart), V vectors of 8 lanes
// held in registers: one pass over the values (a pass per vector read them hd / 8 times).
template <int V, typename T>
FLEXTRON_AVX2 void weighted_values(const float* p, const T* values, int64_t count, int64_t hd, float* sum) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t s = 0; s < count; ++s) {
    const __m256 weight = _mm256_set1_ps(p[s]);
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(weight, skinny::load8(values + s * hd + 8 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(sum + 8 * v, acc[v]);
}

// Attention of the new rows over the cache (causal): for sequence b, query head h of the
// first `active` heads reads KV head h / group over positions [0, length + t]; heads past
// `active` (the rest of the last group) output zeros. q: (B*T, q_heads*hd) rotated;
// caches: (B, kv_total, max_len, hd); out: (B*T, q_heads*hd). hd is a multiple of 8: each
// key and value row is hd / 8 vectors of 8 fp32 lanes (skinny_gemm.h's load8 widens bf16).
template <typename T>
FLEXTRON_AVX2 void attend_rows(const T* q, const T* k_cache, const T* v_cache, int64_t B, int64_t T_len,
                               int64_t q_heads, int64_t active, int64_t group, int64_t kv_total,
                               int64_t max_len, int64_t hd, int64_t length, T* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  std::vector<float> query(hd), scores(length + T_len), sum(hd);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T_len; ++t) {
      const int64_t row = b * T_len + t, visible = length + t + 1;
      for (int64_t h = 0; h < q_heads; ++h) {
        T* o = out + (row * q_heads + h) * hd;
        if (h >= active) {
          std::fill(o, o + hd, T(0.f));
          continue;
        }
        const int64_t offset = (b * kv_total + h / group) * max_len * hd;
        const T* values = v_cache + offset;
        for (int64_t i = 0; i < hd; ++i) query[i] = float(q[(row * q_heads + h) * hd + i]);
        dot_rows(query.data(), k_cache + offset, visible, hd, scale, scores.data());
        const float top = *std::max_element(scores.begin(), scores.begin() + visible);
        const float total = softmax_numerators(scores.data(), visible, top);
        int64_t i = 0;
        for (; i + 64 <= hd; i += 64) weighted_values<8>(scores.data(), values + i, visible, hd, sum.data() + i);
        for (; i < hd; i += 8) weighted_values<1>(scores.data(), values + i, visible, hd, sum.data() + i);
        for (int64_t i = 0; i < hd; ++i) o[i] = T(sum[i] / total);
      }
    }
  }
}
#undef FLEXTRON_AVX2

// a + b elementwise, rounded to T (a residual add).
template <typename T>
void add_rows(const T* a, const T* b, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(float(a[i]) + float(b[i]));
}

// silu(gate) * up, each rounded to T as the composite's two operations.
template <typename T>
void swiglu_rows(const T* gate, const T* up, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = float(gate[i]);
    out[i] = T(rounded<T>(g / (1.f + std::exp(-g))) * float(up[i]));
  }
}

// The projections through the CPU kernels, called directly (no dispatcher on this path).
class CpuProjections : public LayerOperands {
 public:
  using LayerOperands::LayerOperands;

  // y (rows, out) = x (rows, in) through projection p's first `out` rows and `in` columns; x and
  // y are contiguous rows. Weights without a bias take the few-row kernels on raw pointers (no
  // tensor and no ATen operation: at decode those cost as much as a small projection): fp32, bf16
  // with AVX-512 BF16, int8 with fp32 x. Other cases go through the ops' CPU functions.
  template <typename T>
  void apply(Projection p, const T* x, int64_t rows, int64_t in, int64_t out, T* y) const {
    const at::Tensor& w = weight(p);
    const std::optional<at::Tensor> s = scale(p);
    if (!bias(p).has_value()) {
      if constexpr (std::is_same_v<T, float>) {
        if (!s.has_value())
          return skinny::linear_rows_fma(x, rows, in, w.const_data_ptr<float>(), w.stride(0), out, in, 1.f, nullptr,
                                         y, out);
        if (s->scalar_type() == at::kFloat && s->is_contiguous())
          return skinny::int8_few_rows(x, rows, in, w.const_data_ptr<int8_t>(), w.stride(0), out, in,
                                       s->const_data_ptr<float>(), nullptr, y, out);
      } else if (!s.has_value()) {
        if (skinny::use_dpbf16())
          return skinny::linear_rows_dpbf16(x, rows, in, w.const_data_ptr<T>(), w.stride(0), out, in, 1.f, nullptr,
                                            y, out);
      }
    }
    const at::Tensor x_rows =
        at::from_blob(const_cast<T*>(x), {rows, in}, w.options().dtype(c10::CppTypeToScalarType<T>::value));
    const at::Tensor result = s.has_value() ? nested_linear_int8_cpu(x_rows, w, *s, bias(p), out, in)
                                            : nested_linear_cpu(x_rows, w, bias(p), out, in);  // (rows, out)
    std::copy_n(result.const_data_ptr<T>(), rows * out, y);
  }

  bool requires_grad() const {
    for (int64_t p = 0; p < kProjections; ++p) {
      const std::optional<at::Tensor> b = bias(Projection(p));
      if (weight(Projection(p)).requires_grad() || (b.has_value() && b->requires_grad())) return true;
    }
    return false;
  }

  // Whether every operand is a plain CPU tensor with contiguous rows and every float one has x's
  // dtype (int8 weights: their scales are fp32).
  bool types_match(at::ScalarType dtype) const {
    for (int64_t p = 0; p < kProjections; ++p) {
      const at::Tensor& w = weight(Projection(p));
      const bool int8 = scale(Projection(p)).has_value();
      if (!plain_cpu(w) || w.stride(1) != 1 || (!int8 && w.scalar_type() != dtype)) return false;
      const std::optional<at::Tensor> b = bias(Projection(p));
      if (b.has_value() && (!plain_cpu(*b) || b->scalar_type() != dtype)) return false;
    }
    return true;
  }
};

// The layer's intermediate rows, in one buffer: one allocation per call, not one per intermediate,
// and left uninitialised (every value is written before it is read).
template <typename T>
struct Scratch {
  Scratch(int64_t rows, int64_t D, int64_t q_width, int64_t kv_width, int64_t width)
      : buffer(new T[rows * (4 * D + 2 * q_width + 2 * kv_width + 3 * width)]),
        h(buffer.get()),
        q(h + rows * D),
        k(q + rows * q_width),
        v(k + rows * kv_width),
        attended(v + rows * kv_width),
        o(attended + rows * q_width),
        residual(o + rows * D),
        m(residual + rows * D),
        gate(m + rows * D),
        up(gate + rows * width),
        hidden(up + rows * width) {}
  std::unique_ptr<T[]> buffer;
  T *h, *q, *k, *v, *attended, *o, *residual, *m, *gate, *up, *hidden;  // hidden: the MLP's output (rows, D)
};

template <typename T>
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        const CpuProjections& proj, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t length,
                        int64_t heads, int64_t width, float eps) {
  const int64_t B = x.size(0), T_len = x.size(1), D = x.size(2), rows = B * T_len;
  const int64_t kv_total = k_cache.size(1), max_len = k_cache.size(2), hd = k_cache.size(3);
  const int64_t group = proj.weight(kQ).size(0) / hd / kv_total;
  const int64_t kv_heads = (heads + group - 1) / group, q_heads = kv_heads * group;
  const int64_t q_width = q_heads * hd, kv_width = kv_heads * hd;
  Scratch<T> work(rows, D, q_width, kv_width, std::max(width, D));
  const T* input = x.const_data_ptr<T>();

  rms_norm_rows<T>(input, input_norm.const_data_ptr<T>(), rows, D, eps, work.h);
  proj.apply<T>(kQ, work.h, rows, D, q_width, work.q);  // (rows, qh*hd)
  proj.apply<T>(kK, work.h, rows, D, kv_width, work.k);  // (rows, kvh*hd)
  proj.apply<T>(kV, work.h, rows, D, kv_width, work.v);
  rotate_rows<T>(work.q, rows, T_len, q_heads, hd, cos.const_data_ptr<T>(), sin.const_data_ptr<T>());
  rotate_rows<T>(work.k, rows, T_len, kv_heads, hd, cos.const_data_ptr<T>(), sin.const_data_ptr<T>());
  T* keys = k_cache.mutable_data_ptr<T>();
  T* values = v_cache.mutable_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_len; ++t)
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at_cache = ((b * kv_total + g) * max_len + length + t) * hd;
        const int64_t at_row = ((b * T_len + t) * kv_heads + g) * hd;
        std::copy_n(work.k + at_row, hd, keys + at_cache);
        std::copy_n(work.v + at_row, hd, values + at_cache);
      }
  // As the composite's copy_ would: autograd then knows that the caches changed.
  k_cache.unsafeGetTensorImpl()->bump_version();
  v_cache.unsafeGetTensorImpl()->bump_version();

  attend_rows<T>(work.q, keys, values, B, T_len, q_heads, heads, group, kv_total, max_len, hd, length, work.attended);
  proj.apply<T>(kO, work.attended, rows, q_width, D, work.o);  // (rows, D)
  add_rows<T>(input, work.o, rows * D, work.residual);

  rms_norm_rows<T>(work.residual, post_norm.const_data_ptr<T>(), rows, D, eps, work.m);
  proj.apply<T>(kGate, work.m, rows, D, width, work.gate);  // (rows, width)
  proj.apply<T>(kUp, work.m, rows, D, width, work.up);
  swiglu_rows<T>(work.gate, work.up, rows * width, work.gate);
  proj.apply<T>(kDown, work.gate, rows, width, D, work.hidden);  // (rows, D)
  at::Tensor y = at::empty({B, T_len, D}, x.options());
  add_rows<T>(work.residual, work.hidden, rows * D, y.mutable_data_ptr<T>());
  return y;
}

}  // namespace

std::optional<at::Tensor> decoder_layer_decode_cpu(
    const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& scales, const c10::List<std::optional<at::Tensor>>& biases,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
    int64_t length, int64_t heads, int64_t width, double eps) {
  const at::ScalarType dtype = x.scalar_type();
  const int64_t rows = x.size(0) * x.size(1), hd = k_cache.size(3);
  const CpuProjections proj(weights, scales, biases);
  // Gradients and tracing (fakes, functionalization) take the composite, as does prefill.
  const bool applies =
      skinny::cpu_has_avx2_fma() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
      rows <= kSkinnyMaxRows && (dtype == at::kFloat || dtype == at::kBFloat16) && hd % 8 == 0 &&
      proj.types_match(dtype) && !(at::GradMode::is_enabled() && proj.requires_grad()) && [&] {
        for (const at::Tensor* t : {&x, &input_norm, &post_norm, &cos, &sin, &k_cache, &v_cache}) {
          if (!plain_cpu(*t) || t->scalar_type() != dtype || !t->is_contiguous()) return false;
          if (at::GradMode::is_enabled() && t->requires_grad()) return false;
        }
        return cos.numel() == x.size(1) * hd && sin.numel() == cos.numel();
      }();
  if (!applies) return std::nullopt;
  const float epsilon = static_cast<float>(eps);
  if (dtype == at::kBFloat16)
    return decode_layer<at::BFloat16>(x, input_norm, post_norm, proj, cos, sin, k_cache, v_cache, length, heads,
                                      width, epsilon);
  return decode_layer<float>(x, input_norm, post_norm, proj, cos, sin, k_cache, v_cache, length, heads, width,
                             epsilon);
}
#else   // without AVX2 kernels the composite runs
std::optional<at::Tensor> decoder_layer_decode_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                                                   const c10::List<std::optional<at::Tensor>>&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                   int64_t, int64_t, double) {
  return std::nullopt;
}
#endif

}  // namespace flextron
