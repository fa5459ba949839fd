// Linear layers whose weights stay in GGUF's block formats (llama.cpp's ggml layout), with
// float32 activations:
//   Q4_1: 32 weights in 20 bytes {fp16 d, fp16 m, 16 bytes of nibbles}; w = q * d + m, q in 0..15.
//         Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
//   Q8_0: 32 weights in 34 bytes {fp16 d, 32 x int8}; w = q * d.
// A GGUF model published in these formats computes here with the weights it was published with, at
// 5 (Q4_1) or 8.5 (Q8_0) bits a weight instead of 32. Unlike llama.cpp, activations are not
// quantized: each block is widened to float32 in registers, so the result equals a float32 matmul
// with the dequantized weights up to summation order.
// For Q4_1, sum_i (q_i d + m) x_i = d * sum_i q_i x_i + m * sum_i x_i, and the block sums of x are
// shared by every output row, so they are computed once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMSERVE_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // weights per block, both formats
constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34;
enum Format : int64_t { kQ4_1 = 0, kQ8_0 = 1 };

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef LLMSERVE_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

#ifdef LLMSERVE_AVX2
inline __m256 i8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

// The 32 weights of one block as small integers (q), scale d and offset m (0 for Q8_0).
inline void unpack_scalar(const uint8_t* blk, Format fmt, float* q, float& d, float& m) {
  d = half_at(blk);
  if (fmt == kQ4_1) {
    m = half_at(blk + 2);
    const uint8_t* qs = blk + 4;
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<float>(qs[j] & 0x0F);
      q[j + 16] = static_cast<float>(qs[j] >> 4);
    }
  } else {
    m = 0.f;
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < QK; ++j) q[j] = static_cast<float>(qs[j]);
  }
}

// Dot products of R rows of x with one weight row of nb blocks. xsum[r][b] is the sum of block b
// of row r (used by Q4_1 only).
template <Format fmt, int R>
inline void dot_rows(const float* const* xs, const float* const* xsum, const uint8_t* w, int64_t nb, float* out) {
  constexpr int64_t bytes = fmt == kQ4_1 ? Q4_1_BYTES : Q8_0_BYTES;
  float macc[R] = {};
#ifdef LLMSERVE_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    __m256 w0, w1, w2, w3;
    float m = 0.f;
    __m256 d;
    if constexpr (fmt == kQ4_1) {
      // Widen bytes 0-7 and 8-15 straight from memory; the low nibbles are weights 0-15, the high
      // nibbles weights 16-31. d and m convert together.
      const __m256i mask = _mm256_set1_epi32(0x0F);
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 4)));
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 12)));
      w0 = _mm256_cvtepi32_ps(_mm256_and_si256(a, mask));
      w1 = _mm256_cvtepi32_ps(_mm256_and_si256(c, mask));
      w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
      w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4));
      uint32_t dm;
      std::memcpy(&dm, blk, 4);
      const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));
      d = _mm256_broadcastss_ps(dmf);
      m = _mm_cvtss_f32(_mm_movehdup_ps(dmf));
    } else {
      w0 = i8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2)));
      w1 = i8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 10)));
      w2 = i8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 18)));
      w3 = i8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 26)));
      d = _mm256_set1_ps(half_at(blk));
    }
    for (int r = 0; r < R; ++r) {
      const float* xb = xs[r] + b * QK;
      __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), w0);
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), w1, t);
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), w2, t);
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), w3, t);
      acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
      if constexpr (fmt == kQ4_1) macc[r] += m * xsum[r][b];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + macc[r];
#else
  float q[QK], acc[R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    float d, m;
    unpack_scalar(w + b * bytes, fmt, q, d, m);
    for (int r = 0; r < R; ++r) {
      const float* xb = xs[r] + b * QK;
      float s = 0.f;
      for (int j = 0; j < QK; ++j) s += q[j] * xb[j];
      acc[r] += s * d;
      if (fmt == kQ4_1) macc[r] += m * xsum[r][b];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r] + macc[r];
#endif
}

template <Format fmt>
void gemm(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t bytes = fmt == kQ4_1 ? Q4_1_BYTES : Q8_0_BYTES;
  const int64_t nb = K / QK;
  std::vector<float> sums(fmt == kQ4_1 ? M * nb : 0);
  if constexpr (fmt == kQ4_1) {
    for (int64_t i = 0; i < M * nb; ++i) {
      const float* xb = x + i * QK;
      float s = 0.f;
      for (int j = 0; j < QK; ++j) s += xb[j];
      sums[i] = s;
    }
  }
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
      const float* xs[4];
      const float* xsum[4];
      for (int r = 0; r < 4; ++r) {
        const int64_t row = m0 + std::min(r, rows - 1);
        xs[r] = x + row * K;
        xsum[r] = sums.empty() ? nullptr : sums.data() + row * nb;
      }
      for (int64_t n = begin; n < end; ++n) {
        float d[4];
        const uint8_t* wn = w + n * nb * bytes;
        switch (rows) {
          case 1: dot_rows<fmt, 1>(xs, xsum, wn, nb, d); break;
          case 2: dot_rows<fmt, 2>(xs, xsum, wn, nb, d); break;
          case 3: dot_rows<fmt, 3>(xs, xsum, wn, nb, d); break;
          default: dot_rows<fmt, 4>(xs, xsum, wn, nb, d); break;
        }
        const float b = bias ? bias[n] : 0.f;
        for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = d[r] + b;
      }
    }
  });
}

int64_t block_bytes(int64_t fmt) {
  TORCH_CHECK(fmt == kQ4_1 || fmt == kQ8_0, "unknown GGUF block format ", fmt);
  return fmt == kQ4_1 ? Q4_1_BYTES : Q8_0_BYTES;
}

}  // namespace

// x: [M, K] float32; weight: [N, K / 32 * block bytes] uint8 in the given format (0 = Q4_1,
// 1 = Q8_0); bias: [N] float32 or empty. Returns [M, N] float32.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t fmt, torch::Tensor bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const int64_t K = x.size(1), N = weight.size(0), M = x.size(0);
  TORCH_CHECK(K % QK == 0 && weight.size(1) == K / QK * block_bytes(fmt), "weight bytes do not match x");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  if (fmt == kQ4_1)
    gemm<kQ4_1>(x.data_ptr<float>(), weight.data_ptr<uint8_t>(), b, y.data_ptr<float>(), M, N, K);
  else
    gemm<kQ8_0>(x.data_ptr<float>(), weight.data_ptr<uint8_t>(), b, y.data_ptr<float>(), M, N, K);
  return y;
}

// The float32 weights [N, K] of GGUF blocks, as llama.cpp's dequantize_row_* computes them
// (q * d + m in float32). Written into `out` when it holds at least N * K floats (a scratch buffer
// reused across layers: no fresh pages to fault in per call), else into a new tensor.
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t fmt, int64_t K, torch::Tensor out) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const int64_t bytes = block_bytes(fmt), nb = K / QK, N = weight.size(0);
  TORCH_CHECK(K % QK == 0 && weight.size(1) == nb * bytes, "weight bytes do not match K");
  torch::Tensor result;
  if (out.defined() && out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() >= N * K)
    result = out.flatten().narrow(0, 0, N * K).view({N, K});
  else
    result = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* o = result.data_ptr<float>();
  at::parallel_for(0, N * nb, 256, [&](int64_t begin, int64_t end) {
    float q[QK], d, m;
    for (int64_t i = begin; i < end; ++i) {
      unpack_scalar(w + i * bytes, static_cast<Format>(fmt), q, d, m);
      for (int j = 0; j < QK; ++j) o[i * QK + j] = q[j] * d + m;
    }
  });
  return result;
}
