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
// AVX-512 (where the build's CPU has it) doubles the FMA width: panels of up to 14 rows of 16
// columns, one zmm each (8 rows for small batches, which 14-row panels would pad by a third or more).
constexpr int64_t TILE_N = 16;
#ifdef __AVX512F__
#define LLMSERVE_AVX512 1
constexpr int64_t TILE_M = 14, SMALL_TILE_M = 8, SMALL_BATCH = 40;
inline int64_t panel_rows(int64_t M) { return M < SMALL_BATCH ? SMALL_TILE_M : TILE_M; }
#else
constexpr int64_t TILE_M = 6;
inline int64_t panel_rows(int64_t) { return TILE_M; }
#endif

// x rows packed in panels of R rows: panel[k * R + r] = x[m0 + r, k] (zero past M), so the kernel's
// broadcasts read one contiguous stream (three times faster here than six strided ones). Packs
// panels [p0, p1), so the threads can share the work.
inline void pack_x(const float* x, int64_t M, int64_t K, int64_t R, int64_t p0, int64_t p1, float* packed) {
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = packed + p * K * R;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t m = p * R + r;
      for (int64_t k = 0; k < K; ++k) dst[k * R + r] = m < M ? x[m * K + k] : 0.f;
    }
  }
}

// A scratch buffer of at least n floats, kept by the calling thread for its later calls: a fresh
// vector per call is zeroed, and above malloc's mmap threshold its pages are faulted in anew.
inline float* scratch_floats(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

#ifdef LLMSERVE_AVX512
// The R x 16 outer-product kernel (R <= 14): each step of k loads the tile's 16 weights once and does
// one FMA per row with x broadcast from the panel. Every output is the same chain of FMAs over k as in
// the AVX2 kernel below, so both give the same bits. The accumulators are named for the reason below.
template <int R>
inline void kernel_panel(const float* panel, int64_t K, const float* tile, const float* bias, float* y, int64_t N,
                         int64_t n0, int64_t rows, int64_t cols) {
#define LLMSERVE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13)
#define LLMSERVE_DECLARE(r) __m512 c##r = _mm512_setzero_ps();
#define LLMSERVE_STEP(r) \
  if constexpr (r < R) c##r = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), w, c##r);
#define LLMSERVE_STORE(r) \
  if (r < rows) _mm512_mask_storeu_ps(y + r * N + n0, mask, _mm512_add_ps(c##r, b));
  LLMSERVE_ROWS(LLMSERVE_DECLARE)
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(tile + k * TILE_N);
    const float* a = panel + k * R;
    LLMSERVE_ROWS(LLMSERVE_STEP)
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  LLMSERVE_ROWS(LLMSERVE_STORE)
#undef LLMSERVE_STORE
#undef LLMSERVE_STEP
#undef LLMSERVE_DECLARE
#undef LLMSERVE_ROWS
}
#else
// The 6 x 16 outer-product kernel: y[r, n0 + j] = panel row r . tile column j (+ bias), for the
// rows and cols that exist. The 12 accumulators are named variables: held in an array, GCC also
// stored them to the stack on every step of k, which made the loop three times slower.
inline void kernel_panel(const float* panel, int64_t K, const float* tile, const float* bias, float* y, int64_t N,
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
  const __m256 acc[TILE_M][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (rows == TILE_M && cols == TILE_N) {  // a whole tile: vector adds and stores (+ 0 where no bias, as below)
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
    for (int r = 0; r < TILE_M; ++r) {
      _mm256_storeu_ps(y + r * N + n0, _mm256_add_ps(acc[r][0], b0));
      _mm256_storeu_ps(y + r * N + n0 + 8, _mm256_add_ps(acc[r][1], b1));
    }
    return;
  }
  alignas(32) float out[TILE_M][TILE_N];
  for (int r = 0; r < TILE_M; ++r) {
    _mm256_store_ps(out[r], acc[r][0]);
    _mm256_store_ps(out[r] + 8, acc[r][1]);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) y[r * N + n0 + j] = out[r][j] + (bias ? bias[n0 + j] : 0.f);
}
#endif

// y = x W^T (+ bias) over M > STREAM_MAX_ROWS rows: x packed in panels once, then each thread
// widens one 16-row tile of W at a time (widen(n0, rows, tile) fills tile[k * 16 + j]) and runs
// the panel kernel over every panel.
template <typename Widen>
void tiled_gemm_over(const float* x, const float* bias, float* y, int64_t M, int64_t N, int64_t K, Widen widen) {
  const int64_t R = panel_rows(M), tiles = (N + TILE_N - 1) / TILE_N, panels = (M + R - 1) / R;
  thread_local std::vector<float> packed_buf;
  float* packed = scratch_floats(packed_buf, panels * K * R);
  // Packing is serial work between parallel regions otherwise (a few percent of a prefill step).
  const int64_t pack_grain = std::max<int64_t>(1, (int64_t{1} << 15) / (K * R));  // small batches pack inline
  at::parallel_for(0, panels, pack_grain, [&](int64_t begin, int64_t end) { pack_x(x, M, K, R, begin, end, packed); });
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> tile_buf;
    float* tile = scratch_floats(tile_buf, K * TILE_N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * TILE_N, cols = std::min(TILE_N, N - n0);
      widen(n0, cols, tile);
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = packed + p * K * R;
        float* yp = y + p * R * N;
        const int64_t rows = std::min(R, M - p * R);
#ifdef LLMSERVE_AVX512
        if (R == SMALL_TILE_M) kernel_panel<SMALL_TILE_M>(panel, K, tile, bias, yp, N, n0, rows, cols);
        else kernel_panel<TILE_M>(panel, K, tile, bias, yp, N, n0, rows, cols);
#else
        kernel_panel(panel, K, tile, bias, yp, N, n0, rows, cols);
#endif
      }
    }
  });
}
#endif

}  // namespace llmserve::gguf
