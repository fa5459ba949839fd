// Linear layers whose weights stay in GGUF's block formats (llama.cpp's ggml layout), with
// float32 activations:
//   Q4_1: 32 weights in 20 bytes {fp16 d, fp16 m, 16 bytes of nibbles}; w = q * d + m, q in 0..15.
//         Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
//   Q8_0: 32 weights in 34 bytes {fp16 d, 32 x int8}; w = q * d.
//   Q5_0 (the decode rows only; gguf_kquant.cpp has the rest): 32 in 22 bytes; w = d * (q - 16).
// A GGUF model published in these formats computes here with the weights it was published with, at
// 5 (Q4_1) or 8.5 (Q8_0) bits a weight instead of 32. Unlike llama.cpp, activations are not
// quantized: each block is widened to float32 in registers, so the result equals a float32 matmul
// with the dequantized weights up to summation order.
// Up to 4 rows of x (decode of a few sequences) each weight row is streamed once per 4 rows; for
// Q4_1, sum_i (q_i d + m) x_i = d * sum_i q_i x_i + m * sum_i x_i, with the block sums of x computed
// once per call. Beyond 4 rows, 16-row tiles are widened once into a transposed float32 tile and a
// register-tiled kernel (6 x 16 on AVX2, up to 14 x 16 on AVX-512) runs over all rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "gguf_common.h"

namespace {
using namespace llmserve::gguf;

constexpr int64_t QK = 32;  // weights per block, both formats
constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34, Q5_0_BYTES = 22;

constexpr int64_t block_bytes(Format fmt) {
  return fmt == kQ4_1 ? Q4_1_BYTES : fmt == kQ5_0 ? Q5_0_BYTES : Q8_0_BYTES;
}

#ifdef LLMSERVE_AVX2
inline __m256 i8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
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
  } else if (fmt == kQ5_0) {  // {fp16 d, 32 fifth bits, 16 bytes of nibbles}; w = d * (q - 16)
    m = 0.f;
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const uint8_t* qs = blk + 6;
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<float>(((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
      q[j + 16] = static_cast<float>(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
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
  constexpr int64_t bytes = block_bytes(fmt);
  float macc[R] = {};
#ifdef LLMSERVE_AVX512
  // Q4_1 and Q8_0 a block in two zmm of 16 weights: Q4_1's 16 bytes widen in one instruction, their
  // low nibbles weights 0-15 and high nibbles 16-31. Even and odd blocks sum into separate
  // accumulators, so a row is two chains of FMAs rather than one as long as the row. (Q5_0 keeps the
  // AVX2 code below.)
  if constexpr (fmt != kQ5_0) {
    __m512 acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + b * bytes;
      __m512 lo, hi, d;
      float m = 0.f;
      if constexpr (fmt == kQ4_1) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)));
        lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
        hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
        uint32_t dm;
        std::memcpy(&dm, blk, 4);
        const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));
        d = _mm512_broadcastss_ps(dmf);
        m = _mm_cvtss_f32(_mm_movehdup_ps(dmf));
      } else {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
        d = _mm512_set1_ps(half_at(blk));
      }
      for (int r = 0; r < R; ++r) {
        const float* xb = xs[r] + b * QK;
        const __m512 t = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), hi, _mm512_mul_ps(_mm512_loadu_ps(xb), lo));
        acc[b & 1][r] = _mm512_fmadd_ps(t, d, acc[b & 1][r]);
        if constexpr (fmt == kQ4_1) macc[r] += m * xsum[r][b];
      }
    }
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) + macc[r];
    return;
  }
#endif
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
    } else if constexpr (fmt == kQ5_0) {
      // As Q4_1's nibbles, with weight j's fifth bit (bit j of qh) put in as bit 4, then q - 16.
      const __m256i mask = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1), sixteen = _mm256_set1_epi32(16);
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 6)));
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 14)));
      uint32_t qh;
      std::memcpy(&qh, blk + 2, 4);
      const __m256i hv = _mm256_set1_epi32(static_cast<int>(qh)), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      auto fifth = [&](int first) {  // bit 4 set for weights first..first + 7 whose qh bit is set
        const __m256i bits = _mm256_srlv_epi32(hv, _mm256_add_epi32(lane, _mm256_set1_epi32(first)));
        return _mm256_slli_epi32(_mm256_and_si256(bits, one), 4);
      };
      auto widen = [&](__m256i q) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, sixteen)); };
      w0 = widen(_mm256_or_si256(_mm256_and_si256(a, mask), fifth(0)));
      w1 = widen(_mm256_or_si256(_mm256_and_si256(c, mask), fifth(8)));
      w2 = widen(_mm256_or_si256(_mm256_srli_epi32(a, 4), fifth(16)));
      w3 = widen(_mm256_or_si256(_mm256_srli_epi32(c, 4), fifth(24)));
      d = _mm256_set1_ps(half_at(blk));
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
  for (int r = 0; r < R; ++r) out[r] = llmserve::hsum8(acc[r]) + macc[r];
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
  constexpr int64_t bytes = block_bytes(fmt);
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
  // Up to STREAM_MAX_ROWS rows share one pass over the weights: each block is widened once for all
  // of them (a verify run of 1 + k tokens then costs little more than one decode row).
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += STREAM_MAX_ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(STREAM_MAX_ROWS, M - m0));
      const float* xs[STREAM_MAX_ROWS];
      const float* xsum[STREAM_MAX_ROWS];
      for (int r = 0; r < STREAM_MAX_ROWS; ++r) {
        const int64_t row = m0 + std::min(r, rows - 1);
        xs[r] = x + row * K;
        xsum[r] = sums.empty() ? nullptr : sums.data() + row * nb;
      }
      for (int64_t n = begin; n < end; ++n) {
        float d[STREAM_MAX_ROWS];
        const uint8_t* wn = w + n * nb * bytes;
        switch (rows) {
          case 1: dot_rows<fmt, 1>(xs, xsum, wn, nb, d); break;
          case 2: dot_rows<fmt, 2>(xs, xsum, wn, nb, d); break;
          case 3: dot_rows<fmt, 3>(xs, xsum, wn, nb, d); break;
          case 4: dot_rows<fmt, 4>(xs, xsum, wn, nb, d); break;
          case 5: dot_rows<fmt, 5>(xs, xsum, wn, nb, d); break;
          case 6: dot_rows<fmt, 6>(xs, xsum, wn, nb, d); break;
          case 7: dot_rows<fmt, 7>(xs, xsum, wn, nb, d); break;
          default: dot_rows<fmt, 8>(xs, xsum, wn, nb, d); break;
        }
        const float b = bias ? bias[n] : 0.f;
        for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = d[r] + b;
      }
    }
  });
}

#ifdef LLMSERVE_AVX2
// ---- Batches of more than a few rows: widen a tile of 16 output rows once, then a register-tiled
// GEMM over all M rows of x. The widened tile is stored transposed, tile[k][16], so each step of
// k is one outer product (16 weights x up to 6 rows of x) with no horizontal sums.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// tile[k * 16 + j] = weight (n0 + j, k) for j < rows, 0 beyond. Each block's scale and offset
// convert once; its 4 chunks of 8 rows are transposed 8 x 8 in registers.
template <Format fmt>
void widen_tile(const uint8_t* w, int64_t n0, int64_t rows, int64_t nb, float* tile) {
  constexpr int64_t bytes = fmt == kQ4_1 ? Q4_1_BYTES : Q8_0_BYTES;
  for (int64_t b = 0; b < nb; ++b) {
    for (int half = 0; half < 2; ++half) {
      __m256 r[4][8];
      for (int j = 0; j < 8; ++j) {
        const int64_t row = half * 8 + j;
        if (row >= rows) {
          for (int c = 0; c < 4; ++c) r[c][j] = _mm256_setzero_ps();
          continue;
        }
        const uint8_t* blk = w + ((n0 + row) * nb + b) * bytes;
        const __m256 d = _mm256_set1_ps(half_at(blk));
        if constexpr (fmt == kQ4_1) {
          const __m256 m = _mm256_set1_ps(half_at(blk + 2));
          const __m256i mask = _mm256_set1_epi32(0x0F);
          const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 4)));
          const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 12)));
          // q * d is exact, so the fused multiply-add rounds once, as the dequantizer does.
          r[0][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, mask)), d, m);
          r[1][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, mask)), d, m);
          r[2][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), d, m);
          r[3][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), d, m);
        } else {
          for (int c = 0; c < 4; ++c)
            r[c][j] = _mm256_mul_ps(i8_to_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + c * 8))), d);
        }
      }
      for (int c = 0; c < 4; ++c) {
        transpose8(r[c]);
        float* dst = tile + (b * QK + c * 8) * TILE_N + half * 8;
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * TILE_N, r[c][i]);
      }
    }
  }
}

#endif

Geometry checked_geometry(int64_t fmt) {
  TORCH_CHECK(known_format(fmt), "unknown GGUF block format ", fmt);
  return geometry(fmt);
}

}  // namespace

// x: [M, K] float32; weight: [N, K / block weights * block bytes] uint8 in the given format (0 = Q4_1,
// 1 = Q8_0, 2 = Q5_0, 3 = Q4_K, 4 = Q5_K, 5 = Q6_K); bias: [N] float32 or empty. Returns [M, N] float32.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t fmt, torch::Tensor bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const int64_t K = x.size(1), N = weight.size(0), M = x.size(0);
  const Geometry g = checked_geometry(fmt);
  TORCH_CHECK(K % g.weights == 0 && weight.size(1) == K / g.weights * g.bytes, "weight bytes do not match x");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "bias must be empty or [N] float32");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (M == 0 || N == 0) return y;
  if (fmt == kQ5_0 && M <= STREAM_MAX_ROWS) {  // decode rows: widened in registers like Q4_1/Q8_0
    gemm<kQ5_0>(xp, wp, b, yp, M, N, K);
    return y;
  }
  if (fmt >= kQ5_0) {
    kquant_linear(xp, wp, static_cast<Format>(fmt), b, yp, M, N, K);
    return y;
  }
#ifdef LLMSERVE_AVX2
  if (M > STREAM_MAX_ROWS) {
    const int64_t nb = K / QK;
    if (fmt == kQ4_1)
      tiled_gemm_over(xp, b, yp, M, N, K, [&](int64_t n0, int64_t rows, float* tile) {
        widen_tile<kQ4_1>(wp, n0, rows, nb, tile);
      });
    else
      tiled_gemm_over(xp, b, yp, M, N, K, [&](int64_t n0, int64_t rows, float* tile) {
        widen_tile<kQ8_0>(wp, n0, rows, nb, tile);
      });
    return y;
  }
#endif
  if (fmt == kQ4_1) gemm<kQ4_1>(xp, wp, b, yp, M, N, K);
  else gemm<kQ8_0>(xp, wp, b, yp, M, N, K);
  return y;
}

// The float32 weights [N, K] of GGUF blocks, as llama.cpp's dequantize_row_* computes them
// (q * d + m in float32; q * d is exact, so this rounds once).
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t fmt, int64_t K) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const Geometry g = checked_geometry(fmt);
  const int64_t bytes = g.bytes, nb = K / g.weights, N = weight.size(0);
  TORCH_CHECK(K % g.weights == 0 && weight.size(1) == nb * bytes, "weight bytes do not match K");
  auto out = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  if (fmt >= kQ5_0) {
    kquant_dequantize(w, static_cast<Format>(fmt), N * nb, o);
    return out;
  }
  at::parallel_for(0, N * nb, 256, [&](int64_t begin, int64_t end) {
    float q[QK], d, m;
    for (int64_t i = begin; i < end; ++i) {
      unpack_scalar(w + i * bytes, static_cast<Format>(fmt), q, d, m);
      for (int j = 0; j < QK; ++j) o[i * QK + j] = q[j] * d + m;
    }
  });
  return out;
}

// gguf_dequantize through the portable (non-vector) code of the K-quant formats, which a build
// with AVX2 never runs otherwise: tests compare both with ggml.
torch::Tensor gguf_dequantize_portable(torch::Tensor weight, int64_t fmt, int64_t K) {
  TORCH_CHECK(fmt >= kQ5_0 && known_format(fmt), "the portable dequantizer covers Q5_0, Q4_K, Q5_K and Q6_K");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const Geometry g = geometry(fmt);
  TORCH_CHECK(K % g.weights == 0 && weight.size(1) == K / g.weights * g.bytes, "weight bytes do not match K");
  auto out = torch::empty({weight.size(0), K}, torch::kFloat32);
  kquant_dequantize(weight.data_ptr<uint8_t>(), static_cast<Format>(fmt), weight.size(0) * (K / g.weights),
                    out.data_ptr<float>(), true);
  return out;
}
