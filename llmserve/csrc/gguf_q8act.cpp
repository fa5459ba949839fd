// GGUF Q4_1/Q8_0/Q5_0/Q4_K linear layers with 8-bit activations (opt-in: --activations q8), computed
// the way llama.cpp computes them: each row of x is quantized per block of 32 values to int8 with one
// float scale d = max|x| / 127 (the Q8_0 format; for weights with an offset also s = d * sum(q), as
// in Q8_1), and every block's dot product is an integer one:
//   Q4_1 x Q8_1: d_w * d_x * sum(q_w * q_x) + m_w * s_x      (q_w in 0..15)
//   Q8_0 x Q8_0: d_w * d_x * sum(q_w * q_x)                   (q_w in -128..127)
//   Q5_0 x Q8_1: d_w * d_x * sum(q_w * q_x) - 16 d_w * s_x    (q_w in 0..31: Q4_1's form, m_w = -16 d_w)
//   Q4_1F x Q8_1: Q4_1 with float32 d and m: Q4_K's sub-blocks of 32, d * scale and -dmin * min
//     multiplied out at load (exactly as ggml dequantizes them), so Q4_K runs Q4_1's kernels
//   Q5_1F x Q8_1: Q4_1F's form with 5-bit q_w (0..31): Q5_K's sub-blocks of 32, as Q4_K's
//   Q6_K32 x Q8_0: Q6_K cut into blocks of 32 (float32 d, the two int8 scales of its sub-blocks of
//     16, q_w in 0..63 for weights d * sc * (q_w - 32)):
//     d_w * d_x * (sc_a * sum_a(q_w * q_x) + sc_b * sum_b(q_w * q_x) - 32 * (sc_a * X_a + sc_b * X_b))
//     with X_a, X_b the sums of each half of x's block; all of it an integer before the one scaling
// This is lossy (x is rounded to 8 bits) where gguf_gemm.cpp is exact, and cheaper: 32 products are
// one or two integer instructions instead of four float FMAs plus the widening of the weights.
//
// The weights are repacked once, when a layer is built (gguf_q8_pack), into tiles of 16 output
// columns in which each 32-bit lane holds 4 consecutive weights of one column. A register-tiled
// kernel multiplies a tile by panels of up to 8 rows of x (4 bytes of a row broadcast against 16
// columns: no horizontal sums), and the per-block scales apply to whole vectors of columns. Every
// row count runs this way: a decode row reads a tile's 16 columns with 8 instructions a block where
// a row-by-row dot product needed a horizontal sum per column. A tile block is laid out as
//   nibble formats (Q4_1, Q4_1F): 4 x 16 dwords, dword [p][n] = bytes 4p..4p+3 of column n's 16
//     nibble bytes; byte k holds weight 4p+k (low nibble, group p) and 16+4p+k (high nibble, group
//     p+4), ggml's own order, so two shifts unpack them;
//   byte formats (Q8_0 as int8, Q5_0 and Q5_1F as 0..31, Q6_K32 as 0..63): 8 x 16 dwords,
//     dword [g][n] = weights 4g..4g+3;
//   then d_w [16] and aux [16] as the file stores them (fp16; Q4_1F, Q5_1F float32): the offset
//     m_w, or for Q8_0 sum(q_w) as int16 (for the unsigned-x form below); Q5_0 has no aux (m_w = -16 d_w);
//     Q6_K32: d_w [16] float32, then sc_a [16] and sc_b [16], each as an int16 pair in a dword (so
//     one vpmaddwd both widens a sub-block's 16-bit sums and scales them).
// A tile takes the blocks' bytes (Q4_1, Q4_1F), 1.06x (Q8_0), 1.55x (Q5_0), 1.25x (Q5_1F) or 1.4x
// (Q6_K's 6.6 bits as a byte a weight).
//
// Instruction sets are chosen at run time (never assumed from the build flags, so a portable build
// still gets them): AMX-INT8 for batches of 16 rows or more (tdpbssd on 16-row panels, below),
// AVX-512 VNNI (vpdpbusd), else AVX2 (vpmaddubsw + vpmaddwd), else scalar. VNNI and AVX2 both
// multiply unsigned by signed bytes, so Q8_0's signed weights are handled by moving the sign onto x
// (|w| times sign(w) * x) on AVX2, and on VNNI by adding 128 to x (unsigned) and subtracting
// 128 * sum(q_w), precomputed per block and column. A `path` argument forces a path (tests run every
// path this CPU has, and the VNNI kernels over portable AVX-512 where it has no VNNI:
// vnni_emulation.h, and the AMX kernels over emulated tile operations: amx_emulation.h).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define Q8_X86 1
// Every function that uses an intrinsic carries the target it needs, so this file compiles the same
// with or without -march=native and the dispatcher decides what runs.
#define Q8_AVX2 __attribute__((target("avx2,fma,f16c")))
#ifdef LLMSERVE_EMULATE_VNNI  // tests only: the VNNI kernels over portable AVX-512 (vnni_emulation.h)
#include "vnni_emulation.h"
#define Q8_VNNI Q8_AVX2
#else
#define Q8_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif
#ifdef LLMSERVE_EMULATE_AMX  // tests only: the AMX tile operations in plain C++ (amx_emulation.h)
#include "amx_emulation.h"
#define Q8_AMX Q8_VNNI
#define AMX_CONFIGURE(config) amx_emulation::load_config(config)
#define AMX_RELEASE() amx_emulation::release()
#define AMX_ZERO(t) amx_emulation::zero(t)
#define AMX_LOAD(t, base, stride) amx_emulation::load(t, base, stride)
#define AMX_STORE(t, base, stride) amx_emulation::store(t, base, stride)
#define AMX_DPBSSD(c, a, b) amx_emulation::dpbssd(c, a, b)
#else
#include <sys/syscall.h>
#include <unistd.h>
#define Q8_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
// Tile numbers are immediates: each macro takes a literal 0..7.
#define AMX_CONFIGURE(config) _tile_loadconfig(config)
#define AMX_RELEASE() _tile_release()
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define AMX_STORE(t, base, stride) _tile_stored(t, base, stride)
#define AMX_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#endif
#endif

namespace {

constexpr int64_t QK = 32;
constexpr int64_t Q4_1_BYTES = 20, Q8_0_BYTES = 34, Q5_0_BYTES = 22, Q4_1F_BYTES = 24, Q6_K32_BYTES = 38,
                  Q5_1F_BYTES = 40;
constexpr int64_t TILE_N = 16;                       // output columns of a tile
constexpr int VNNI_ROWS = 8, AVX2_ROWS = 6;          // rows of x per panel (register budget of each ISA)
constexpr int SMALL_ROWS = 4;                        // up to this many rows, a panel holds exactly M rows
enum Format : int64_t { kQ4_1 = 0, kQ8_0 = 1, kQ5_0 = 2, kQ4_1F = 3, kQ6_K32 = 4, kQ5_1F = 5 };

constexpr int64_t block_bytes(Format fmt) {
  return fmt == kQ4_1    ? Q4_1_BYTES
         : fmt == kQ5_0  ? Q5_0_BYTES
         : fmt == kQ4_1F ? Q4_1F_BYTES
         : fmt == kQ6_K32 ? Q6_K32_BYTES
         : fmt == kQ5_1F  ? Q5_1F_BYTES
                          : Q8_0_BYTES;
}
// Q4_1's nibbles (0..15): kept packed two to a byte in the tiles; the 16-bit sums of the AVX2
// kernel hold a whole block of them.
constexpr bool nibbles(Format fmt) { return fmt == kQ4_1 || fmt == kQ4_1F; }
// Bytes of one tile block: the weights, then 16 d_w and 16 aux values (the file's fp16, or
// float32 for Q4_1F and Q5_1F; Q5_0 has no aux: its offset is -16 d_w; Q6_K32 has two: the scale
// pairs of its sub-blocks).
constexpr int64_t tile_weight_bytes(Format fmt) { return nibbles(fmt) ? 4 * TILE_N * 4 : 8 * TILE_N * 4; }
constexpr int64_t scale_bytes(Format fmt) { return fmt == kQ4_1F || fmt == kQ6_K32 || fmt == kQ5_1F ? 4 : 2; }
constexpr int64_t tile_block_bytes(Format fmt) {
  return tile_weight_bytes(fmt) + (fmt == kQ5_0 ? 1 : fmt == kQ6_K32 ? 3 : 2) * TILE_N * scale_bytes(fmt);
}
enum Path : int64_t { kAuto = -1, kScalar = 0, kAvx2 = 1, kVnni = 2, kAmx = 3 };

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
#if defined(Q8_X86) && defined(LLMSERVE_EMULATE_VNNI)
  return cpu_has_avx2();
#elif defined(Q8_X86)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// AMX-INT8 (tile multiplies of 16 x 64 by 64 x 16 bytes), which Linux hands out only on request:
// the process asks once for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
// and the answer covers every thread. The kernels also need VNNI's AVX-512 for their float steps.
bool cpu_has_amx() {
#if defined(Q8_X86) && defined(LLMSERVE_EMULATE_AMX)
  return cpu_has_vnni();
#elif defined(Q8_X86)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!cpu_has_vnni() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}

std::vector<int64_t> available_paths() {
  std::vector<int64_t> paths{kScalar};
  if (cpu_has_avx2()) paths.push_back(kAvx2);
  if (cpu_has_vnni()) paths.push_back(kVnni);
  if (cpu_has_amx()) paths.push_back(kAmx);
  return paths;
}

Path resolve_path(int64_t path) {
  const auto paths = available_paths();
  if (path == kAuto) return static_cast<Path>(paths.back());
  TORCH_CHECK(std::find(paths.begin(), paths.end(), path) != paths.end(), "q8 kernel path ", path,
              " is not available on this CPU (0 = scalar, 1 = AVX2, 2 = AVX-512 VNNI, 3 = AMX)");
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


template <typename Fn>
void with_format(int64_t fmt, Fn&& fn) {
  switch (fmt) {
    case kQ4_1: fn(std::integral_constant<Format, kQ4_1>{}); break;
    case kQ8_0: fn(std::integral_constant<Format, kQ8_0>{}); break;
    case kQ5_0: fn(std::integral_constant<Format, kQ5_0>{}); break;
    case kQ4_1F: fn(std::integral_constant<Format, kQ4_1F>{}); break;
    case kQ6_K32: fn(std::integral_constant<Format, kQ6_K32>{}); break;
    default: fn(std::integral_constant<Format, kQ5_1F>{}); break;
  }
}

// ---- tiles: packing, and reading a weight back ----

// Where weight j (0..31) of column n sits in a byte format's tile block: dword [j / 4][n], byte j % 4.
constexpr int64_t byte_at(int64_t n, int j) { return ((j / 4) * TILE_N + n) * 4 + j % 4; }

// Column n (0..15) of a tile block from that column's GGUF block; the tile starts zeroed, so the
// columns past N of the last tile stay zero with zero scales.
template <Format fmt>
void pack_column(const uint8_t* blk, int64_t n, uint8_t* tb) {
  constexpr int64_t WB = tile_weight_bytes(fmt), SB = scale_bytes(fmt);
  uint8_t* scale = tb + WB + n * SB;
  if constexpr (nibbles(fmt)) {
    std::memcpy(scale, blk, SB);  // d, then m: fp16 (Q4_1) or float32 (Q4_1F)
    std::memcpy(scale + TILE_N * SB, blk + SB, SB);
    const uint8_t* qs = blk + 2 * SB;
    for (int p = 0; p < 4; ++p) std::memcpy(tb + (p * TILE_N + n) * 4, qs + 4 * p, 4);
  } else if constexpr (fmt == kQ5_1F) {
    std::memcpy(scale, blk, 4);  // d, then m: float32
    std::memcpy(scale + TILE_N * SB, blk + 4, 4);
    for (int j = 0; j < QK; ++j) tb[byte_at(n, j)] = blk[8 + j];
  } else if constexpr (fmt == kQ6_K32) {
    std::memcpy(scale, blk, 4);  // d, float32
    for (int s = 0; s < 2; ++s) {  // sub-block s's scale as an int16 pair
      const uint16_t sc = static_cast<uint16_t>(static_cast<int16_t>(static_cast<int8_t>(blk[4 + s])));
      const uint32_t pair = sc | (static_cast<uint32_t>(sc) << 16);
      std::memcpy(tb + WB + (1 + s) * TILE_N * SB + n * 4, &pair, 4);
    }
    for (int j = 0; j < QK; ++j) tb[byte_at(n, j)] = blk[6 + j];
  } else if constexpr (fmt == kQ5_0) {
    std::memcpy(scale, blk, 2);
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const uint8_t* qs = blk + 6;
    for (int j = 0; j < QK; ++j) {
      const int low = j < 16 ? qs[j] & 0x0F : qs[j - 16] >> 4;
      tb[byte_at(n, j)] = static_cast<uint8_t>(low | (((qh >> j) & 1) << 4));
    }
  } else {
    std::memcpy(scale, blk, 2);
    int16_t sum = 0;  // |sum| <= 32 * 128
    for (int j = 0; j < QK; ++j) {
      tb[byte_at(n, j)] = blk[2 + j];
      sum = static_cast<int16_t>(sum + static_cast<int8_t>(blk[2 + j]));
    }
    std::memcpy(scale + TILE_N * SB, &sum, 2);
  }
}

template <Format fmt>
void pack_tiles(const uint8_t* w, int64_t N, int64_t nb, uint8_t* tiles) {
  constexpr int64_t bytes = block_bytes(fmt), TB = tile_block_bytes(fmt);
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      for (int64_t n = 0; n < std::min(TILE_N, N - ti * TILE_N); ++n) {
        const uint8_t* row = w + (ti * TILE_N + n) * nb * bytes;
        for (int64_t b = 0; b < nb; ++b) pack_column<fmt>(row + b * bytes, n, tiles + (ti * nb + b) * TB);
      }
    }
  });
}

// Weight j (0..31) of column n in a tile block, as the integer the kernels multiply.
template <Format fmt>
inline int tile_weight(const uint8_t* tb, int64_t n, int j) {
  if constexpr (nibbles(fmt)) {
    const uint8_t byte = tb[(((j % 16) / 4) * TILE_N + n) * 4 + j % 4];
    return j < 16 ? byte & 0x0F : byte >> 4;
  } else {
    const uint8_t byte = tb[byte_at(n, j)];
    return fmt == kQ8_0 ? static_cast<int8_t>(byte) : byte;
  }
}

// d_w and the offset m_w (Q8_0: none) of column n in a tile block.
template <Format fmt>
inline float tile_scale(const uint8_t* tb, int64_t n) {
  const uint8_t* at = tb + tile_weight_bytes(fmt) + n * scale_bytes(fmt);
  if constexpr (scale_bytes(fmt) == 2) return half_bits_to_float(at);
  float v;
  std::memcpy(&v, at, 4);
  return v;
}
template <Format fmt>
inline float tile_offset(const uint8_t* tb, int64_t n) {
  if constexpr (fmt == kQ8_0) return 0.f;
  if constexpr (fmt == kQ5_0) return -16.f * tile_scale<fmt>(tb, n);
  const uint8_t* at = tb + tile_weight_bytes(fmt) + (TILE_N + n) * scale_bytes(fmt);
  if constexpr (fmt == kQ4_1) return half_bits_to_float(at);
  float v;
  std::memcpy(&v, at, 4);
  return v;
}
// Q6_K32: the int8 scale of sub-block s (weights 16s..16s+15) of column n.
inline int tile_subscale(const uint8_t* tb, int64_t n, int s) {
  int16_t v;
  std::memcpy(&v, tb + tile_weight_bytes(kQ6_K32) + (1 + s) * TILE_N * 4 + n * 4, 2);
  return v;
}

// ---- scalar path (any CPU) ----

template <Format fmt>
void gemm_scalar(const QuantizedX& qx, const uint8_t* tiles, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  constexpr int64_t TB = tile_block_bytes(fmt);
  const int64_t nb = K / QK;
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const uint8_t* tile = tiles + ti * nb * TB;
      const int64_t n0 = ti * TILE_N, cols = std::min(TILE_N, N - n0);
      for (int64_t n = 0; n < cols; ++n) {
        for (int64_t m = 0; m < M; ++m) {
          float acc = 0.f;
          for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* tb = tile + b * TB;
            const int8_t* xq = qx.q.data() + m * K + b * QK;
            int32_t sumi = 0;
            if constexpr (fmt == kQ6_K32) {
              for (int j = 0; j < QK; ++j)
                sumi += tile_subscale(tb, n, j / 16) * (tile_weight<fmt>(tb, n, j) - 32) * xq[j];
            } else {
              for (int j = 0; j < QK; ++j) sumi += tile_weight<fmt>(tb, n, j) * xq[j];
            }
            acc += static_cast<float>(sumi) * (tile_scale<fmt>(tb, n) * qx.d[m * nb + b]);
            if constexpr (fmt != kQ8_0 && fmt != kQ6_K32) acc += tile_offset<fmt>(tb, n) * qx.s[m * nb + b];
          }
          y[m * N + n0 + n] = acc + (bias ? bias[n0 + n] : 0.f);
        }
      }
    }
  });
}

#ifdef Q8_X86
// ---- x panels: R rows, per block x4[b][g][r] = the 4 quants of row r at weights 4g..4g+3 (plus 128
// each, for Q8_0 on VNNI), dx[b][r], sx[b][r], and for Q6_K32 halves[b][r] = the sums of the
// block's two halves of quants as an int16 pair; rows past M are zero with zero scales ----

struct Panels {
  int64_t count = 0;
  std::unique_ptr<int32_t[]> x4;  // [panel][b][8][rows]
  std::unique_ptr<float[]> dx, sx;  // [panel][b][rows]
  std::unique_ptr<int32_t[]> halves;  // [panel][b][rows], or none
};

// x quantized straight into panels (one pass over x, no [M, K] int8 copy in between), each block as
// quantize_x quantizes it.
Panels quantize_panels(const float* x, int64_t M, int64_t K, int rows, bool plus128, bool halves) {
  const int64_t nb = K / QK;
  Panels p;
  p.count = (M + rows - 1) / rows;
  const int64_t n = p.count * nb * rows;
  p.x4.reset(new int32_t[n * 8]);
  p.dx.reset(new float[n]);
  p.sx.reset(new float[n]);
  if (halves) p.halves.reset(new int32_t[n]);
  at::parallel_for(0, p.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(K);
    std::vector<float> d(nb), s(nb);
    for (int64_t i = begin; i < end; ++i) {
      for (int r = 0; r < rows; ++r) {
        const int64_t m = i * rows + r;
        if (m < M) quantize_blocks_avx2(x + m * K, q.data(), d.data(), s.data(), 0, nb);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t at = (i * nb + b) * rows + r;
          p.dx[at] = m < M ? d[b] : 0.f;  // padding rows: products of zero scales
          p.sx[at] = m < M ? s[b] : 0.f;
          if (halves) {  // each |sum| <= 16 * 127: an int16
            int lo = 0, hi = 0;
            for (int j = 0; m < M && j < 16; ++j) {
              lo += q[b * QK + j];
              hi += q[b * QK + 16 + j];
            }
            p.halves[at] =
                static_cast<int32_t>((static_cast<uint32_t>(hi) << 16) | (static_cast<uint32_t>(lo) & 0xFFFFu));
          }
          for (int g = 0; g < 8; ++g) {
            uint32_t v = 0;
            if (m < M) std::memcpy(&v, q.data() + b * QK + g * 4, 4);
            // int8 + 128 as uint8 is the byte with its top bit flipped.
            if (plus128) v ^= 0x80808080u;
            p.x4[((i * nb + b) * 8 + g) * rows + r] = static_cast<int32_t>(v);
          }
        }
      }
    }
  });
  return p;
}

// ---- the register-tiled kernels ----

// Where a kernel call's results go: rows x cols of y (leading dimension ldy) at the tile's first
// column, plus the bias of those columns (or none).
struct Out {
  float* y;
  int64_t ldy;
  int rows, cols;
  const float* bias;
};

// d_w and m_w of a tile block's 16 columns, whose scales start at `scales` (Q8_0 and Q6_K32 have no
// m_w: theirs come out of the integer sums).
template <Format fmt>
Q8_VNNI inline void block_scales_512(const uint8_t* scales, __m512& dw, __m512& mw) {
  if constexpr (scale_bytes(fmt) == 4) {
    dw = _mm512_loadu_ps(scales);
    mw = fmt == kQ6_K32 ? _mm512_setzero_ps() : _mm512_loadu_ps(scales + 64);
  } else {
    dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
    mw = fmt == kQ4_1   ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)))
         : fmt == kQ5_0 ? _mm512_mul_ps(dw, _mm512_set1_ps(-16.f))
                        : _mm512_setzero_ps();
  }
}

// out[r * 16 + j] = panel row r . tile column j. Per block, int32 sums per (row, column), then
// scaled by d_w (a vector of 16 columns) times d_x (a broadcast). vpdpbusd sums into int32 lanes, so
// no format needs the AVX2 kernels' intermediate widening; Q6_K32 keeps one sum per sub-block of 16
// (groups 0..3 and 4..7) and scales each by its int8 scale before the offset of 32 comes off.
template <Format fmt, int R>
Q8_VNNI void tile_kernel_vnni(const uint8_t* tile, const int32_t* x4, const float* dx, const float* sx,
                              const int32_t* halves, int64_t nb, const Out& out) {
  constexpr int64_t TB = tile_block_bytes(fmt), WB = tile_weight_bytes(fmt);
  constexpr bool sub_blocks = fmt == kQ6_K32;
  constexpr int kSums = sub_blocks ? 2 : 1;
  __m512 fa[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) fa[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = tile + b * TB;
    const int32_t* xb = x4 + b * 8 * R;
    __m512i ia[kSums][R];  // [sub-block][row]
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < kSums; ++s) ia[s][r] = _mm512_setzero_si512();
    if constexpr (nibbles(fmt)) {
      const __m512i mask = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(wb + p * 64);
        const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) ia[0][r] = _mm512_dpbusd_epi32(ia[0][r], lo, _mm512_set1_epi32(xb[p * R + r]));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) ia[0][r] = _mm512_dpbusd_epi32(ia[0][r], hi, _mm512_set1_epi32(xb[(p + 4) * R + r]));
      }
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const __m512i wv = _mm512_loadu_si512(wb + g * 64);
        const int s = sub_blocks && g >= 4 ? 1 : 0;  // Q6_K32: weights 16..31 are the second sub-block
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512i xv = _mm512_set1_epi32(xb[g * R + r]);
          if constexpr (fmt != kQ8_0) ia[s][r] = _mm512_dpbusd_epi32(ia[s][r], wv, xv);
          else ia[s][r] = _mm512_dpbusd_epi32(ia[s][r], xv, wv);  // (x + 128) unsigned times signed weights
        }
      }
    }
    const uint8_t* scales = wb + WB;
    __m512 dw, mw;
    block_scales_512<fmt>(scales, dw, mw);
    __m512i aux, sc_a, sc_b, sc_ab;  // Q8_0: 128 * sum(q_w); Q6_K32: the sub-blocks' scales
    if constexpr (fmt == kQ8_0) {
      aux = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32))), 7);
    } else if constexpr (fmt == kQ6_K32) {
      const __m512i pair_a = _mm512_loadu_si512(scales + TILE_N * 4), pair_b = _mm512_loadu_si512(scales + 2 * TILE_N * 4);
      sc_a = _mm512_srai_epi32(pair_a, 16);  // each dword holds its scale twice: the upper copy, sign-extended
      sc_b = _mm512_srai_epi32(pair_b, 16);
      sc_ab = _mm512_mask_blend_epi16(static_cast<__mmask32>(0xAAAAAAAAu), pair_a, pair_b);  // (sc_a, sc_b)
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[b * R + r]));
      if constexpr (fmt == kQ8_0) {
        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ia[0][r], aux)), scale, fa[r]);
      } else if constexpr (fmt == kQ6_K32) {
        // sc_a * sum_a + sc_b * sum_b - 32 * (sc_a * X_a + sc_b * X_b), exact in int32
        const __m512i offset = _mm512_madd_epi16(sc_ab, _mm512_set1_epi32(halves[b * R + r]));
        const __m512i sum = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_mullo_epi32(ia[0][r], sc_a), _mm512_mullo_epi32(ia[1][r], sc_b)),
            _mm512_slli_epi32(offset, 5));
        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, fa[r]);
      } else {
        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[0][r]), scale, fa[r]);
        fa[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx[b * R + r]), fa[r]);
      }
    }
  }
  const __mmask16 cols = static_cast<__mmask16>((1u << out.cols) - 1);
  const __m512 bias = out.bias ? _mm512_maskz_loadu_ps(cols, out.bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    if (r < out.rows) _mm512_mask_storeu_ps(out.y + r * out.ldy, cols, _mm512_add_ps(fa[r], bias));
}

// d_w and m_w of half h (columns 8h..8h+7) of a tile block whose scales start at `scales` (Q8_0's
// m_w is unused: the sign moves onto x).
template <Format fmt>
Q8_AVX2 inline void half_scales_avx2(const uint8_t* scales, int h, __m256& dw, __m256& mw) {
  if constexpr (scale_bytes(fmt) == 4) {  // float32 d; Q6_K32 has no m (its offset comes out of the integer sum)
    dw = _mm256_loadu_ps(reinterpret_cast<const float*>(scales) + h * 8);
    mw = fmt == kQ6_K32 ? _mm256_setzero_ps() : _mm256_loadu_ps(reinterpret_cast<const float*>(scales + 64) + h * 8);
  } else {
    dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + h * 16)));
    mw = fmt == kQ4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 32 + h * 16)))
                      : _mm256_mul_ps(dw, _mm256_set1_ps(-16.f));
  }
}

// The AVX2 kernel for Q8_0, Q5_0 and one-row panels covers 8 of the tile's 16 columns (half h) per
// call: 16 ymm registers do not hold two halves' accumulators. A block is summed one row at a time
// (weights reloaded from L1): summed for all rows at once, GCC reassociated the integer adds into one tree of 48 products and spilled
// most of them. Nibbles are widened to bytes once per block into a small buffer for that. Q4_1
// products are at most 2 * 15 * 127 per 16-bit lane, so a block's 8 groups add up in 16 bits
// (< 32767) and widen once; Q5_0's and Q5_1F's (2 * 31 * 127) widen every 4 groups; Q6_K32's
// (2 * 63 * 127) every 2 groups, through vpmaddwd with their sub-block's scale (the widening and the
// scaling in one).
template <Format fmt, int R>
Q8_AVX2 void tile_kernel_avx2(const uint8_t* tile, int h, const int32_t* x4, const float* dx, const float* sx,
                              const int32_t* halves, int64_t nb, const Out& out) {
  constexpr int64_t TB = tile_block_bytes(fmt), WB = tile_weight_bytes(fmt);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t widened[8 * 32];
  __m256 fa[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) fa[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tb = tile + b * TB;
    const uint8_t* wb = tb + h * 32;
    int64_t stride = 64;  // bytes from one group's 8 columns to the next group's
    if constexpr (nibbles(fmt)) {
      const __m256i mask = _mm256_set1_epi8(0x0F);
      for (int p = 0; p < 4; ++p) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + p * 64));
        _mm256_store_si256(reinterpret_cast<__m256i*>(widened + p * 32), _mm256_and_si256(v, mask));
        _mm256_store_si256(reinterpret_cast<__m256i*>(widened + (p + 4) * 32),
                           _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
      }
      wb = widened;
      stride = 32;
    }
    const int32_t* xb = x4 + b * 8 * R;
    const uint8_t* scales = tb + WB;
    __m256 dw, mw;
    half_scales_avx2<fmt>(scales, h, dw, mw);
    __m256i sc_a, sc_b, sc_ab;  // Q6_K32: (sc_a, sc_a), (sc_b, sc_b) and (sc_a, sc_b) per column
    if constexpr (fmt == kQ6_K32) {
      sc_a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + TILE_N * 4 + h * 32));
      sc_b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 2 * TILE_N * 4 + h * 32));
      sc_ab = _mm256_blend_epi16(sc_a, sc_b, 0xAA);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m256i sum;
      if constexpr (nibbles(fmt)) {
        __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + g * stride));
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(xb[g * R + r])));
        }
        sum = _mm256_madd_epi16(s16, ones);
      } else if constexpr (fmt == kQ5_0 || fmt == kQ5_1F) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * stride));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (g + 4) * stride));
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(w0, _mm256_set1_epi32(xb[g * R + r])));
          hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(w1, _mm256_set1_epi32(xb[(g + 4) * R + r])));
        }
        sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
      } else if constexpr (fmt == kQ6_K32) {
        sum = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int g = 0; g < 8; g += 2) {
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * stride));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (g + 1) * stride));
          const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(xb[g * R + r])),
                                               _mm256_maddubs_epi16(w1, _mm256_set1_epi32(xb[(g + 1) * R + r])));
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(s16, g < 4 ? sc_a : sc_b));
        }
        // The weights' offset of 32: minus 32 * (sc_a * X_a + sc_b * X_b).
        const __m256i offset = _mm256_madd_epi16(sc_ab, _mm256_set1_epi32(halves[b * R + r]));
        sum = _mm256_sub_epi32(sum, _mm256_slli_epi32(offset, 5));
      } else {
        sum = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * stride));
          const __m256i sxv = _mm256_sign_epi8(_mm256_set1_epi32(xb[g * R + r]), wv);
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), sxv), ones));
        }
      }
      const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx[b * R + r]));
      fa[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, fa[r]);
      if constexpr (fmt != kQ8_0 && fmt != kQ6_K32) fa[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx[b * R + r]), fa[r]);
    }
  }
  const int cols = std::min(8, out.cols - h * 8);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 bias = out.bias ? _mm256_maskload_ps(out.bias + h * 8, mask) : _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    if (r < out.rows) _mm256_maskstore_ps(out.y + r * out.ldy + h * 8, mask, _mm256_add_ps(fa[r], bias));
}

// AVX2 for the nibble formats (Q4_1, Q4_1F) and panels of 2 or more rows: both halves of a tile
// per call, so each block's weights are loaded and unpacked once per panel and each x broadcast
// serves 16 columns (the per-half kernel above loads every weight once per row and broadcasts x
// twice). The 16-bit sums of R rows x 2 halves stay in registers for a block; the float
// accumulators live in L1 (touched once a block). The integer sums are exact and the float steps
// are the per-half kernel's in the same order, so the results are bit for bit the same. One row
// keeps the per-half kernel, which ran faster there.
template <Format fmt, int R>
Q8_AVX2 void tile_kernel_avx2_nibbles(const uint8_t* tile, const int32_t* x4, const float* dx, const float* sx,
                                      int64_t nb, const Out& out) {
  static_assert(nibbles(fmt), "nibble formats only");
  constexpr int64_t TB = tile_block_bytes(fmt), WB = tile_weight_bytes(fmt);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float acc[R][16];
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(acc[r], _mm256_setzero_ps());
    _mm256_store_ps(acc[r] + 8, _mm256_setzero_ps());
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = tile + b * TB;
    const int32_t* xb = x4 + b * 8 * R;
    __m256i s16[R][2];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      // group g < 4: low nibbles of dword row g; g >= 4: high nibbles of dword row g - 4.
      const uint8_t* wp = wb + (g & 3) * 64;
      __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
      if (g >= 4) {
        w0 = _mm256_srli_epi16(w0, 4);
        w1 = _mm256_srli_epi16(w1, 4);
      }
      w0 = _mm256_and_si256(w0, mask);
      w1 = _mm256_and_si256(w1, mask);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_set1_epi32(xb[g * R + r]);
        s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_maddubs_epi16(w0, xv));
        s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_maddubs_epi16(w1, xv));
        // Keep each sum a chain in its register: left free, GCC reassociates the adds of all rows
        // into trees and spills.
        asm("" : "+x"(s16[r][0]), "+x"(s16[r][1]));
      }
    }
    const uint8_t* scales = wb + WB;
    __m256 dw[2], mw[2];
    half_scales_avx2<fmt>(scales, 0, dw[0], mw[0]);
    half_scales_avx2<fmt>(scales, 1, dw[1], mw[1]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 dxr = _mm256_set1_ps(dx[b * R + r]), sxr = _mm256_set1_ps(sx[b * R + r]);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r][h], ones));
        __m256 a = _mm256_load_ps(acc[r] + h * 8);
        a = _mm256_fmadd_ps(sum, _mm256_mul_ps(dw[h], dxr), a);
        a = _mm256_fmadd_ps(mw[h], sxr, a);
        _mm256_store_ps(acc[r] + h * 8, a);
      }
    }
  }
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(out.cols - h * 8), lanes);
    const __m256 bias = out.bias ? _mm256_maskload_ps(out.bias + h * 8, m) : _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      if (r < out.rows)
        _mm256_maskstore_ps(out.y + r * out.ldy + h * 8, m, _mm256_add_ps(_mm256_load_ps(acc[r] + h * 8), bias));
  }
}

// Every tile against every panel of R rows; threads split the tiles, so each tile's weights are
// read from memory once and stay in L1 while the panels stream past.
template <Format fmt, Path P, int R>
void run_tiles(const uint8_t* tiles, const Panels& panels, const float* bias, float* y, int64_t M, int64_t N,
               int64_t nb) {
  constexpr int64_t TB = tile_block_bytes(fmt);
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const uint8_t* tile = tiles + ti * nb * TB;
      const int64_t n0 = ti * TILE_N;
      const int cols = static_cast<int>(std::min(TILE_N, N - n0));
      for (int64_t p = 0; p < panels.count; ++p) {
        const int32_t* x4 = panels.x4.get() + p * nb * 8 * R;
        const float* dx = panels.dx.get() + p * nb * R;
        const float* sx = panels.sx.get() + p * nb * R;
        const int32_t* halves = panels.halves ? panels.halves.get() + p * nb * R : nullptr;
        const Out out{y + p * R * N + n0, N, static_cast<int>(std::min<int64_t>(R, M - p * R)), cols,
                      bias ? bias + n0 : nullptr};
        if constexpr (P == kVnni) {
          tile_kernel_vnni<fmt, R>(tile, x4, dx, sx, halves, nb, out);
        } else if constexpr (nibbles(fmt) && R > 1) {
          tile_kernel_avx2_nibbles<fmt, R>(tile, x4, dx, sx, nb, out);
        } else {
          tile_kernel_avx2<fmt, R>(tile, 0, x4, dx, sx, halves, nb, out);
          if (cols > 8) tile_kernel_avx2<fmt, R>(tile, 1, x4, dx, sx, halves, nb, out);
        }
      }
    }
  });
}

template <Format fmt, Path P>
void gemm_isa(const float* x, const uint8_t* tiles, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int full = P == kVnni ? VNNI_ROWS : AVX2_ROWS;
  const int R = M <= SMALL_ROWS ? static_cast<int>(M) : full;
  const Panels panels = quantize_panels(x, M, K, R, P == kVnni && fmt == kQ8_0, fmt == kQ6_K32);
  const int64_t nb = K / QK;
  switch (R) {
    case 1: run_tiles<fmt, P, 1>(tiles, panels, bias, y, M, N, nb); break;
    case 2: run_tiles<fmt, P, 2>(tiles, panels, bias, y, M, N, nb); break;
    case 3: run_tiles<fmt, P, 3>(tiles, panels, bias, y, M, N, nb); break;
    case 4: run_tiles<fmt, P, 4>(tiles, panels, bias, y, M, N, nb); break;
    default: run_tiles<fmt, P, full>(tiles, panels, bias, y, M, N, nb); break;
  }
}

// ---- AMX: 16-row panels, one tile multiply a block ----
//
// tdpbssd multiplies 16 rows of x's block (a tile of 16 x 32 bytes) by the tile block's weights as
// they are packed (8 rows of 16 dwords, each 4 consecutive weights of one column: the layout it takes
// for its second operand) into 16 x 16 int32 sums, signed bytes on both sides (Q8_0 needs no +128).
// The sums go back to memory and the block's scales apply as in the VNNI kernel. Nibble tiles are
// widened to bytes once per tile, for all of K, and serve every panel. Q6_K32 (two scaled sums a
// block) and panels of few rows keep the VNNI kernels.
constexpr int AMX_ROWS = 16;
// Fewer rows than this run the VNNI kernels: a nibble tile's widening pays off from three panels on.
constexpr int64_t amx_min_rows(Format fmt) { return nibbles(fmt) ? 48 : 16; }
constexpr int64_t WIDENED_BLOCK = 8 * TILE_N * 4;  // a block of a tile as bytes: 8 rows of 64

// x as the AMX kernel reads it: q [panel][b][16 rows][32] int8 (one tile's rows, contiguous), dx and
// sx [panel][b][16]; rows past M are zero with zero scales.
struct AmxPanels {
  int64_t count = 0;
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> dx, sx;
};

AmxPanels quantize_amx_panels(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  AmxPanels p;
  p.count = (M + AMX_ROWS - 1) / AMX_ROWS;
  const int64_t n = p.count * nb * AMX_ROWS;
  p.q.reset(new int8_t[n * QK]);
  p.dx.reset(new float[n]);
  p.sx.reset(new float[n]);
  at::parallel_for(0, p.count * AMX_ROWS, AMX_ROWS, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(K);
    std::vector<float> d(nb), s(nb);
    for (int64_t m = begin; m < end; ++m) {
      if (m < M) {
        quantize_blocks_avx2(x + m * K, q.data(), d.data(), s.data(), 0, nb);
      } else {
        std::fill(q.begin(), q.end(), 0);
        std::fill(d.begin(), d.end(), 0.f);
        std::fill(s.begin(), s.end(), 0.f);
      }
      const int64_t panel = m / AMX_ROWS, r = m % AMX_ROWS;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = (panel * nb + b) * AMX_ROWS + r;
        std::memcpy(p.q.get() + at * QK, q.data() + b * QK, QK);
        p.dx[at] = d[b];
        p.sx[at] = s[b];
      }
    }
  });
  return p;
}

// The 64-byte tile configuration (palette 1), two sets of three tiles: tmm0 and tmm3 x (16 rows x 32
// bytes), tmm1 and tmm4 the weights (8 rows x 64 bytes), tmm2 and tmm5 the sums (16 rows x 16 int32).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {QK, TILE_N * 4, TILE_N * 4, QK, TILE_N * 4, TILE_N * 4};
  uint8_t rows[16] = {AMX_ROWS, 8, AMX_ROWS, AMX_ROWS, 8, AMX_ROWS};
};

// The tile configuration and its release, in functions built for AMX: the intrinsics inline only into
// code compiled for AMX, which the threads' lambda in gemm_amx is not where -march=native lacks it.
Q8_AMX void amx_configure(const TileConfig& config) { AMX_CONFIGURE(&config); }
Q8_AMX void amx_release() { AMX_RELEASE(); }

// A nibble tile's blocks as bytes in the byte formats' layout: dword row p's low nibbles are
// weights 4p..4p+3 (row p), its high nibbles weights 16+4p.. (row p + 4).
Q8_AMX void widen_nibble_tile(const uint8_t* tile, int64_t TB, int64_t nb, uint8_t* out) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(tile + b * TB + p * 64);
      _mm512_storeu_si512(out + b * WIDENED_BLOCK + p * 64, _mm512_and_si512(v, mask));
      _mm512_storeu_si512(out + b * WIDENED_BLOCK + (p + 4) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
    }
  }
}

// One tile's 16 columns against a panel of 16 rows: weights block b at weights + b * wstride (the
// tile itself, or its widened copy), its scales in the tile. Software-pipelined in three stages, so
// nothing waits on the step just before it: at step b the tile multiply of block b is issued (tiles
// 0-2 for even b, 3-5 for odd), the sums of block b - 1 (done by now) are stored, and the float steps
// read the sums of block b - 2, stored a step earlier (loads that follow a tile store closely wait
// for it to reach the cache).
template <Format fmt>
Q8_AMX void tile_kernel_amx(const uint8_t* weights, int64_t wstride, const uint8_t* tile, const int8_t* xq,
                            const float* dx, const float* sx, int64_t nb, const Out& out) {
  static_assert(fmt != kQ6_K32, "Q6_K32 runs the VNNI kernel");
  constexpr int64_t TB = tile_block_bytes(fmt), WB = tile_weight_bytes(fmt);
  alignas(64) int32_t sums[2][AMX_ROWS * TILE_N];
  __m512 fa[AMX_ROWS];
#pragma GCC unroll 16
  for (int r = 0; r < AMX_ROWS; ++r) fa[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb + 2; ++b) {
    if (b < nb) {
      const int8_t* xb = xq + b * AMX_ROWS * QK;
      const uint8_t* wb = weights + b * wstride;
      if (b & 1) {
        AMX_ZERO(5);
        AMX_LOAD(3, xb, QK);
        AMX_LOAD(4, wb, TILE_N * 4);
        AMX_DPBSSD(5, 3, 4);
      } else {
        AMX_ZERO(2);
        AMX_LOAD(0, xb, QK);
        AMX_LOAD(1, wb, TILE_N * 4);
        AMX_DPBSSD(2, 0, 1);
      }
    }
    if (b >= 1 && b <= nb) {
      if ((b - 1) & 1) AMX_STORE(5, sums[1], TILE_N * 4);
      else AMX_STORE(2, sums[0], TILE_N * 4);
    }
    if (b < 2) continue;
    const int64_t done = b - 2;
    __m512 dw, mw;
    block_scales_512<fmt>(tile + done * TB + WB, dw, mw);
    const int32_t* sb = sums[done & 1];
    const float* dxb = dx + done * AMX_ROWS;
    const float* sxb = sx + done * AMX_ROWS;
#pragma GCC unroll 16
    for (int r = 0; r < AMX_ROWS; ++r) {
      const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dxb[r]));
      fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sb + r * TILE_N)), scale, fa[r]);
      if constexpr (fmt != kQ8_0) fa[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sxb[r]), fa[r]);
    }
  }
  const __mmask16 cols = static_cast<__mmask16>((1u << out.cols) - 1);
  const __m512 bias = out.bias ? _mm512_maskz_loadu_ps(cols, out.bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < AMX_ROWS; ++r)
    if (r < out.rows) _mm512_mask_storeu_ps(out.y + r * out.ldy, cols, _mm512_add_ps(fa[r], bias));
}

// Threads split the tiles, as run_tiles does; each thread loads the tile configuration for itself
// (it is per thread) and releases its tiles when done.
template <Format fmt>
void gemm_amx(const float* x, const uint8_t* tiles, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t TB = tile_block_bytes(fmt);
  const int64_t nb = K / QK;
  const AmxPanels panels = quantize_amx_panels(x, M, K);
  at::parallel_for(0, (N + TILE_N - 1) / TILE_N, 1, [&](int64_t begin, int64_t end) {
    amx_configure(TileConfig{});
    std::vector<uint8_t> widened(nibbles(fmt) ? nb * WIDENED_BLOCK : 0);
    for (int64_t ti = begin; ti < end; ++ti) {
      const uint8_t* tile = tiles + ti * nb * TB;
      const uint8_t* weights = tile;
      int64_t wstride = TB;
      if constexpr (nibbles(fmt)) {
        widen_nibble_tile(tile, TB, nb, widened.data());
        weights = widened.data();
        wstride = WIDENED_BLOCK;
      }
      const int64_t n0 = ti * TILE_N;
      const int cols = static_cast<int>(std::min(TILE_N, N - n0));
      for (int64_t p = 0; p < panels.count; ++p) {
        const int64_t at = p * nb * AMX_ROWS;
        const Out out{y + p * AMX_ROWS * N + n0, N, static_cast<int>(std::min<int64_t>(AMX_ROWS, M - p * AMX_ROWS)),
                      cols, bias ? bias + n0 : nullptr};
        tile_kernel_amx<fmt>(weights, wstride, tile, panels.q.get() + at * QK, panels.dx.get() + at,
                             panels.sx.get() + at, nb, out);
      }
    }
    amx_release();
  });
}
#endif  // Q8_X86

template <Format fmt>
void gemm_q8(Path path, const float* x, const uint8_t* tiles, const float* bias, float* y, int64_t M, int64_t N,
             int64_t K) {
#ifdef Q8_X86
  if constexpr (fmt != kQ6_K32)
    if (path == kAmx && M >= amx_min_rows(fmt)) return gemm_amx<fmt>(x, tiles, bias, y, M, N, K);
  if (path == kAmx || path == kVnni) return gemm_isa<fmt, kVnni>(x, tiles, bias, y, M, N, K);
  if (path == kAvx2) return gemm_isa<fmt, kAvx2>(x, tiles, bias, y, M, N, K);
#endif
  gemm_scalar<fmt>(quantize_x(x, M, K, path), tiles, bias, y, M, N, K);
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) % QK == 0, "rows of x must be whole blocks of 32 values");
}

void check_format(int64_t fmt) {
  TORCH_CHECK(fmt >= kQ4_1 && fmt <= kQ5_1F, "8-bit activations take Q4_1 (0), Q8_0 (1), Q5_0 (2), Q4_1F (3), "
              "Q6_K32 (4) or Q5_1F (5) weights, not format ", fmt);
}

// Tiles as gguf_q8_pack makes them for N outputs of K inputs.
void check_tiles(const torch::Tensor& tiles, int64_t fmt, int64_t N, int64_t K) {
  check_format(fmt);
  TORCH_CHECK(tiles.device().is_cpu() && tiles.scalar_type() == torch::kUInt8 && tiles.is_contiguous() &&
              tiles.dim() == 2, "q8 tiles must be a contiguous 2-D uint8 CPU tensor");
  TORCH_CHECK(N >= 0 && K % QK == 0 && tiles.size(0) == (N + TILE_N - 1) / TILE_N &&
              tiles.size(1) == K / QK * tile_block_bytes(static_cast<Format>(fmt)),
              "q8 tiles do not match ", N, " outputs of ", K, " inputs");
}

}  // namespace

// weight: GGUF blocks [N, K / 32 * block bytes] uint8 (fmt 0 = Q4_1, 1 = Q8_0, 2 = Q5_0, 3 = Q4_1 with
// float32 d and m, 24 bytes: d, m, the 16 bytes of nibbles; 4 = Q6_K32, 38 bytes: float32 d, the two
// int8 sub-block scales, the 32 quants 0..63 in order; 5 = Q5_1F, 40 bytes: float32 d and m, the 32
// quants 0..31 in order). Returns the tiles the q8 kernels read:
// [ceil(N / 16), K / 32 * tile block bytes] uint8 (the layout at the top of this file).
torch::Tensor gguf_q8_pack(torch::Tensor weight, int64_t fmt) {
  check_format(fmt);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() &&
              weight.dim() == 2, "GGUF weights must be a contiguous 2-D uint8 CPU tensor");
  const int64_t N = weight.size(0), bytes = block_bytes(static_cast<Format>(fmt));
  TORCH_CHECK(weight.size(1) % bytes == 0, "weight rows are not whole blocks of format ", fmt);
  const int64_t nb = weight.size(1) / bytes;
  auto tiles = torch::zeros({(N + TILE_N - 1) / TILE_N, nb * tile_block_bytes(static_cast<Format>(fmt))},
                            torch::kUInt8);
  with_format(fmt, [&](auto f) {
    pack_tiles<decltype(f)::value>(weight.data_ptr<uint8_t>(), N, nb, tiles.data_ptr<uint8_t>());
  });
  return tiles;
}

// x: [M, K] float32; tiles: gguf_q8_pack of [N, K] weights in format fmt; bias: [N] float32 or empty;
// path: -1 = the best this CPU has, else 0 scalar, 1 AVX2, 2 AVX-512 VNNI, 3 AMX (VNNI for Q6_K32 and
// for few rows: amx_min_rows).
// Returns [M, N] float32 computed with x quantized to 8 bits per block of 32.
torch::Tensor gguf_linear_q8(torch::Tensor x, torch::Tensor tiles, int64_t fmt, int64_t N, torch::Tensor bias,
                             int64_t path) {
  check_x(x);
  const int64_t K = x.size(1), M = x.size(0);
  check_tiles(tiles, fmt, N, K);
  TORCH_CHECK(bias.numel() == 0 || (bias.device().is_cpu() && bias.scalar_type() == torch::kFloat32 &&
                                    bias.numel() == N && bias.is_contiguous()),
              "bias must be empty or [N] float32 on the CPU");
  const Path p = resolve_path(path);
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  with_format(fmt, [&](auto f) {
    gemm_q8<decltype(f)::value>(p, x.data_ptr<float>(), tiles.data_ptr<uint8_t>(), b, y.data_ptr<float>(), M, N, K);
  });
  return y;
}

// The float32 weights of output rows `rows` ([R] int64, each in [0, N)) read back from q8 tiles:
// [R, K], as the GGUF dequantizers compute them (q * d + m; Q5_0 (q - 16) * d; Q8_0 q * d + 0).
// A tied embedding looks its tokens up here from the logits head's tiles.
torch::Tensor gguf_q8_weight_rows(torch::Tensor tiles, int64_t fmt, int64_t N, int64_t K, torch::Tensor rows) {
  check_tiles(tiles, fmt, N, K);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kInt64 && rows.dim() == 1,
              "rows must be a 1-D int64 CPU tensor");
  rows = rows.contiguous();
  const int64_t R = rows.size(0), nb = K / QK;
  const int64_t* ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < N, "a row index is out of range");
  auto out = torch::empty({R, K}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  with_format(fmt, [&](auto f) {
    constexpr Format F = decltype(f)::value;
    constexpr int64_t TB = tile_block_bytes(F);
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = ids[i] % TILE_N;
        const uint8_t* tile = t + (ids[i] / TILE_N) * nb * TB;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* tb = tile + b * TB;
          const float d = tile_scale<F>(tb, n), m = F == kQ6_K32 ? 0.f : tile_offset<F>(tb, n);
          float* ob = o + i * K + b * QK;
          for (int j = 0; j < QK; ++j) {
            const int q = tile_weight<F>(tb, n, j);
            if constexpr (F == kQ5_0) ob[j] = static_cast<float>(q - 16) * d;
            // ggml's order: (d * scale) * (q - 32), each product rounded
            else if constexpr (F == kQ6_K32)
              ob[j] = (d * static_cast<float>(tile_subscale(tb, n, j / 16))) * static_cast<float>(q - 32);
            // q * d is exact (4 bits times an fp16 d; Q4_1F's d is an fp16 times a 6-bit scale), so
            // whether the compiler fuses the add or not, this rounds once, as the dequantizers do.
            else ob[j] = static_cast<float>(q) * d + m;
          }
        }
      }
    });
  });
  return out;
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

// The kernel paths this CPU can run, in increasing order of preference (0 scalar, 1 AVX2, 2 VNNI, 3 AMX).
std::vector<int64_t> gguf_q8_paths() { return available_paths(); }
