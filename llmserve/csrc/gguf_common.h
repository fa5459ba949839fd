// What the GGUF linear kernels share: the block formats (ggml's layouts), fp16 scale reads, and the
// register-tiled float32 GEMM that runs once weights are widened into a transposed tile.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLMSERVE_AVX2 1
#endif

namespace llmserve::gguf {

// The fmt argument of the kernels (gguf_quant.py's _KERNEL_FORMAT).
enum Format : int64_t { kQ4_1 = 0, kQ8_0 = 1, kQ5_0 = 2, kQ4_K = 3, kQ5_K = 4, kQ6_K = 5 };

struct Geometry {
  int64_t weights, bytes;  // per block
};

inline bool known_format(int64_t fmt) { return fmt >= kQ4_1 && fmt <= kQ6_K; }

inline Geometry geometry(int64_t fmt) {
  static constexpr Geometry table[] = {{32, 20}, {32, 34}, {32, 22}, {256, 144}, {256, 176}, {256, 210}};
  return table[fmt];
}

// Up to this many rows of x, stream each weight row once per 4 rows (no widened copy); beyond it,
// widen 16-row tiles and run the register-tiled GEMM. Widening costs the same for 5 rows as for 500:
// measured on the embedded model's layers, streaming two groups of 4 still beats it at 8 rows (a
// verify step of one request with 4-7 drafts), and loses from about 12.
constexpr int64_t STREAM_MAX_ROWS = 8;

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef LLMSERVE_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// gguf_kquant.cpp: y = x W^T (+ bias) for W in Q5_0, Q4_K, Q5_K or Q6_K blocks; and their float32
// dequantization, `blocks` blocks in a row.
void kquant_linear(const float* x, const uint8_t* w, Format fmt, const float* bias, float* y, int64_t M, int64_t N,
                   int64_t K);
void kquant_dequantize(const uint8_t* w, Format fmt, int64_t blocks, float* out, bool portable = false);

#ifdef LLMSERVE_AVX2
// ---- Batches of more than a few rows: a tile of 16 output rows is widened once, stored
// transposed, tile[k][16], so each step of k is one outer product (16 weights x up to 6 rows of x)
// with no horizontal sums.
constexpr int64_t TILE_N = 16, TILE_M = 6;

// x rows packed in panels of 6: panel[k * 6 + r] = x[m0 + r, k] (zero past M), so the kernel's
// broadcasts read one contiguous stream (three times faster here than six strided ones).
inline void pack_x(const float* x, int64_t M, int64_t K, float* packed) {
  const int64_t panels = (M + TILE_M - 1) / TILE_M;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * K * TILE_M;
    for (int64_t r = 0; r < TILE_M; ++r) {
      const int64_t m = p * TILE_M + r;
      for (int64_t k = 0; k < K; ++k) dst[k * TILE_M + r] = m < M ? x[m * K + k] : 0.f;
    }
  }
}

// The 6 x 16 outer-product kernel: y[r, n0 + j] = panel row r . tile column j (+ bias), for the
// rows and cols that exist. The 12 accumulators are named variables: held in an array, GCC also
// stored them to the stack on every step of k, which made the loop three times slower.
inline void kernel_6x16(const float* panel, int64_t K, const float* tile, const float* bias, float* y, int64_t N,
                        int64_t n0, int64_t rows, int64_t cols) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(tile + k * TILE_N), w1 = _mm256_loadu_ps(tile + k * TILE_N + 8);
    const float* a = panel + k * TILE_M;
    __m256 xv = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(xv, w0, c00);
    c01 = _mm256_fmadd_ps(xv, w1, c01);
    xv = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(xv, w0, c10);
    c11 = _mm256_fmadd_ps(xv, w1, c11);
    xv = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(xv, w0, c20);
    c21 = _mm256_fmadd_ps(xv, w1, c21);
    xv = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(xv, w0, c30);
    c31 = _mm256_fmadd_ps(xv, w1, c31);
    xv = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(xv, w0, c40);
    c41 = _mm256_fmadd_ps(xv, w1, c41);
    xv = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(xv, w0, c50);
    c51 = _mm256_fmadd_ps(xv, w1, c51);
  }
  alignas(32) float out[TILE_M][TILE_N];
  const __m256 acc[TILE_M][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < TILE_M; ++r) {
    _mm256_store_ps(out[r], acc[r][0]);
    _mm256_store_ps(out[r] + 8, acc[r][1]);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) y[r * N + n0 + j] = out[r][j] + (bias ? bias[n0 + j] : 0.f);
}

// y = x W^T (+ bias) over M > STREAM_MAX_ROWS rows: x packed in panels once, then each thread
// widens one 16-row tile of W at a time (widen(n0, rows, tile) fills tile[k * 16 + j]) and runs
// the 6 x 16 kernel over every panel.
template <typename Widen>
void tiled_gemm_over(const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K, Widen widen) {
  const int64_t tiles = (N + TILE_N - 1) / TILE_N, panels = (M + TILE_M - 1) / TILE_M;
  std::vector<float> packed(panels * K * TILE_M);
  pack_x(x, M, K, packed.data());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(K * TILE_N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * TILE_N, cols = std::min(TILE_N, N - n0);
      widen(n0, cols, tile.data());
      for (int64_t p = 0; p < panels; ++p)
        kernel_6x16(packed.data() + p * K * TILE_M, K, tile.data(), bias, y + p * TILE_M * N, N, n0,
                    std::min(TILE_M, M - p * TILE_M), cols);
    }
  });
}
#endif

}  // namespace llmserve::gguf
