// The GGUF formats of the Q4_K_M / Q5_K_M files people download, kept as blocks, with float32
// activations (ggml's layouts):
//   Q5_0 (32 weights in 22 bytes): {fp16 d, 32 high bits, 16 bytes of nibbles}; w = d * (q - 16).
//   Q4_K (256 in 144): {fp16 d, fp16 dmin, 12 bytes packing 8 six-bit scales and mins, 128 bytes of
//        nibbles}; sub-block j of 32: w = (d * sc_j) * q - dmin * m_j.
//   Q5_K (256 in 176): Q4_K's header, 32 bytes of fifth bits, 128 bytes of nibbles.
//   Q6_K (256 in 210): {128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d};
//        sub-block j of 16: w = (d * sc_j) * (q - 32).
// Every product of a scale and a quant is exact in float32 (at most 22 significant bits), so a
// block comes out bit for bit as ggml (and gguf-py) dequantize it, and a layer equals a float32
// matmul with those weights up to summation order.
//
// A block is dequantized to float32 (AVX2 where the build has it for Q5_0, Q4_K and Q6_K, the
// formats of Q4_K_M files; portable loops otherwise, which tests check too). Up to 4 rows of x, each
// weight row is dequantized block by block into a small buffer and dotted with every row (decode);
// beyond that, tiles of 16 weight rows are dequantized once into the transposed tile of
// gguf_common.h's panel kernel, which then runs over all rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gguf_common.h"

namespace llmserve::gguf {
namespace {

constexpr int64_t QK_K = 256;

void dequant_q5_0(const uint8_t* b, float* y) {
  const float d = half_at(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int x0 = ((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
    const int x1 = ((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
    y[j] = static_cast<float>(x0) * d;
    y[j + 16] = static_cast<float>(x1) * d;
  }
}

// Six-bit scale and min of sub-block j of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
inline void scale_min(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K when qh is null, Q5_K otherwise (the fifth bit of sub-block pair i sits at bits 2i, 2i+1).
void dequant_k45(const uint8_t* b, const uint8_t* qh, const uint8_t* ql, float* y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* scales = b + 4;
  for (int i = 0; i < 4; ++i, ql += 32, y += 64) {
    int sc, m;
    scale_min(2 * i, scales, sc, m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    scale_min(2 * i + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    uint8_t lo[32], hi[32];
    for (int l = 0; l < 32; ++l) {
      lo[l] = ql[l] & 0x0F;
      hi[l] = ql[l] >> 4;
    }
    if (qh != nullptr) {
      for (int l = 0; l < 32; ++l) {
        lo[l] |= ((qh[l] >> (2 * i)) & 1) << 4;
        hi[l] |= ((qh[l] >> (2 * i + 1)) & 1) << 4;
      }
    }
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(lo[l]) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>(hi[l]) - m2;
  }
}

void dequant_q4_k(const uint8_t* b, float* y) { dequant_k45(b, nullptr, b + 16, y); }
void dequant_q5_k(const uint8_t* b, float* y) { dequant_k45(b, b + 16, b + 48, y); }

void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
    int8_t q[4][32];
    for (int l = 0; l < 32; ++l) {
      q[0][l] = static_cast<int8_t>((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
      q[1][l] = static_cast<int8_t>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      q[2][l] = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      q[3][l] = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
    }
    for (int part = 0; part < 4; ++part)
      for (int s = 0; s < 2; ++s) {  // two sub-blocks of 16 per part of 32
        const float ds = d * static_cast<float>(sc[2 * part + s]);
        for (int l = 0; l < 16; ++l) y[32 * part + 16 * s + l] = ds * static_cast<float>(q[part][16 * s + l]);
      }
  }
}

#ifdef LLMSERVE_AVX2
// The same blocks, eight weights a step. Scale times quant is exact, so the fused forms below round
// once, exactly where the scalar forms do.
inline __m256 u8x8(const uint8_t* p) {  // 8 bytes as 8 int32 lanes
  return _mm256_castsi256_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256i lanes(__m256 v) { return _mm256_castps_si256(v); }

void dequant_q5_0_avx2(const uint8_t* b, float* y) {
  const __m256 d = _mm256_set1_ps(half_at(b));
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const __m256i bits = _mm256_set1_epi32(static_cast<int>(qh)), nib = _mm256_set1_epi32(0x0F);
  const __m256i one = _mm256_set1_epi32(1), sixteen = _mm256_set1_epi32(16);
  for (int c = 0; c < 2; ++c) {
    const __m256i v = lanes(u8x8(b + 6 + 8 * c));
    const __m256i j = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * c));
    const __m256i h0 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(bits, j), one), 4);
    const __m256i h1 = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_add_epi32(j, sixteen)), one), 4);
    const __m256i q0 = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(v, nib), h0), sixteen);
    const __m256i q1 = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(v, 4), h1), sixteen);
    _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(q0), d));
    _mm256_storeu_ps(y + 16 + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(q1), d));
  }
}

void dequant_q4_k_avx2(const uint8_t* b, float* y) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const __m256i nib = _mm256_set1_epi32(0x0F);
  for (int i = 0; i < 4; ++i, y += 64) {
    int sc, m;
    scale_min(2 * i, b + 4, sc, m);
    const __m256 d1 = _mm256_set1_ps(d * static_cast<float>(sc)), m1 = _mm256_set1_ps(dmin * static_cast<float>(m));
    scale_min(2 * i + 1, b + 4, sc, m);
    const __m256 d2 = _mm256_set1_ps(d * static_cast<float>(sc)), m2 = _mm256_set1_ps(dmin * static_cast<float>(m));
    const uint8_t* q = b + 16 + 32 * i;
    for (int c = 0; c < 4; ++c) {
      const __m256i v = lanes(u8x8(q + 8 * c));
      _mm256_storeu_ps(y + 8 * c, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nib)), d1, m1));
      _mm256_storeu_ps(y + 32 + 8 * c, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d2, m2));
    }
  }
}

void dequant_q6_k_avx2(const uint8_t* b, float* y) {
  const float d = half_at(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const __m256i nib = _mm256_set1_epi32(0x0F), two = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
  for (int half = 0; half < 2; ++half, y += 128, sc += 8) {
    const uint8_t* ql = b + 64 * half;
    const uint8_t* qh = b + 128 + 32 * half;
    for (int c = 0; c < 4; ++c) {  // weights l = 8c .. 8c + 7 of each quarter
      const int is = c / 2;
      const __m256i lo = lanes(u8x8(ql + 8 * c)), hi = lanes(u8x8(ql + 32 + 8 * c)), h = lanes(u8x8(qh + 8 * c));
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(lo, nib), _mm256_slli_epi32(_mm256_and_si256(h, two), 4)),
          _mm256_or_si256(_mm256_and_si256(hi, nib), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2), two), 4)),
          _mm256_or_si256(_mm256_srli_epi32(lo, 4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 4), two), 4)),
          _mm256_or_si256(_mm256_srli_epi32(hi, 4), _mm256_slli_epi32(_mm256_srli_epi32(h, 6), 4))};
      for (int part = 0; part < 4; ++part) {
        const __m256 ds = _mm256_set1_ps(d * static_cast<float>(sc[is + 2 * part]));
        _mm256_storeu_ps(y + 32 * part + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[part], bias)), ds));
      }
    }
  }
}
#endif

using Dequant = void (*)(const uint8_t*, float*);

Dequant portable_dequant_for(Format fmt) {
  switch (fmt) {
    case kQ5_0: return dequant_q5_0;
    case kQ4_K: return dequant_q4_k;
    case kQ6_K: return dequant_q6_k;
    default: return dequant_q5_k;
  }
}

Dequant dequant_for(Format fmt) {
  switch (fmt) {
#ifdef LLMSERVE_AVX2
    case kQ5_0: return dequant_q5_0_avx2;
    case kQ4_K: return dequant_q4_k_avx2;
    case kQ6_K: return dequant_q6_k_avx2;
#else
    case kQ5_0: return dequant_q5_0;
    case kQ4_K: return dequant_q4_k;
    case kQ6_K: return dequant_q6_k;
#endif
    default: return dequant_q5_k;
  }
}

// Dot products of R rows of x with one weight row (nb blocks of W weights), buf: W floats.
template <int R>
void stream_row(const float* const* xs, const uint8_t* w, int64_t nb, Geometry g, Dequant dq, float* buf,
                float* out) {
#ifdef LLMSERVE_AVX2
  // A row's sum is split over A accumulators: one chain of dependent FMAs would wait on each.
  constexpr int A = R <= 2 ? 4 : 2;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    dq(w + b * g.bytes, buf);
    for (int r = 0; r < R; ++r) {
      const float* xb = xs[r] + b * g.weights;
      for (int64_t i = 0; i < g.weights; i += 8 * A)
        for (int a = 0; a < A; ++a)
          acc[r][a] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i + 8 * a), _mm256_loadu_ps(buf + i + 8 * a), acc[r][a]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int a = 1; a < A; ++a) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
    out[r] = llmserve::hsum8(acc[r][0]);
  }
#else
  float acc[R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    dq(w + b * g.bytes, buf);
    for (int r = 0; r < R; ++r) {
      const float* xb = xs[r] + b * g.weights;
      for (int64_t i = 0; i < g.weights; ++i) acc[r] += xb[i] * buf[i];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
#endif
}

void stream_gemm(const float* x, const uint8_t* w, Format fmt, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  const Geometry g = geometry(fmt);
  const int64_t nb = K / g.weights;
  const Dequant dq = dequant_for(fmt);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    alignas(32) float buf[QK_K];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
      const float* xs[4];
      for (int r = 0; r < 4; ++r) xs[r] = x + (m0 + std::min(r, rows - 1)) * K;
      for (int64_t n = begin; n < end; ++n) {
        float d[4];
        const uint8_t* wn = w + n * nb * g.bytes;
        switch (rows) {
          case 1: stream_row<1>(xs, wn, nb, g, dq, buf, d); break;
          case 2: stream_row<2>(xs, wn, nb, g, dq, buf, d); break;
          case 3: stream_row<3>(xs, wn, nb, g, dq, buf, d); break;
          default: stream_row<4>(xs, wn, nb, g, dq, buf, d); break;
        }
        const float b = bias ? bias[n] : 0.f;
        for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = d[r] + b;
      }
    }
  });
}

#ifdef LLMSERVE_AVX2
// tile[k * 16 + j] = weight (n0 + j, k) for j < rows, 0 beyond.
void widen_tile(const uint8_t* w, Geometry g, Dequant dq, int64_t n0, int64_t rows, int64_t K, float* tile) {
  const int64_t nb = K / g.weights;
  alignas(32) float buf[QK_K];
  for (int64_t j = 0; j < TILE_N; ++j) {
    if (j >= rows) {
      for (int64_t k = 0; k < K; ++k) tile[k * TILE_N + j] = 0.f;
      continue;
    }
    const uint8_t* row = w + (n0 + j) * nb * g.bytes;
    for (int64_t b = 0; b < nb; ++b) {
      dq(row + b * g.bytes, buf);
      float* dst = tile + b * g.weights * TILE_N + j;
      for (int64_t i = 0; i < g.weights; ++i) dst[i * TILE_N] = buf[i];
    }
  }
}

#endif

}  // namespace

void kquant_linear(const float* x, const uint8_t* w, Format fmt, const float* bias, float* y, int64_t M, int64_t N,
                   int64_t K) {
#ifdef LLMSERVE_AVX2
  if (M > STREAM_MAX_ROWS) {
    const Geometry g = geometry(fmt);
    const Dequant dq = dequant_for(fmt);
    return tiled_gemm_over(x, bias, y, M, N, K, [&](int64_t n0, int64_t rows, float* tile) {
      widen_tile(w, g, dq, n0, rows, K, tile);
    });
  }
#endif
  stream_gemm(x, w, fmt, bias, y, M, N, K);
}

void kquant_dequantize(const uint8_t* w, Format fmt, int64_t blocks, float* out, bool portable) {
  const Geometry g = geometry(fmt);
  const Dequant dq = portable ? portable_dequant_for(fmt) : dequant_for(fmt);
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dq(w + i * g.bytes, out + i * g.weights);
  });
}

}  // namespace llmserve::gguf
