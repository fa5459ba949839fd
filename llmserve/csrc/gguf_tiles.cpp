// Exact (float32) GGUF Q4_1 and Q8_0 linear layers over the tiles gguf_q8_pack makes of their blocks
// (gguf_q8act.cpp has the layout): the same weights in the same bytes (Q8_0's 1.06x), 16 output
// columns to a tile, 4 consecutive weights of a column in each 32-bit lane. The register-tiled GEMM
// reads a widened tile as tile[k][16] floats; from this layout each k of 8 columns is one shift,
// mask (or sign extension), convert and FMA, where GGUF's row-major blocks need an 8 x 8 transpose
// for every 8 rows x 8 weights (gguf_gemm.cpp's widen_tile).
//
// Every output is one FMA chain over k in order, starting from x[0] * w[0], then + bias (+ 0 without
// one): the chain of the register-tiled kernel, which the few-row kernel below repeats with the
// weights widened in registers. So a row's result does not depend on how many rows share its call.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "gguf_common.h"
#include "kernels.h"

namespace {

using namespace llmserve::gguf;

constexpr int64_t QK = 32;         // weights a block
constexpr int64_t kTileCols = 16;  // output columns a tile (gguf_q8_pack's TILE_N)

// A tile block (32 weights of 16 columns): the weights (Q4_1: 4 x 16 dwords of nibble bytes, byte i
// of dword [p][n] holding weights 4p + i (low nibble) and 16 + 4p + i (high); Q8_0: 8 x 16 dwords,
// byte i of dword [g][n] weight 4g + i as int8), then d_w [16] fp16, then Q4_1's m_w [16] fp16
// (Q8_0's 16 int16 there are for the q8 kernels).
constexpr int64_t tile_weight_bytes(Format f) { return f == kQ4_1 ? 4 * kTileCols * 4 : 8 * kTileCols * 4; }
constexpr int64_t tile_block_bytes(Format f) { return tile_weight_bytes(f) + 2 * kTileCols * 2; }

// Weight j (0..31) of column n of a tile block, and its scale and offset.
template <Format F>
inline int tile_weight(const uint8_t* tb, int64_t n, int j) {
  if constexpr (F == kQ4_1) {
    const uint8_t byte = tb[(((j % 16) / 4) * kTileCols + n) * 4 + j % 4];
    return j < 16 ? byte & 0x0F : byte >> 4;
  } else {
    return static_cast<int8_t>(tb[((j / 4) * kTileCols + n) * 4 + j % 4]);
  }
}
template <Format F>
inline float tile_scale(const uint8_t* tb, int64_t n) { return half_at(tb + tile_weight_bytes(F) + 2 * n); }
template <Format F>
inline float tile_offset(const uint8_t* tb, int64_t n) {
  return F == kQ4_1 ? half_at(tb + tile_weight_bytes(F) + 2 * (kTileCols + n)) : 0.f;
}

#ifdef LLMSERVE_AVX2
static_assert(kTileCols == TILE_N, "a widened tile is one register-tiled GEMM tile wide");

// A block's scales (and Q4_1's offsets) for columns 0..7 and 8..15.
template <Format F>
inline void block_scales(const uint8_t* tb, __m256* d, __m256* m) {
  const uint8_t* s = tb + tile_weight_bytes(F);
  for (int h = 0; h < 2; ++h) {
    d[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * h)));
    m[h] = F == kQ4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32 + 16 * h)))
                      : _mm256_setzero_ps();
  }
}

// Weight k (0..31, a constant once unrolled) of columns 8h..8h+7 as float32, as the dequantizers
// compute it: q * d + m rounded once (q * d is exact), Q8_0's q * d.
template <Format F>
inline __m256 widen8(const uint8_t* tb, int k, int h, __m256 d, __m256 m) {
  if constexpr (F == kQ4_1) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + (((k % 16) / 4) * kTileCols + 8 * h) * 4));
    const __m256i q = _mm256_and_si256(_mm256_srli_epi32(w, 8 * (k % 4) + (k < 16 ? 0 : 4)), _mm256_set1_epi32(0x0F));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m);
  } else {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + ((k / 4) * kTileCols + 8 * h) * 4));
    const __m256i q = _mm256_srai_epi32(_mm256_slli_epi32(w, 24 - 8 * (k % 4)), 24);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
  }
}

// One tile's nb blocks widened into tile[k * 16 + j] (the register-tiled GEMM's input).
template <Format F>
void widen_tiles(const uint8_t* t, int64_t nb, float* tile) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * tile_block_bytes(F);
    __m256 d[2], m[2];
    block_scales<F>(tb, d, m);
    float* o = tile + b * QK * kTileCols;
#pragma GCC unroll 32
    for (int k = 0; k < QK; ++k) {
      _mm256_storeu_ps(o + k * kTileCols, widen8<F>(tb, k, 0, d[0], m[0]));
      _mm256_storeu_ps(o + k * kTileCols + 8, widen8<F>(tb, k, 1, d[1], m[1]));
    }
  }
}

// Rows [0, R) of x (R <= 4, row stride K) against one tile: the weights widened in registers, one k
// at a time, so nothing is stored between widening and use. y[r, n0 + j] for j < cols. The
// accumulators are named variables, as in kernel_panel, so they stay in registers.
template <Format F, int R>
void few_rows_tile(const float* x, int64_t K, const uint8_t* t, int64_t nb, const float* bias, float* y, int64_t N,
                   int64_t n0, int64_t cols) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = t + b * tile_block_bytes(F);
    __m256 d[2], m[2];
    block_scales<F>(tb, d, m);
    const float* xb = x + b * QK;
#pragma GCC unroll 32
    for (int k = 0; k < QK; ++k) {
      const __m256 w0 = widen8<F>(tb, k, 0, d[0], m[0]), w1 = widen8<F>(tb, k, 1, d[1], m[1]);
      __m256 xv = _mm256_broadcast_ss(xb + k);
      c00 = _mm256_fmadd_ps(xv, w0, c00);
      c01 = _mm256_fmadd_ps(xv, w1, c01);
      if constexpr (R > 1) {
        xv = _mm256_broadcast_ss(xb + K + k);
        c10 = _mm256_fmadd_ps(xv, w0, c10);
        c11 = _mm256_fmadd_ps(xv, w1, c11);
      }
      if constexpr (R > 2) {
        xv = _mm256_broadcast_ss(xb + 2 * K + k);
        c20 = _mm256_fmadd_ps(xv, w0, c20);
        c21 = _mm256_fmadd_ps(xv, w1, c21);
      }
      if constexpr (R > 3) {
        xv = _mm256_broadcast_ss(xb + 3 * K + k);
        c30 = _mm256_fmadd_ps(xv, w0, c30);
        c31 = _mm256_fmadd_ps(xv, w1, c31);
      }
    }
  }
  const __m256 acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  if (cols == kTileCols) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(y + r * N + n0, _mm256_add_ps(acc[r][0], b0));
      _mm256_storeu_ps(y + r * N + n0 + 8, _mm256_add_ps(acc[r][1], b1));
    }
    return;
  }
  alignas(32) float out[kTileCols];
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    for (int64_t j = 0; j < cols; ++j) y[r * N + n0 + j] = out[j] + (bias ? bias[n0 + j] : 0.f);
  }
}

template <Format F>
void few_rows(const float* x, const uint8_t* t, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t nb = K / QK, tiles = (N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const uint8_t* tile = t + ti * nb * tile_block_bytes(F);
      const int64_t n0 = ti * kTileCols, cols = std::min(kTileCols, N - n0);
      for (int64_t r0 = 0; r0 < M; r0 += 4) {
        const float* xr = x + r0 * K;
        float* yr = y + r0 * N;
        switch (std::min<int64_t>(4, M - r0)) {
          case 1: few_rows_tile<F, 1>(xr, K, tile, nb, bias, yr, N, n0, cols); break;
          case 2: few_rows_tile<F, 2>(xr, K, tile, nb, bias, yr, N, n0, cols); break;
          case 3: few_rows_tile<F, 3>(xr, K, tile, nb, bias, yr, N, n0, cols); break;
          default: few_rows_tile<F, 4>(xr, K, tile, nb, bias, yr, N, n0, cols); break;
        }
      }
    }
  });
}

template <Format F>
void linear_tiles(const float* x, const uint8_t* t, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= STREAM_MAX_ROWS) return few_rows<F>(x, t, bias, y, M, N, K);
  const int64_t nb = K / QK;
  tiled_gemm_over(x, bias, y, M, N, K, [&](int64_t n0, int64_t, float* tile) {
    widen_tiles<F>(t + (n0 / kTileCols) * nb * tile_block_bytes(F), nb, tile);
  });
}

#else
// Portable: each tile widened into a buffer, then every output as the same chain over k.
template <Format F>
void linear_tiles(const float* x, const uint8_t* t, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t nb = K / QK, tiles = (N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K * kTileCols);
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t n0 = ti * kTileCols, cols = std::min(kTileCols, N - n0);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = t + (ti * nb + b) * tile_block_bytes(F);
        for (int64_t n = 0; n < cols; ++n) {
          const float d = tile_scale<F>(tb, n), m = tile_offset<F>(tb, n);
          for (int j = 0; j < QK; ++j) w[(b * QK + j) * kTileCols + n] = static_cast<float>(tile_weight<F>(tb, n, j)) * d + m;
        }
      }
      for (int64_t r = 0; r < M; ++r)
        for (int64_t n = 0; n < cols; ++n) {
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * w[k * kTileCols + n];
          y[r * N + n0 + n] = s + (bias ? bias[n0 + n] : 0.f);
        }
    }
  });
}
#endif

}  // namespace

// x: [M, K] float32; tiles: gguf_q8_pack's tiles of Q4_1 (fmt 0) or Q8_0 (1) blocks of N outputs;
// bias: [N] float32 or empty. Returns x W^T (+ bias), [M, N] float32, with W the blocks' float weights.
torch::Tensor gguf_linear_tiles(torch::Tensor x, torch::Tensor tiles, int64_t fmt, int64_t N, torch::Tensor bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(fmt == kQ4_1 || fmt == kQ8_0, "exact tiles hold Q4_1 (0) or Q8_0 (1) weights, not format ", fmt);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0, "x's width must be a multiple of ", QK);
  const int64_t TB = tile_block_bytes(static_cast<Format>(fmt));
  TORCH_CHECK(N > 0 && tiles.device().is_cpu() && tiles.scalar_type() == torch::kUInt8 && tiles.is_contiguous() &&
                  tiles.dim() == 2 && tiles.size(0) == (N + kTileCols - 1) / kTileCols && tiles.size(1) == K / QK * TB,
              "the tiles do not hold ", N, " outputs of ", K, " inputs in format ", fmt);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "bias must be empty or [N] float32");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  if (fmt == kQ4_1) linear_tiles<kQ4_1>(x.data_ptr<float>(), t, b, y.data_ptr<float>(), M, N, K);
  else linear_tiles<kQ8_0>(x.data_ptr<float>(), t, b, y.data_ptr<float>(), M, N, K);
  return y;
}
