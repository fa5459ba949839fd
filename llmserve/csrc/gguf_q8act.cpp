// GGUF Q4_1/Q8_0 linear layers with 8-bit activations (opt-in: --activations q8), computed the way
// llama.cpp computes them: each row of x is quantized per block of 32 values to int8 with one float
// scale d = max|x| / 127 (the Q8_0 format; for Q4_1 weights also s = d * sum(q), as in Q8_1), and
// every block's dot product is an integer one:
//   Q4_1 x Q8_1: d_w * d_x * sum(q_w * q_x) + m_w * s_x      (q_w in 0..15)
//   Q8_0 x Q8_0: d_w * d_x * sum(q_w * q_x)                   (q_w in -128..127)
//   Q5_0 x Q8_1: d_w * d_x * sum(q_w * q_x) - 16 d_w * s_x    (q_w in 0..31: Q4_1's form, m_w = -16 d_w)
//   Q4_1F x Q8_1: Q4_1 with float32 d and m: Q4_K's sub-blocks of 32, d * scale and -dmin * min
//     multiplied out at load (exactly as ggml dequantizes them), so Q4_K runs Q4_1's kernels
// This is lossy (x is rounded to 8 bits) where gguf_gemm.cpp is exact, and cheaper: 32 products are
// one or two integer instructions instead of four float FMAs plus the widening of the weights.
//
// Kernels: up to 4 rows of x (decode), each weight row is streamed once and dotted with every row
// of x; beyond 4 rows, tiles of 16 weight rows are repacked once so that each 32-bit lane holds 4
// consecutive weights of one output column, and a register-tiled kernel multiplies them by 4 bytes
// of x broadcast from a packed panel of x rows (no horizontal sums; the per-block scales are applied
// to whole vectors of columns).
//
// Instruction sets are chosen at run time (never assumed from the build flags, so a portable build
// still gets them): AVX-512 VNNI (vpdpbusd), else AVX2 (vpmaddubsw + vpmaddwd), else scalar. Both
// multiply unsigned by signed bytes, so Q8_0's signed weights are handled by moving the sign onto x
// (|w| times sign(w) * x), except in the VNNI tiles, which add 128 to x (unsigned) and subtract
// 128 * sum(q_w), precomputed per block and column. A `path` argument forces a path (tests run
// every path this CPU has).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define Q8_X86 1
// Every function that uses an intrinsic carries the target it needs, so this file compiles the same
// with or without -march=native and the dispatcher decides what runs.
#define Q8_AVX2 __attribute__((target("avx2,fma,f16c")))
#define Q8_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

namespace {

constexpr int64_t QK = 32;
constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34, Q5_0_BYTES = 22, Q4_1F_BYTES = 24;
constexpr int64_t STREAM_MAX_ROWS = 4;
constexpr int64_t TILE_N = 16;                 // columns of a repacked weight tile
constexpr int64_t TILE_BLOCK_BYTES = QK * TILE_N;  // one block of a tile: 8 groups x 16 columns x 4 bytes
constexpr int VNNI_ROWS = 8, AVX2_ROWS = 6;    // rows of x per panel (register budget of each ISA)
enum Format : int64_t { kQ4_1 = 0, kQ8_0 = 1, kQ5_0 = 2, kQ4_1F = 3 };

constexpr int64_t block_bytes(Format fmt) {
  return fmt == kQ4_1 ? Q4_1_BYTES : fmt == kQ5_0 ? Q5_0_BYTES : fmt == kQ4_1F ? Q4_1F_BYTES : Q8_0_BYTES;
}
// Q4_1's nibbles (0..15): the 16-bit sums of the AVX2 tiles hold a whole block.
constexpr bool nibbles(Format fmt) { return fmt == kQ4_1 || fmt == kQ4_1F; }
enum Path : int64_t { kAuto = -1, kScalar = 0, kAvx2 = 1, kVnni = 2 };

inline float half_bits_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ---- run-time dispatch ----

bool cpu_has_avx2() {
#ifdef Q8_X86
  static const bool has = [] {
    __builtin_cpu_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    // F16C converts the fp16 scales; every AVX2 CPU has it, but it is a separate CPUID bit.
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#ifdef Q8_X86
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

std::vector<int64_t> available_paths() {
  std::vector<int64_t> paths{kScalar};
  if (cpu_has_avx2()) paths.push_back(kAvx2);
  if (cpu_has_vnni()) paths.push_back(kVnni);
  return paths;
}

Path resolve_path(int64_t path) {
  const auto paths = available_paths();
  if (path == kAuto) return static_cast<Path>(paths.back());
  TORCH_CHECK(std::find(paths.begin(), paths.end(), path) != paths.end(), "q8 kernel path ", path,
              " is not available on this CPU (0 = scalar, 1 = AVX2, 2 = AVX-512 VNNI)");
  return static_cast<Path>(path);
}

// ---- quantized activations: q [M, K] int8, d and s [M, K / 32] ----

struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

// Round half to even (nearbyint in the default rounding mode, as vcvtps2dq rounds), so every path
// quantizes bit for bit alike.
void quantize_block_scalar(const float* x, int8_t* q, float& d, float& s) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int j = 0; j < QK; ++j) {
    const int v = static_cast<int>(std::nearbyint(x[j] * id));
    q[j] = static_cast<int8_t>(v);
    sum += v;
  }
  s = d * static_cast<float>(sum);
}

#ifdef Q8_X86
Q8_AVX2 void quantize_blocks_avx2(const float* x, int8_t* q, float* d, float* s, int64_t begin, int64_t end) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = begin; i < end; ++i) {
    const float* xb = x + i * QK;
    const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float di = _mm_cvtss_f32(m) / 127.f;
    const __m256 id = _mm256_set1_ps(di != 0.f ? 1.f / di : 0.f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
    // packs interleave 128-bit lanes: dwords come out as i0a i1a i2a i3a i0b i1b i2b i3b.
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * QK), _mm256_permutevar8x32_epi32(packed, order));
    d[i] = di;
    s[i] = di * static_cast<float>(_mm_cvtsi128_si32(t4));
  }
}
#endif

QuantizedX quantize_x(const float* x, int64_t M, int64_t K, Path path) {
  const int64_t nb = K / QK;
  QuantizedX out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  int8_t* q = out.q.data();
  float* d = out.d.data();
  float* s = out.s.data();
  at::parallel_for(0, M * nb, 512, [&](int64_t begin, int64_t end) {
#ifdef Q8_X86
    if (path != kScalar) {
      quantize_blocks_avx2(x, q, d, s, begin, end);
      return;
    }
#endif
    for (int64_t i = begin; i < end; ++i) quantize_block_scalar(x + i * QK, q + i * QK, d[i], s[i]);
  });
  return out;
}

// ---- scalar path (any CPU, any number of rows) ----

template <Format fmt>
void gemm_scalar(const QuantizedX& qx, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  constexpr int64_t bytes = block_bytes(fmt);
  const int64_t nb = K / QK;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int32_t wq[QK];
    std::vector<float> acc(M);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + (n * nb + b) * bytes;
        float dw = 0.f, mw = 0.f;
        if constexpr (fmt == kQ4_1F) {
          std::memcpy(&dw, blk, 4);
          std::memcpy(&mw, blk + 4, 4);
        } else {
          dw = half_bits_to_float(blk);
        }
        if constexpr (nibbles(fmt)) {
          const int64_t at = fmt == kQ4_1 ? 4 : 8;
          if constexpr (fmt == kQ4_1) mw = half_bits_to_float(blk + 2);
          for (int j = 0; j < 16; ++j) {
            wq[j] = blk[at + j] & 0x0F;
            wq[j + 16] = blk[at + j] >> 4;
          }
        } else if constexpr (fmt == kQ5_0) {
          mw = -16.f * dw;
          uint32_t qh;
          std::memcpy(&qh, blk + 2, 4);
          for (int j = 0; j < 16; ++j) {
            wq[j] = (blk[6 + j] & 0x0F) | (((qh >> j) & 1) << 4);
            wq[j + 16] = (blk[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          }
        } else {
          for (int j = 0; j < QK; ++j) wq[j] = static_cast<int8_t>(blk[2 + j]);
        }
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xq = qx.q.data() + m * K + b * QK;
          int32_t sumi = 0;
          for (int j = 0; j < QK; ++j) sumi += wq[j] * xq[j];
          acc[m] += static_cast<float>(sumi) * (dw * qx.d[m * nb + b]);
          if constexpr (fmt != kQ8_0) acc[m] += mw * qx.s[m * nb + b];
        }
      }
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = acc[m] + (bias ? bias[n] : 0.f);
    }
  });
}

#ifdef Q8_X86
// ---- streaming: up to 4 rows of x, each weight row read once ----

Q8_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 nibbles of a Q4_1 block as bytes in weight order: byte j holds weight j (low nibble) and
// weight j + 16 (high nibble).
Q8_AVX2 inline __m256i q4_1_bytes(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// Q5_0's fifth bits as bytes in weight order: 0x10 in byte j where bit j of qh is set.
Q8_AVX2 inline __m256i q5_0_high_bytes(const uint8_t* qh_bytes) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  // Byte j takes byte j / 8 of qh (the shuffle works within each 128-bit half), then tests its bit j % 8.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// 8 int32 partial sums of a block's 32 products: u (unsigned bytes) times s (signed bytes).
Q8_AVX2 inline __m256i dot_us_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
Q8_VNNI inline __m256i dot_us_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

// y[r, n] = row r of x . weight row n (+ bias) for n in [n0, n1), R rows of x. One body for both
// ISAs, DOT being the only difference (a macro: the VNNI function needs the wider target). Even
// and odd blocks go to separate accumulators, so consecutive blocks' FMAs do not wait on each other.
#define Q8_STREAM_BLOCK(DOT, b, ACC, MACC)                                                          \
  {                                                                                               \
    const uint8_t* blk = w + (b) * bytes;                                                         \
    if constexpr (fmt != kQ8_0) { /* unsigned weights and an offset: Q4_1, and Q5_0 as m = -16 d */ \
      float dw, mw;                                                                               \
      __m256i wv;                                                                                 \
      if constexpr (fmt == kQ4_1) {                                                               \
        uint32_t dm;                                                                              \
        std::memcpy(&dm, blk, 4);                                                                 \
        const __m128 dmf = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(dm)));                 \
        dw = _mm_cvtss_f32(dmf);                                                                  \
        mw = _mm_cvtss_f32(_mm_movehdup_ps(dmf));                                                 \
        wv = q4_1_bytes(blk + 4);                                                                 \
      } else if constexpr (fmt == kQ4_1F) {                                                       \
        std::memcpy(&dw, blk, 4);                                                                 \
        std::memcpy(&mw, blk + 4, 4);                                                             \
        wv = q4_1_bytes(blk + 8);                                                                 \
      } else {                                                                                    \
        uint16_t h;                                                                               \
        std::memcpy(&h, blk, 2);                                                                  \
        dw = _cvtsh_ss(h);                                                                        \
        mw = -16.f * dw;                                                                          \
        wv = _mm256_or_si256(q4_1_bytes(blk + 6), q5_0_high_bytes(blk + 2));                      \
      }                                                                                           \
      for (int r = 0; r < R; ++r) {                                                               \
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[r] + (b) * QK)); \
        const __m256 scale = _mm256_set1_ps(dw * dx[r][b]);                                       \
        ACC[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(wv, xv)), scale, ACC[r]);                 \
        MACC[r] += mw * sx[r][b];                                                                 \
      }                                                                                           \
    } else {                                                                                      \
      uint16_t h;                                                                                 \
      std::memcpy(&h, blk, 2);                                                                    \
      const float dw = _cvtsh_ss(h);                                                              \
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));           \
      const __m256i aw = _mm256_abs_epi8(wv);                                                     \
      for (int r = 0; r < R; ++r) {                                                               \
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[r] + (b) * QK)); \
        const __m256 scale = _mm256_set1_ps(dw * dx[r][b]);                                       \
        ACC[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(aw, _mm256_sign_epi8(xv, wv))), scale, ACC[r]); \
      }                                                                                           \
    }                                                                                             \
  }

#define Q8_STREAM_BODY(DOT)                                                                          \
  constexpr int64_t bytes = block_bytes(fmt);                                                     \
  for (int64_t n = n0; n < n1; ++n) {                                                             \
    const uint8_t* w = weights + n * nb * bytes;                                                  \
    __m256 acc0[R], acc1[R];                                                                      \
    float macc0[R], macc1[R];                                                                     \
    for (int r = 0; r < R; ++r) {                                                                 \
      acc0[r] = acc1[r] = _mm256_setzero_ps();                                                    \
      macc0[r] = macc1[r] = 0.f;                                                                  \
    }                                                                                             \
    int64_t b = 0;                                                                                \
    for (; b + 1 < nb; b += 2) {                                                                  \
      Q8_STREAM_BLOCK(DOT, b, acc0, macc0)                                                        \
      Q8_STREAM_BLOCK(DOT, b + 1, acc1, macc1)                                                    \
    }                                                                                             \
    if (b < nb) Q8_STREAM_BLOCK(DOT, b, acc0, macc0)                                              \
    const float bn = bias ? bias[n] : 0.f;                                                        \
    for (int r = 0; r < R; ++r)                                                                   \
      y[r * N + n] = hsum_ps(_mm256_add_ps(acc0[r], acc1[r])) + (macc0[r] + macc1[r]) + bn;       \
  }

#define Q8_STREAM_ARGS                                                                               \
  const uint8_t *weights, int64_t nb, const int8_t *const *xq, const float *const *dx, const float *const *sx, \
      const float *bias, float *y, int64_t N, int64_t n0, int64_t n1

template <Format fmt, int R>
Q8_AVX2 void stream_avx2(Q8_STREAM_ARGS) {
  Q8_STREAM_BODY(dot_us_avx2)
}

template <Format fmt, int R>
Q8_VNNI void stream_vnni(Q8_STREAM_ARGS) {
  Q8_STREAM_BODY(dot_us_vnni)
}
#undef Q8_STREAM_BODY
#undef Q8_STREAM_BLOCK
#undef Q8_STREAM_ARGS

template <Format fmt, int R>
void stream_range(Path path, const uint8_t* w, int64_t nb, const int8_t* const* xq, const float* const* dx,
                  const float* const* sx, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (path == kVnni) stream_vnni<fmt, R>(w, nb, xq, dx, sx, bias, y, N, n0, n1);
  else stream_avx2<fmt, R>(w, nb, xq, dx, sx, bias, y, N, n0, n1);
}

// Rows m0.. (at most STREAM_MAX_ROWS of them) of x against every weight row.
template <Format fmt>
void gemm_stream(Path path, const QuantizedX& qx, const uint8_t* w, const float* bias, float* y, int64_t M,
                 int64_t N, int64_t K, int64_t m0 = 0) {
  const int64_t nb = K / QK, rows = std::min(STREAM_MAX_ROWS, M - m0);
  const int8_t* xq[STREAM_MAX_ROWS];
  const float *dx[STREAM_MAX_ROWS], *sx[STREAM_MAX_ROWS];
  for (int64_t r = 0; r < rows; ++r) {
    xq[r] = qx.q.data() + (m0 + r) * K;
    dx[r] = qx.d.data() + (m0 + r) * nb;
    sx[r] = qx.s.data() + (m0 + r) * nb;
  }
  float* ym = y + m0 * N;
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    switch (rows) {
      case 1: stream_range<fmt, 1>(path, w, nb, xq, dx, sx, bias, ym, N, begin, end); break;
      case 2: stream_range<fmt, 2>(path, w, nb, xq, dx, sx, bias, ym, N, begin, end); break;
      case 3: stream_range<fmt, 3>(path, w, nb, xq, dx, sx, bias, ym, N, begin, end); break;
      default: stream_range<fmt, 4>(path, w, nb, xq, dx, sx, bias, ym, N, begin, end); break;
    }
  });
}

// ---- tiled: more than 4 rows ----
//
// A weight tile of 16 columns, per block b: bytes[b][g][n][4] = weights 4g..4g+3 of column n
// (Q4_1 as 0..15, Q5_0 as 0..31, Q8_0 as int8), so one 64-byte line of group g is 16 lanes of 4
// weights; dw[b][n]; aux[b][n]: Q4_1's m (Q5_0's -16 d) as float, Q8_0's 128 * sum(q_w) as int32
// (for the unsigned-x form).
// An x panel of R rows, per block: x4[b][g][r] = the 4 quants of row r at weights 4g..4g+3 (plus 128
// each, for Q8_0 on VNNI), dx[b][r], sx[b][r]; rows past M are zero with zero scales.

struct Tile {
  std::vector<uint8_t> bytes;
  std::vector<float> dw;
  std::vector<int32_t> aux;  // float bits for Q4_1 and Q5_0
};

Q8_AVX2 inline void transpose8_epi32(__m256i* r) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i s0 = _mm256_unpacklo_epi64(t0, t2), s1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i s2 = _mm256_unpacklo_epi64(t1, t3), s3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i s4 = _mm256_unpacklo_epi64(t4, t6), s5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i s6 = _mm256_unpacklo_epi64(t5, t7), s7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(s0, s4, 0x20);
  r[1] = _mm256_permute2x128_si256(s1, s5, 0x20);
  r[2] = _mm256_permute2x128_si256(s2, s6, 0x20);
  r[3] = _mm256_permute2x128_si256(s3, s7, 0x20);
  r[4] = _mm256_permute2x128_si256(s0, s4, 0x31);
  r[5] = _mm256_permute2x128_si256(s1, s5, 0x31);
  r[6] = _mm256_permute2x128_si256(s2, s6, 0x31);
  r[7] = _mm256_permute2x128_si256(s3, s7, 0x31);
}

// Repack columns n0..n0+cols of the weights into a tile (zeros past cols). Each block of 8 columns
// is 8 vectors of 8 dwords (dword g = weights 4g..4g+3), transposed in registers into 8 vectors of
// one group each: scalar byte shuffling made the repack cost more than the products below 16 rows.
template <Format fmt>
Q8_AVX2 void pack_tile(const uint8_t* w, int64_t n0, int64_t cols, int64_t nb, Tile& t) {
  constexpr int64_t bytes = block_bytes(fmt);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t half = 0; half < 2; ++half) {
      __m256i r[8];
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t n = half * 8 + j;
        float dw = 0.f;
        int32_t aux = 0;
        if (n < cols) {
          const uint8_t* blk = w + ((n0 + n) * nb + b) * bytes;
          uint16_t h;
          std::memcpy(&h, blk, 2);
          dw = _cvtsh_ss(h);
          if constexpr (fmt == kQ4_1F) {
            std::memcpy(&dw, blk, 4);
            std::memcpy(&aux, blk + 4, 4);
            r[j] = q4_1_bytes(blk + 8);
          } else if constexpr (fmt == kQ4_1) {
            std::memcpy(&h, blk + 2, 2);
            const float m = _cvtsh_ss(h);
            std::memcpy(&aux, &m, 4);
            r[j] = q4_1_bytes(blk + 4);
          } else if constexpr (fmt == kQ5_0) {
            const float m = -16.f * dw;
            std::memcpy(&aux, &m, 4);
            r[j] = _mm256_or_si256(q4_1_bytes(blk + 6), q5_0_high_bytes(blk + 2));
          } else {
            r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
          }
        } else {
          r[j] = _mm256_setzero_si256();
        }
        t.dw[b * TILE_N + n] = dw;
        t.aux[b * TILE_N + n] = aux;
      }
      transpose8_epi32(r);
      uint8_t* dst = t.bytes.data() + b * TILE_BLOCK_BYTES + half * 32;
      __m256i sum = _mm256_setzero_si256();
      for (int g = 0; g < 8; ++g) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 64), r[g]);
        if constexpr (fmt == kQ8_0) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, r[g]), ones16));
      }
      if constexpr (fmt == kQ8_0)  // 128 * sum(q_w) per column, for the (x + 128) form
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.aux.data() + b * TILE_N + half * 8), _mm256_slli_epi32(sum, 7));
    }
  }
}

struct Panels {
  int rows = 0;
  int64_t count = 0;
  std::vector<int32_t> x4;  // [panel][b][8][rows]
  std::vector<float> dx, sx;  // [panel][b][rows]
};

Panels pack_panels(const QuantizedX& qx, int64_t M, int64_t K, int rows, bool plus128) {
  const int64_t nb = K / QK;
  Panels p;
  p.rows = rows;
  p.count = (M + rows - 1) / rows;
  p.x4.assign(p.count * nb * 8 * rows, plus128 ? static_cast<int32_t>(0x80808080u) : 0);
  p.dx.assign(p.count * nb * rows, 0.f);
  p.sx.assign(p.count * nb * rows, 0.f);
  at::parallel_for(0, p.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int r = 0; r < rows && i * rows + r < M; ++r) {
        const int64_t m = i * rows + r;
        for (int64_t b = 0; b < nb; ++b) {
          for (int g = 0; g < 8; ++g) {
            uint32_t v;
            std::memcpy(&v, qx.q.data() + m * K + b * QK + g * 4, 4);
            // int8 + 128 as uint8 is the byte with its top bit flipped.
            if (plus128) v ^= 0x80808080u;
            p.x4[((i * nb + b) * 8 + g) * rows + r] = static_cast<int32_t>(v);
          }
          p.dx[(i * nb + b) * rows + r] = qx.d[m * nb + b];
          p.sx[(i * nb + b) * rows + r] = qx.s[m * nb + b];
        }
      }
    }
  });
  return p;
}

// out[r * 16 + j] = panel row r . tile column j. Per block, int32 sums per (row, column), then
// scaled by d_w (a vector of 16 columns) times d_x (a broadcast).
template <Format fmt, int R>
Q8_VNNI void tile_kernel_vnni(const Tile& t, const int32_t* x4, const float* dx, const float* sx, int64_t nb,
                              float* out) {
  __m512 fa[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) fa[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = t.bytes.data() + b * TILE_BLOCK_BYTES;
    const int32_t* xb = x4 + b * 8 * R;
    __m512i ia[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) ia[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m512i wv = _mm512_loadu_si512(wb + g * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_set1_epi32(xb[g * R + r]);
        if constexpr (fmt != kQ8_0) ia[r] = _mm512_dpbusd_epi32(ia[r], wv, xv);
        else ia[r] = _mm512_dpbusd_epi32(ia[r], xv, wv);  // (x + 128) unsigned times signed weights
      }
    }
    const __m512 dw = _mm512_loadu_ps(t.dw.data() + b * TILE_N);
    const __m512i aux = _mm512_loadu_si512(t.aux.data() + b * TILE_N);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[b * R + r]));
      if constexpr (fmt != kQ8_0) {
        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), scale, fa[r]);
        fa[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(aux), _mm512_set1_ps(sx[b * R + r]), fa[r]);
      } else {
        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[r], aux)), scale, fa[r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * TILE_N, fa[r]);
}

// The AVX2 kernel covers 8 of the tile's 16 columns (half h) per call: 16 ymm registers do not hold
// two halves' accumulators. A block is summed one row at a time (weights reloaded from L1): summed
// for all rows at once, GCC reassociated the integer adds into one tree of 48 products and spilled
// most of them. Q4_1 products are at most 2 * 15 * 127 per 16-bit lane, so a block's 8 groups add
// up in 16 bits (< 32767) and widen once; Q5_0's (2 * 31 * 127) widen every 4 groups.
template <Format fmt, int R>
Q8_AVX2 void tile_kernel_avx2(const Tile& t, int h, const int32_t* x4, const float* dx, const float* sx, int64_t nb,
                              float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 fa[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) fa[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = t.bytes.data() + b * TILE_BLOCK_BYTES + h * 32;
    const int32_t* xb = x4 + b * 8 * R;
    const __m256 dw = _mm256_loadu_ps(t.dw.data() + b * TILE_N + h * 8);
    const __m256 mw = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.aux.data() + b * TILE_N + h * 8)));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m256i sum;
      if constexpr (nibbles(fmt)) {
        __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64));
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(xb[g * R + r])));
        }
        sum = _mm256_madd_epi16(s16, ones);
      } else if constexpr (fmt == kQ5_0) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (g + 4) * 64));
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(w0, _mm256_set1_epi32(xb[g * R + r])));
          hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(w1, _mm256_set1_epi32(xb[(g + 4) * R + r])));
        }
        sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
      } else {
        sum = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64));
          const __m256i sxv = _mm256_sign_epi8(_mm256_set1_epi32(xb[g * R + r]), wv);
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), sxv), ones));
        }
      }
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx[b * R + r]));
      fa[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, fa[r]);
      if constexpr (fmt != kQ8_0) fa[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx[b * R + r]), fa[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * TILE_N + h * 8, fa[r]);
}

template <Format fmt>
void gemm_tiled(Path path, const QuantizedX& qx, const uint8_t* w, const float* bias, float* y, int64_t M,
                int64_t N, int64_t K) {
  const int64_t nb = K / QK, tiles = (N + TILE_N - 1) / TILE_N;
  const int R = path == kVnni ? VNNI_ROWS : AVX2_ROWS;
  const Panels panels = pack_panels(qx, M, K, R, path == kVnni && fmt == kQ8_0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    Tile t{std::vector<uint8_t>(nb * TILE_BLOCK_BYTES), std::vector<float>(nb * TILE_N),
           std::vector<int32_t>(nb * TILE_N)};
    alignas(64) float out[VNNI_ROWS * TILE_N];
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t n0 = ti * TILE_N, cols = std::min(TILE_N, N - n0);
      pack_tile<fmt>(w, n0, cols, nb, t);
      for (int64_t p = 0; p < panels.count; ++p) {
        const int32_t* x4 = panels.x4.data() + p * nb * 8 * R;
        const float* dx = panels.dx.data() + p * nb * R;
        const float* sx = panels.sx.data() + p * nb * R;
        if (path == kVnni) {
          tile_kernel_vnni<fmt, VNNI_ROWS>(t, x4, dx, sx, nb, out);
        } else {
          tile_kernel_avx2<fmt, AVX2_ROWS>(t, 0, x4, dx, sx, nb, out);
          if (cols > 8) tile_kernel_avx2<fmt, AVX2_ROWS>(t, 1, x4, dx, sx, nb, out);
        }
        const int64_t rows = std::min<int64_t>(R, M - p * R);
        for (int64_t r = 0; r < rows; ++r) {
          float* yr = y + (p * R + r) * N + n0;
          for (int64_t j = 0; j < cols; ++j) yr[j] = out[r * TILE_N + j] + (bias ? bias[n0 + j] : 0.f);
        }
      }
    }
  });
}
#endif  // Q8_X86

template <Format fmt>
void gemm_q8(Path path, const QuantizedX& qx, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t N,
             int64_t K) {
#ifdef Q8_X86
  if (path != kScalar) {
    if (M <= STREAM_MAX_ROWS) {
      gemm_stream<fmt>(path, qx, w, bias, y, M, N, K);
    } else {
      gemm_tiled<fmt>(path, qx, w, bias, y, M, N, K);
    }
    return;
  }
#endif
  gemm_scalar<fmt>(qx, w, bias, y, M, N, K);
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) % QK == 0, "rows of x must be whole blocks of 32 values");
}

}  // namespace

// x: [M, K] float32; weight: [N, K / 32 * block bytes] uint8 (fmt 0 = Q4_1, 1 = Q8_0, 2 = Q5_0, 3 = Q4_1
// with float32 d and m, 24 bytes: d, m, the 16 bytes of nibbles); bias: [N]
// float32 or empty; path: -1 = the best this CPU has, else 0 scalar, 1 AVX2, 2 AVX-512 VNNI.
// Returns [M, N] float32 computed with x quantized to 8 bits per block of 32.
torch::Tensor gguf_linear_q8(torch::Tensor x, torch::Tensor weight, int64_t fmt, torch::Tensor bias, int64_t path) {
  check_x(x);
  TORCH_CHECK(fmt >= kQ4_1 && fmt <= kQ4_1F, "8-bit activations take Q4_1 (0), Q8_0 (1), Q5_0 (2) or Q4_1F (3) "
              "weights, not format ", fmt);
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
              "GGUF weights must be a contiguous 2-D uint8 tensor");
  const int64_t K = x.size(1), N = weight.size(0), M = x.size(0);
  TORCH_CHECK(weight.size(1) == K / QK * block_bytes(static_cast<Format>(fmt)), "weight bytes do not match x");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous()),
              "bias must be empty or [N] float32");
  const Path p = resolve_path(path);
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const QuantizedX qx = quantize_x(x.data_ptr<float>(), M, K, p);
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  if (fmt == kQ4_1) gemm_q8<kQ4_1>(p, qx, wp, b, y.data_ptr<float>(), M, N, K);
  else if (fmt == kQ5_0) gemm_q8<kQ5_0>(p, qx, wp, b, y.data_ptr<float>(), M, N, K);
  else if (fmt == kQ4_1F) gemm_q8<kQ4_1F>(p, qx, wp, b, y.data_ptr<float>(), M, N, K);
  else gemm_q8<kQ8_0>(p, qx, wp, b, y.data_ptr<float>(), M, N, K);
  return y;
}

// x quantized as the kernels quantize it: (q [M, K] int8, d [M, K / 32], s [M, K / 32] = d * sum(q)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> gguf_quantize_activations(torch::Tensor x, int64_t path) {
  check_x(x);
  const Path p = resolve_path(path);
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const QuantizedX qx = quantize_x(x.data_ptr<float>(), M, K, p);
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, K / QK}, torch::kFloat32);
  auto s = torch::empty({M, K / QK}, torch::kFloat32);
  std::memcpy(q.data_ptr<int8_t>(), qx.q.data(), qx.q.size());
  std::memcpy(d.data_ptr<float>(), qx.d.data(), qx.d.size() * 4);
  std::memcpy(s.data_ptr<float>(), qx.s.data(), qx.s.size() * 4);
  return {q, d, s};
}

// The kernel paths this CPU can run, in increasing order of preference (0 scalar, 1 AVX2, 2 VNNI).
std::vector<int64_t> gguf_q8_paths() { return available_paths(); }
