// Products with a few rows of x on the CPU — y = alpha · x · wᵀ (+ bias) and
// y = x · w — with dedicated kernels, ATen's GEMM otherwise.
//
// Why: token-by-token decoding multiplies 1..4 rows by every weight matrix, so the
// product is bound by how fast the weights stream from memory. The BLAS's GEMM path
// reached a quarter to a half of one core's streaming bandwidth on such shapes here;
// this kernel reads each weight row once, as one sequential stream, and uses it for
// all M rows of x. Attention at decode time has the same shape (a few query rows
// against the cached keys, then the probabilities against the values).
//
// Weights are fp32 or bf16, and bf16 ones stay bf16 in memory: decoding streams half
// the bytes, which is the point of a bf16 model. Sums are fp32. With AVX-512 BF16
// (bf16 rows of x against bf16 weights) the dot-product instruction takes 32 weights at
// a time; elsewhere (AVX2) each bf16 weight is widened to fp32 in a register. Outputs
// are rounded to y's dtype once, at the end. Anything else (more rows, other dtypes,
// rows that are not contiguous, a CPU without AVX2/FMA) goes to ATen's GEMM on the
// same strided views.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <optional>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FLEXTRON_SKINNY_AVX2 1
#endif

namespace flextron {

constexpr int64_t kSkinnyMaxRows = 4;  // above this the BLAS's packed GEMM wins
// One row of x against weight rows that are prefixes of longer rows: while the gap between
// one prefix's end and the next one's start is at most this many bytes, the hardware
// prefetcher still follows the rows one after the other; past it, the kernels read several
// rows side by side. Measured here (576 rows of 1536, cold): gaps up to 320 bytes (int8) and
// 384 (bf16) ran as fast as whole rows one at a time; from 384 (int8) and 448 (bf16) bytes
// on, 1.5-1.8x slower that way, and side by side as fast as whole rows or faster.
constexpr int64_t kFollowedGapBytes = 320;

// Whether one row of x against K-element prefixes of weight rows ldw elements apart reads
// several rows side by side (the gap between prefixes is past kFollowedGapBytes).
inline bool read_prefixes_side_by_side(int64_t ldw, int64_t K, int64_t element_bytes) {
  return (ldw - K) * element_bytes > kFollowedGapBytes;
}

namespace skinny {

#ifdef FLEXTRON_SKINNY_AVX2
#define FLEXTRON_AVX2 __attribute__((target("avx2,fma")))

// 8 weights as fp32 lanes: fp32 ones as they are; bf16 ones widened, since a bf16 is
// the high half of the fp32 with the same value.
FLEXTRON_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FLEXTRON_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

FLEXTRON_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] for m < M and n in [begin, end): one weight row (K contiguous floats) at a
// time, read as a single sequential stream — interleaving several rows' streams ran at
// ~60% of the bandwidth here — with U independent FMA chains per row of x.
template <int M, int U, typename W>
FLEXTRON_AVX2 void columns_nt(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                              float alpha, const float* bias, float* y, int64_t ldy, int64_t begin,
                              int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const W* w_row = w + n * ldw;
    __m256 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load8(w_row + k + 8 * u);
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k + 8 * u), wv, acc[m][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load8(w_row + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[m][u]);
      float sum = horizontal_sum(total);
      for (int64_t tail = k; tail < K; ++tail) sum += x[m * ldx + tail] * float(w_row[tail]);
      y[m * ldy + n] = alpha * sum + (bias == nullptr ? 0.f : bias[n]);
    }
  }
}

// One row of x (M = 1) against weight rows that are a prefix of longer rows (ldw > K:
// a sub-network's down projection): every row is then a short stream of its own, and
// reading R = 8 of them side by side keeps enough reads in flight (here about twice
// the bandwidth of one row at a time, for prefixes of 79% and 46% of the row).
template <int R, typename W>
FLEXTRON_AVX2 void columns_nt_partial_rows(const float* x, const W* w, int64_t ldw, int64_t K,
                                           float alpha, const float* bias, float* y, int64_t begin,
                                           int64_t end) {
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    const W* w_rows = w + n * ldw;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(xv, load8(w_rows + r * ldw + k), acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float sum = horizontal_sum(acc[r]);
      for (int64_t tail = k; tail < K; ++tail) sum += x[tail] * float(w_rows[r * ldw + tail]);
      y[n + r] = alpha * sum + (bias == nullptr ? 0.f : bias[n + r]);
    }
  }
  if (n < end) columns_nt<1, 4>(x, 0, w, ldw, K, alpha, bias, y, 0, n, end);
}

// y (M, N) = x (M, K) · w (K, N), w's rows N contiguous floats (ldw apart): each
// output block of C vectors x M rows stays in registers while the K rows of w
// stream past; a block's later passes over w hit the cache (w is small here: one
// head's values).
template <int M, int C, typename W>
FLEXTRON_AVX2 void rows_nn(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                           int64_t N, float* y, int64_t ldy) {
  int64_t n0 = 0;
  for (; n0 + 8 * C <= N; n0 += 8 * C) {
    __m256 acc[M][C];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m256 wv[C];
      for (int c = 0; c < C; ++c) wv[c] = load8(w + k * ldw + n0 + 8 * c);
      for (int m = 0; m < M; ++m) {
        const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
        for (int c = 0; c < C; ++c) acc[m][c] = _mm256_fmadd_ps(xb, wv[c], acc[m][c]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(y + m * ldy + n0 + 8 * c, acc[m][c]);
  }
  for (; n0 < N; ++n0) {  // the last N % (8 C) columns
    for (int m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[m * ldx + k] * float(w[k * ldw + n0]);
      y[m * ldy + n0] = sum;
    }
  }
}

inline bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#undef FLEXTRON_AVX2

#define FLEXTRON_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// 32 bf16 values (the first `count` of them, zeros after) as one dot-product operand.
FLEXTRON_AVX512BF16 inline __m512bh load32(const at::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}
FLEXTRON_AVX512BF16 inline __m512bh load32(const at::BFloat16* p, int64_t count) {
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << count) - 1), p);
}

// columns_nt for bf16 rows of x and bf16 weights with AVX-512 BF16: each instruction
// multiplies 32 pairs and adds them, two by two, into 16 fp32 sums. The last K % 32
// weights of a row are a masked load (zeros after), so any K is one code path.
template <int M, int U, typename Y>
FLEXTRON_AVX512BF16 void columns_nt_dpbf16(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w,
                                           int64_t ldw, int64_t K, float alpha, const float* bias,
                                           Y* y, int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const at::BFloat16* w_row = w + n * ldw;
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512bh wv = load32(w_row + k + 32 * u);
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], load32(x + m * ldx + k + 32 * u), wv);
      }
    }
    for (; k < K; k += 32) {
      const int64_t count = std::min<int64_t>(32, K - k);
      const __m512bh wv = load32(w_row + k, count);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], load32(x + m * ldx + k, count), wv);
    }
    for (int m = 0; m < M; ++m) {
      __m512 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
      y[m * ldy + n] = Y(alpha * _mm512_reduce_add_ps(total) + (bias == nullptr ? 0.f : bias[n]));
    }
  }
}

// columns_nt_partial_rows for bf16 with AVX-512 BF16: one row of x against R weight rows
// that are prefixes of longer rows (ldw > K), read side by side for the same reason.
template <int R, typename Y>
FLEXTRON_AVX512BF16 void columns_nt_dpbf16_partial_rows(const at::BFloat16* x, const at::BFloat16* w,
                                                        int64_t ldw, int64_t K, float alpha,
                                                        const float* bias, Y* y, int64_t begin,
                                                        int64_t end) {
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    const at::BFloat16* w_rows = w + n * ldw;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t count = std::min<int64_t>(32, K - k);
      const __m512bh xv = count == 32 ? load32(x + k) : load32(x + k, count);
      for (int r = 0; r < R; ++r) {
        const __m512bh wv = count == 32 ? load32(w_rows + r * ldw + k) : load32(w_rows + r * ldw + k, count);
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, wv);
      }
    }
    for (int r = 0; r < R; ++r)
      y[n + r] = Y(alpha * _mm512_reduce_add_ps(acc[r]) + (bias == nullptr ? 0.f : bias[n + r]));
  }
  if (n < end) columns_nt_dpbf16<1, 4>(x, 0, w, ldw, K, alpha, bias, y, 0, n, end);
}

#undef FLEXTRON_AVX512BF16
inline bool cpu_has_avx512_bf16() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

// Whether bf16 x bf16 products use AVX-512 BF16: FLEXTRON_BF16_DOT=auto (or unset) where
// the CPU has it, =portable never (the widening path, to test or compare it). Read per
// call, so a test can switch it.
inline bool use_dpbf16() {
  const char* value = std::getenv("FLEXTRON_BF16_DOT");
  const std::string setting = value == nullptr ? "auto" : value;
  TORCH_CHECK(setting == "auto" || setting == "portable",
              "FLEXTRON_BF16_DOT must be auto or portable, got '", setting, "'");
  return setting == "auto" && cpu_has_avx512_bf16();
}
constexpr int64_t kGrain = 64;  // output columns (weight rows) per task: enough work to amortise a task

// y (M, N) = alpha · x · wᵀ (+ bias) for M <= kSkinnyMaxRows rows of bf16 x and bf16 weight rows
// ldw apart, with AVX-512 BF16 (use_dpbf16()); each output rounded to Y (fp32 or bf16) as it is
// stored. Raw pointers: the decode path calls it with no tensor and no ATen operation.
template <typename Y>
void linear_rows_dpbf16(const at::BFloat16* x, int64_t M, int64_t ldx, const at::BFloat16* w, int64_t ldw,
                        int64_t N, int64_t K, float alpha, const float* bias, Y* y, int64_t ldy) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    switch (M) {
      // U: dot-product chains per row of x (32 vector registers).
      case 1:
        if (read_prefixes_side_by_side(ldw, K, sizeof(at::BFloat16))) {
          columns_nt_dpbf16_partial_rows<8>(x, w, ldw, K, alpha, bias, y, begin, end);
        } else {
          columns_nt_dpbf16<1, 4>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end);
        }
        break;
      case 2: columns_nt_dpbf16<2, 4>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
      case 3: columns_nt_dpbf16<3, 2>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
      default: columns_nt_dpbf16<4, 2>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
    }
  });
}

// The same for fp32 x and fp32 or bf16 (widened) weights, fp32 y, with AVX2 and FMA.
template <typename W>
void linear_rows_fma(const float* x, int64_t M, int64_t ldx, const W* w, int64_t ldw, int64_t N, int64_t K,
                     float alpha, const float* bias, float* y, int64_t ldy) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    switch (M) {
      // U: FMA chains per row of x, as many as the 16 vector registers hold.
      case 1:
        if (ldw > K) {
          columns_nt_partial_rows<8>(x, w, ldw, K, alpha, bias, y, begin, end);
        } else {
          columns_nt<1, 4>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end);
        }
        break;
      case 2: columns_nt<2, 4>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
      case 3: columns_nt<3, 2>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
      default: columns_nt<4, 2>(x, ldx, w, ldw, K, alpha, bias, y, ldy, begin, end); break;
    }
  });
}
#endif  // FLEXTRON_SKINNY_AVX2

#ifdef FLEXTRON_SKINNY_AVX2
// y (M, N) fp32 = (x (M, K) fp32 · q[:N, :K]ᵀ) · scale[:N] (+ bias) for M <= kSkinnyMaxRows rows
// and int8 weight rows ldq apart: nested_linear_int8's few-row kernels (nested_linear_int8.cpp)
// on raw pointers.
void int8_few_rows(const float* x, int64_t M, int64_t ldx, const int8_t* q, int64_t ldq, int64_t N, int64_t K,
                   const float* scale, const float* bias, float* y, int64_t ldy);
#endif

inline bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// Whether the kernels take x (M, K) and w (rows of contiguous values) and write y: fp32
// weights with fp32 x; bf16 weights with fp32 or bf16 x; y fp32 or bf16 with contiguous
// rows; bias: (N,) or none.
inline bool applies(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w) {
#ifdef FLEXTRON_SKINNY_AVX2
  const bool types = w.scalar_type() == at::kFloat ? x.scalar_type() == at::kFloat
                                                   : w.scalar_type() == at::kBFloat16 && float_or_bf16(x);
  return cpu_has_avx2_fma() && x.size(0) >= 1 && x.size(0) <= kSkinnyMaxRows && types &&
         float_or_bf16(y) && x.stride(1) == 1 && w.stride(1) == 1 && y.stride(1) == 1;
#else
  (void)y, (void)x, (void)w;
  return false;
#endif
}

// Whether a product of `rows` rows of fp32 x with bf16 weights `w` takes these kernels,
// which read w as it is stored (else the caller widens w to fp32 for the BLAS).
inline bool reads_bf16_weights(int64_t rows, const at::Tensor& w) {
#ifdef FLEXTRON_SKINNY_AVX2
  return cpu_has_avx2_fma() && rows >= 1 && rows <= kSkinnyMaxRows &&
         w.scalar_type() == at::kBFloat16 && w.stride(-1) == 1;
#else
  (void)rows, (void)w;
  return false;
#endif
}

// Runs `kernel(x, w)` with x as fp32 (a copy of a few rows when it is bf16) and w's
// data typed as it is stored, writing fp32 results into y, or into a scratch copied to a
// bf16 y at the end (one rounding).
template <typename Kernel>
void run_typed(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w, Kernel&& kernel) {
  const at::Tensor y32 = y.scalar_type() == at::kFloat ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
  const at::Tensor x32 = x.to(at::kFloat);  // (M, K); x itself when it is fp32
  if (w.scalar_type() == at::kFloat) {
    kernel(x32, w.const_data_ptr<float>(), y32);
  } else {
    kernel(x32, w.const_data_ptr<at::BFloat16>(), y32);
  }
  if (!y32.is_same(y)) y.copy_(y32);
}

}  // namespace skinny

// y = alpha · x · wᵀ (+ bias), written into y: (M, N) (any row stride). x: (M, K),
// w: (N, K) views with any leading dimensions, bias: (N,).
inline void linear_nt_out(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& bias = std::nullopt, double alpha = 1.0) {
#ifdef FLEXTRON_SKINNY_AVX2
  if (skinny::applies(y, x, w)) {
    const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();  // (N,)
    const float* bp = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
    const int64_t M = x.size(0), N = w.size(0), K = x.size(1), ldw = w.stride(0);
    const float a = static_cast<float>(alpha);
    if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && skinny::use_dpbf16()) {
      // The kernels round each output to y's dtype as they store it (bf16 or fp32: no buffer and
      // no copy per call); any other dtype goes through an fp32 buffer.
      const bool direct = y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16;
      const at::Tensor out = direct ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
      const auto* xp = x.const_data_ptr<at::BFloat16>();
      const auto* wp = w.const_data_ptr<at::BFloat16>();
      if (out.scalar_type() == at::kBFloat16) {
        skinny::linear_rows_dpbf16(xp, M, x.stride(0), wp, ldw, N, K, a, bp, out.mutable_data_ptr<at::BFloat16>(),
                                   out.stride(0));
      } else {
        skinny::linear_rows_dpbf16(xp, M, x.stride(0), wp, ldw, N, K, a, bp, out.mutable_data_ptr<float>(),
                                   out.stride(0));
      }
      if (!out.is_same(y)) y.copy_(out);
      return;
    }
    skinny::run_typed(y, x, w, [&](const at::Tensor& x32, const auto* wp, const at::Tensor& y32) {
      skinny::linear_rows_fma(x32.const_data_ptr<float>(), M, x32.stride(0), wp, ldw, N, K, a, bp,
                              y32.mutable_data_ptr<float>(), y32.stride(0));
    });
    return;
  }
#endif
  at::Tensor out = y;  // the _out calls want an lvalue
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w.t(), /*beta=*/1, alpha);
  } else {
    at::addmm_out(out, out, x, w.t(), /*beta=*/0, alpha);  // beta = 0: out is not read
  }
}

// y = alpha · x · wᵀ (+ bias) as a new contiguous (M, N) tensor.
inline at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias = std::nullopt, double alpha = 1.0) {
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());  // (M, N)
  linear_nt_out(y, x, w, bias, alpha);
  return y;
}

// y = x · w. x: (M, K), w: (K, N) views. Returns a new contiguous (M, N) tensor.
inline at::Tensor matmul_nn(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor y = at::empty({x.size(0), w.size(1)}, x.options());  // (M, N)
#ifdef FLEXTRON_SKINNY_AVX2
  if (skinny::applies(y, x, w)) {
    skinny::run_typed(y, x, w, [&](const at::Tensor& x32, const auto* wp, const at::Tensor& y32) {
      const float* xp = x32.const_data_ptr<float>();
      float* yp = y32.mutable_data_ptr<float>();
      const int64_t K = x.size(1), N = w.size(1), ldx = x32.stride(0), ldw = w.stride(0);
      switch (x.size(0)) {
        // C: output vectors per block, as many as the 16 vector registers hold.
        case 1: skinny::rows_nn<1, 4>(xp, ldx, wp, ldw, K, N, yp, N); break;
        case 2: skinny::rows_nn<2, 4>(xp, ldx, wp, ldw, K, N, yp, N); break;
        case 3: skinny::rows_nn<3, 2>(xp, ldx, wp, ldw, K, N, yp, N); break;
        default: skinny::rows_nn<4, 2>(xp, ldx, wp, ldw, K, N, yp, N); break;
      }
    });
    return y;
  }
#endif
  return at::mm_out(y, x, w);
}

}  // namespace flextron
