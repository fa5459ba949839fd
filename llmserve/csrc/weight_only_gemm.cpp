// Weight-only quantized linear layers for small batches (decode): y = (x W^T) * scale + bias with
// W stored as int8 (one float scale per output row) or bfloat16, x and y float32. Each weight row
// is streamed once per group of 4 input rows and widened to float in registers, so a decode step
// reads a quarter (int8) or half (bf16) of the bytes of a float32 model. Parallel over output rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMSERVE_AVX2 1
#endif

namespace {

inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

#ifdef LLMSERVE_AVX2
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 widen8(const at::BFloat16* p) {  // bf16 is the top half of a float32
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
#endif

// Dot products of up to 4 rows of x with one weight row.
template <typename w_t, int R>
inline void dot_rows(const float* const* xs, const w_t* w, int64_t K, float* out) {
  int64_t k = 0;
#ifdef LLMSERVE_AVX2
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = widen8(w + k), w1 = widen8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r] + k), w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[r] + k + 8), w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = llmserve::hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) out[r] += xs[r][k] * widen(w[k]);
}

template <typename w_t>
void gemm(const float* x, const w_t* w, const float* scale, const float* bias, float* y,
          int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
      const float* xs[4];
      for (int r = 0; r < 4; ++r) xs[r] = x + (m0 + std::min(r, rows - 1)) * K;
      for (int64_t n = begin; n < end; ++n) {
        float d[4];
        const w_t* wn = w + n * K;
        switch (rows) {
          case 1: dot_rows<w_t, 1>(xs, wn, K, d); break;
          case 2: dot_rows<w_t, 2>(xs, wn, K, d); break;
          case 3: dot_rows<w_t, 3>(xs, wn, K, d); break;
          default: dot_rows<w_t, 4>(xs, wn, K, d); break;
        }
        const float s = scale ? scale[n] : 1.f, b = bias ? bias[n] : 0.f;
        for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = d[r] * s + b;
      }
    }
  });
}

}  // namespace

// x: [M, K] float32; weight: [N, K] int8 or bfloat16; scale: [N] float32 (int8) or empty;
// bias: [N] float32 or empty. Returns [M, N] float32.
torch::Tensor weight_only_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == x.size(1), "bad weight shape");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* s = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  if (weight.scalar_type() == torch::kInt8) {
    TORCH_CHECK(s != nullptr, "int8 weights need a scale per output row");
    gemm<int8_t>(x.data_ptr<float>(), weight.data_ptr<int8_t>(), s, b, y.data_ptr<float>(), M, N, K);
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kBFloat16, "weights must be int8 or bfloat16");
    gemm<at::BFloat16>(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), s, b, y.data_ptr<float>(), M, N, K);
  }
  return y;
}
