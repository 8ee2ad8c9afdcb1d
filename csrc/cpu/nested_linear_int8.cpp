// nested_linear_int8 on the CPU: y = (x[..., :in] @ q[:out, :in]^T) * scale[:out] (+ bias[:out])
// with int8 weights q and one fp32 scale per output row.
//
// Why int8 weights: decoding one token streams every weight once, so it is bound by
// the bytes that come from memory; int8 halves bf16's bytes. The scale is per output
// row, so it factors out of each dot product, and every prefix q[:out, :in] of the
// full matrix is the same numbers a sub-network of that size would hold: quantizing
// once serves every budget.
//
// A few rows of x (decode, <= kSkinnyMaxRows) take the kernels below, which read each
// weight row once; the scale and bias are applied once per output. With AVX-512 VNNI each
// row of x is first rounded to int16 with a scale of its own (max|x| / levels), and
// vpdpwssd sums 32 int8 x int16 products per instruction in int32: the widening to fp32
// that bounds the float kernels goes, and the weights stream at close to memory speed.
// The int16 rounding of x is below 1e-4 of max|x|, far below the int8 weights' own.
// Elsewhere (or FLEXTRON_INT8_DOT=portable) the kernels widen 16 int8 weights at a time to
// fp32 (AVX-512; 8 with AVX2) and multiply them with fp32 x. More rows (prefill)
// dequantize the prefix to x's dtype and take ATen's GEMM: a copy of the prefix per call,
// small next to the GEMM.
#include "common/checks.h"
#include "ops.h"
#include "skinny_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

namespace flextron {
namespace {

#ifdef FLEXTRON_SKINNY_AVX2
#define FLEXTRON_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define FLEXTRON_AVX2 __attribute__((target("avx2,fma")))

// y[m, n] = scale[n] * <x[m, :K], q[n, :K]> (+ bias[n]) for m < M, n in [begin, end).
// U independent FMA chains per row of x; the last K % 16 weights are masked loads.
template <int M, int U>
FLEXTRON_AVX512 void columns_int8_avx512(const float* x, int64_t ldx, const int8_t* q, int64_t ldq,
                                         int64_t K, const float* scale, const float* bias, float* y,
                                         int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = q + n * ldq;
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16 * u));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k + 16 * u), wv, acc[m][u]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1u);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row + k)));
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * ldx + k), wv, acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m512 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
      y[m * ldy + n] = scale[n] * _mm512_reduce_add_ps(total) + (bias == nullptr ? 0.f : bias[n]);
    }
  }
}

// The same with AVX2: 8 weights at a time, the last K % 8 one by one.
template <int M>
FLEXTRON_AVX2 void columns_int8_avx2(const float* x, int64_t ldx, const int8_t* q, int64_t ldq, int64_t K,
                                     const float* scale, const float* bias, float* y, int64_t ldy,
                                     int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = q + n * ldq;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float sum = skinny::horizontal_sum(acc[m]);
      for (int64_t tail = k; tail < K; ++tail) sum += x[m * ldx + tail] * static_cast<float>(row[tail]);
      y[m * ldy + n] = scale[n] * sum + (bias == nullptr ? 0.f : bias[n]);
    }
  }
}

#define FLEXTRON_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// int32 sums of int8 x int16 products are flushed to fp32 every kVnniChunk weights; within a
// chunk, |x| <= levels keeps them from overflowing: 127 * levels * chunk < 2^31.
constexpr int64_t kVnniChunk = 2048;

int64_t int16_levels(int64_t K) {
  return std::min<int64_t>(32767, ((int64_t{1} << 31) - 1) / (127 * std::min(K, kVnniChunk)));
}

// y[m, n] = scale[n] * xs[m] * <xq[m, :K], q[n, :K]> (+ bias[n]) for m < M, n in [begin, end):
// xq (M, ldx) int16, zero past K; U independent vpdpwssd chains per row of x.
template <int M, int U>
FLEXTRON_VNNI void columns_int8_vnni(const int16_t* xq, int64_t ldx, const float* xs, const int8_t* q,
                                     int64_t ldq, int64_t K, const float* scale, const float* bias, float* y,
                                     int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = q + n * ldq;
    float sums[M] = {};
    for (int64_t chunk = 0; chunk < K; chunk += kVnniChunk) {
      const int64_t stop = std::min(K, chunk + kVnniChunk);
      __m512i acc[M][U];
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
      int64_t k = chunk;
      for (; k + 32 * U <= stop; k += 32 * U) {
        for (int u = 0; u < U; ++u) {
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 32 * u)));
          for (int m = 0; m < M; ++m)
            acc[m][u] = _mm512_dpwssd_epi32(acc[m][u], _mm512_loadu_si512(xq + m * ldx + k + 32 * u), w);
        }
      }
      for (; k < stop; k += 32) {  // the last weights: a masked load; xq is zero past K
        const __mmask32 mask = static_cast<__mmask32>(
            stop - k >= 32 ? 0xffffffffu : (1u << (stop - k)) - 1u);
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + k));
        for (int m = 0; m < M; ++m)
          acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], _mm512_loadu_si512(xq + m * ldx + k), w);
      }
      for (int m = 0; m < M; ++m) {
        __m512i total = acc[m][0];
        for (int u = 1; u < U; ++u) total = _mm512_add_epi32(total, acc[m][u]);
        sums[m] += static_cast<float>(_mm512_reduce_add_epi32(total));
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = scale[n] * xs[m] * sums[m] + (bias == nullptr ? 0.f : bias[n]);
  }
}
// columns_int8_vnni for one row of x against weight rows that are prefixes of longer rows
// (ldq > K: a sub-network's down or o projection), R rows read side by side: a prefix is too
// short a stream for the hardware prefetcher, and R rows at once keep R reads in flight (here
// a 576 x 704 prefix of 1536-long rows, cold: 94 -> 63 us, as fast as the whole rows; 8 rows: 70).
template <int R>
FLEXTRON_VNNI void columns_int8_vnni_partial_rows(const int16_t* xq, const float* xs, const int8_t* q,
                                                  int64_t ldq, int64_t K, const float* scale, const float* bias,
                                                  float* y, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    const int8_t* rows = q + n * ldq;
    float sums[R] = {};
    for (int64_t chunk = 0; chunk < K; chunk += kVnniChunk) {
      const int64_t stop = std::min(K, chunk + kVnniChunk);
      __m512i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
      for (int64_t k = chunk; k < stop; k += 32) {  // xq is zero past K; the last weights masked
        const __mmask32 mask = static_cast<__mmask32>(stop - k >= 32 ? 0xffffffffu : (1u << (stop - k)) - 1u);
        const __m512i xv = _mm512_loadu_si512(xq + k);
        for (int r = 0; r < R; ++r) {
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, rows + r * ldq + k));
          acc[r] = _mm512_dpwssd_epi32(acc[r], xv, w);
        }
      }
      for (int r = 0; r < R; ++r) sums[r] += static_cast<float>(_mm512_reduce_add_epi32(acc[r]));
    }
    for (int r = 0; r < R; ++r) y[n + r] = scale[n + r] * xs[0] * sums[r] + (bias == nullptr ? 0.f : bias[n + r]);
  }
  if (n < end) columns_int8_vnni<1, 4>(xq, 0, xs, q, ldq, K, scale, bias, y, 0, n, end);
}
// Each row of x (M, K) fp32 rounded to int16: xq (M, ldx = K rounded up to 32, zeros after K),
// and the scales xs (M,) with x ~= xs * xq. AVX-512, 16 values at a time (a scalar loop was 4%
// of an int8 decode step): the conversion rounds to nearest even, as std::nearbyint does in the
// default rounding mode.
FLEXTRON_AVX512 void quantize_rows_int16(const float* x, int64_t ldx_in, int64_t M, int64_t K, int16_t* xq,
                                         int64_t ldx, float* xs) {
  const float levels = static_cast<float>(int16_levels(K));
  const auto first = [K](int64_t k) {  // the lanes of [k, k + 16) that are below K
    return static_cast<__mmask16>(k >= K ? 0 : K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
  };
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * ldx_in;
    __m512 largest = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
      largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(k), row + k)));
    const float top = _mm512_reduce_max_ps(largest);
    xs[m] = top / levels;
    const __m512 inverse = _mm512_set1_ps(top > 0.f ? levels / top : 0.f);  // a zero row stays zero
    int16_t* out = xq + m * ldx;
    for (int64_t k = 0; k < ldx; k += 16) {
      const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(first(k), row + k), inverse);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(scaled)));
    }
  }
}

#undef FLEXTRON_AVX512
#undef FLEXTRON_AVX2
#undef FLEXTRON_VNNI

bool cpu_has_avx512bw() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return supported;
}

// Whether the few-row kernels use AVX-512 VNNI: FLEXTRON_INT8_DOT=auto (or unset) where the CPU
// has it, =portable never (the fp32 widening path, to test or compare it). Read per call.
bool use_vnni() {
  static const bool supported = cpu_has_avx512bw() && __builtin_cpu_supports("avx512vnni");
  const char* value = std::getenv("FLEXTRON_INT8_DOT");
  const std::string setting = value == nullptr ? "auto" : value;
  TORCH_CHECK(setting == "auto" || setting == "portable",
              "FLEXTRON_INT8_DOT must be auto or portable, got '", setting, "'");
  return setting == "auto" && supported;
}

// y (M, N) fp32 for M <= kSkinnyMaxRows rows of fp32 x (M, K) and int8 q (N, K) rows ldq apart, with VNNI.
void few_rows_vnni(const float* x, int64_t M, int64_t ldx_in, const int8_t* qp, int64_t ldq, int64_t N, int64_t K,
                   const float* sp, const float* bias, float* yp, int64_t ldy) {
  const int64_t ldx = (K + 31) / 32 * 32;
  std::vector<int16_t> xq(M * ldx);  // (M, ldx)
  float xs[kSkinnyMaxRows];
  quantize_rows_int16(x, ldx_in, M, K, xq.data(), ldx, xs);
  const int16_t* xp = xq.data();
  const float* xsp = xs;
  at::parallel_for(0, N, skinny::kGrain, [&](int64_t begin, int64_t end) {
    switch (M) {  // U: vpdpwssd chains per row of x (32 vector registers)
      case 1:
        if (read_prefixes_side_by_side(ldq, K, sizeof(int8_t))) {
          columns_int8_vnni_partial_rows<16>(xp, xsp, qp, ldq, K, sp, bias, yp, begin, end);
        } else {
          columns_int8_vnni<1, 4>(xp, ldx, xsp, qp, ldq, K, sp, bias, yp, ldy, begin, end);
        }
        break;
      case 2: columns_int8_vnni<2, 4>(xp, ldx, xsp, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      case 3: columns_int8_vnni<3, 2>(xp, ldx, xsp, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      default: columns_int8_vnni<4, 2>(xp, ldx, xsp, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
    }
  });
}
#endif  // FLEXTRON_SKINNY_AVX2

}  // namespace

#ifdef FLEXTRON_SKINNY_AVX2
void skinny::int8_few_rows(const float* xp, int64_t M, int64_t ldx, const int8_t* qp, int64_t ldq, int64_t N,
                           int64_t K, const float* sp, const float* bias, float* yp, int64_t ldy) {
  if (use_vnni()) return few_rows_vnni(xp, M, ldx, qp, ldq, N, K, sp, bias, yp, ldy);
  const bool avx512 = cpu_has_avx512bw();
  at::parallel_for(0, N, skinny::kGrain, [&](int64_t begin, int64_t end) {
    if (avx512) {
      switch (M) {  // U: FMA chains per row of x (32 vector registers)
        case 1: columns_int8_avx512<1, 4>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
        case 2: columns_int8_avx512<2, 4>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
        case 3: columns_int8_avx512<3, 2>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
        default: columns_int8_avx512<4, 2>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      }
      return;
    }
    switch (M) {
      case 1: columns_int8_avx2<1>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      case 2: columns_int8_avx2<2>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      case 3: columns_int8_avx2<3>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
      default: columns_int8_avx2<4>(xp, ldx, qp, ldq, K, sp, bias, yp, ldy, begin, end); break;
    }
  });
}
#endif  // FLEXTRON_SKINNY_AVX2


at::Tensor nested_linear_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, int64_t out_features,
                                  int64_t in_features) {
  constexpr const char* op = "nested_linear_int8";
  check_nested_linear_int8_args(op, x, qweight, scale, bias, out_features, in_features);

  const at::Tensor x_prefix = x.reshape({-1, x.size(-1)}).narrow(1, 0, in_features);  // (N, in)
  const at::Tensor q_prefix = qweight.narrow(0, 0, out_features).narrow(1, 0, in_features);  // (out, in)
  const at::Tensor scale_prefix = scale.narrow(0, 0, out_features).to(at::kFloat).contiguous();  // (out,)
  std::optional<at::Tensor> bias_prefix;
  if (bias.has_value()) bias_prefix = bias->narrow(0, 0, out_features);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  const int64_t rows = x_prefix.size(0);
#ifdef FLEXTRON_SKINNY_AVX2
  if (skinny::cpu_has_avx2_fma() && rows >= 1 && rows <= kSkinnyMaxRows && q_prefix.stride(1) == 1) {
    const at::Tensor x32 = x_prefix.to(at::kFloat).contiguous();  // (N, in): a few rows
    const at::Tensor bias32 = bias_prefix.has_value() ? bias_prefix->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));  // (N, out)
    skinny::int8_few_rows(x32.const_data_ptr<float>(), rows, x32.stride(0), q_prefix.const_data_ptr<int8_t>(),
                          q_prefix.stride(0), out_features, in_features, scale_prefix.const_data_ptr<float>(),
                          bias32.defined() ? bias32.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
                          y.stride(0));
    return y.to(x.scalar_type()).view(shape);
  }
#endif
  // Dequantized prefix (out, in) in x's dtype, then the GEMM.
  const at::Tensor weight = (q_prefix.to(at::kFloat) * scale_prefix.unsqueeze(1)).to(x.scalar_type());
  return linear_nt(x_prefix, weight, bias_prefix).view(shape);
}

}  // namespace flextron
