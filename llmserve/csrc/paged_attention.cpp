// One paged attention kernel for every sequence of a step: decodes (1 query token), speculative
// verifies (k+1 tokens) and prefill chunks over a cached prefix, in one call per layer, reading
// K/V straight out of the paged cache (no gathered context, no dense mask).
//
// Work is cut into tasks: a decode is one task per (sequence, KV head); a multi-token query is one
// task per (sequence, KV head, tile of queries), the tile's rows being its queries x the group's
// query heads. Tasks are sorted by estimated cost (longest first) and pulled from a shared counter
// by the pool's threads, so one long chunk beside many short decodes still keeps every core busy.
//
// The cache may be stored narrower than the queries (float32 queries over a bfloat16, float16 or
// 8-bit float cache, --kv-cache-dtype): K/V are widened to float as they are read, all arithmetic is
// float32. The 8-bit formats are torch's float8_e4m3fn and float8_e5m2, with no scale (as vLLM's
// fp8 cache without calibrated scales): both widen through the float16 converter, e5m2 being
// float16's upper byte and e4m3 a float16 pattern at 2^-8 of its value (that factor is applied to
// the query and the output rather than to every value read).
//
// Decode tasks with float32 queries (AVX2, head size % 32 == 0, <= 8 query heads per KV head) take a
// two-pass path (all scores, one softmax, then V with the accumulators in registers), each pass
// walking the scattered blocks in order with the next block prefetched; when there are decodes enough for every
// thread, one task takes all of a sequence's KV heads. Every other task is
// flash-attention style: the context is walked a tile of keys at a time with an online softmax,
// tiles that no query of the task may see are never touched, and within a tile each pair of rows
// only scores the keys one of them can see (the causal part).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Shape {
  int64_t H, KVH, G, D, row;  // query heads, KV heads, query heads per KV head, head size, KVH * D
  int64_t block_size, table_width, q_stride, window;
  float scale, cap;  // cap <= 0: no soft cap
  // Optional [B, H, logits_len] output: each decode row's attention logits (scaled, soft-capped
  // where the layer caps) at the positions it attends, for the KV policies that score tokens.
  float* logits = nullptr;
  int64_t logits_len = 0;
};

// Where a decode's logits for query head h of KV head g of sequence b go (nullptr: not asked).
inline float* logits_row(const Shape& sh, int64_t b, int64_t g) {
  return sh.logits ? sh.logits + (b * sh.H + g * sh.G) * sh.logits_len : nullptr;
}

struct Task {
  int64_t cost;
  int32_t b, g, q0, q1;  // sequence, (first) KV head, its query rows [q0, q1) counted from its first
  int32_t nkv;  // KV heads from g (the vector decode path takes several; every other task one)
  bool decode;  // the vector decode path
  bool one_query;  // the sequence has one new token (a decode, on whichever path)
};

// Per-thread buffers, grown on demand and kept across the thread's tasks.
struct Scratch {
  std::vector<float> q, acc, m, l, s, kst, vst, zeros, scores;
  std::vector<const float*> kp, vp;
  std::vector<int32_t> pos;  // the lanes path's row positions
#ifdef LLMSERVE_VEC_AVX2
  std::vector<__m256> part;  // the vector decode's partial dot products, 8 a head
  std::vector<float> sums;  // the vector decode's softmax denominators, one a head
#endif
};

inline float cap_scalar(float s, float cap) { return cap * std::tanh(s / cap); }

#ifdef LLMSERVE_VEC_AVX2
// tanh through exp8: tanh|x| = 1 - 2 / (e^(2|x|) + 1), sign put back. Its error is absolute
// (~1e-7), which is what a softmax input cares about.
inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 e = llmserve::exp8(_mm256_add_ps(ax, ax));
  const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
  return _mm256_or_ps(t, _mm256_and_ps(sign, x));
}

#endif

template <typename T>
constexpr bool is_fp8() {
  return std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;
}

// What the vector loads below return for a cache value of 1: e4m3 widens to its value x 2^-8.
template <typename T>
constexpr float cache_unit() {
  return std::is_same_v<T, c10::Float8_e4m3fn> ? 256.f : 1.f;
}

#ifdef LLMSERVE_VEC_AVX2
// Eight 8-bit floats as float16 bit patterns, from each byte moved to the upper half of its 16
// bits (h): e5m2 is then float16 exactly; e4m3's four exponent bits are shifted into float16's
// five (sign copied down by the arithmetic shift, then cleared), which reads as its value x 2^-8.
template <typename T>
inline __m128i fp8_as_half(__m128i h) {
  if constexpr (std::is_same_v<T, c10::Float8_e5m2>) return h;
  return _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(static_cast<short>(0xBFFF)));
}

// Eight cache values widened to float32 (bfloat16 is float32's upper half; float16 through F16C;
// 8-bit floats through float16, e4m3 at cache_unit's scale).
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (is_fp8<T>()) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtph_ps(fp8_as_half<T>(_mm_unpacklo_epi8(_mm_setzero_si128(), b)));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// Sixteen cache values: one 16-byte load for the 8-bit formats, two load8 otherwise.
template <typename T>
inline void load16(const T* p, __m256& lo, __m256& hi) {
  if constexpr (is_fp8<T>()) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    lo = _mm256_cvtph_ps(fp8_as_half<T>(_mm_unpacklo_epi8(_mm_setzero_si128(), b)));
    hi = _mm256_cvtph_ps(fp8_as_half<T>(_mm_unpackhi_epi8(_mm_setzero_si128(), b)));
  } else {
    lo = load8(p);
    hi = load8(p + 8);
  }
}
#endif

// Whether the vector paths can read a cache of type T (float16 needs F16C).
template <typename T>
constexpr bool vector_readable() {
#ifdef LLMSERVE_VEC_AVX2
#ifdef __F16C__
  return true;
#else
  return !std::is_same_v<T, c10::Half> && !is_fp8<T>();
#endif
#else
  return false;
#endif
}

// s = cap * tanh(s / cap) over n entries.
inline void soft_cap(float* s, int64_t n, float cap) {
  int64_t i = 0;
#ifdef LLMSERVE_VEC_AVX2
  const __m256 c = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.f / cap);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(s + i, _mm256_mul_ps(c, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + i), inv))));
#endif
  for (; i < n; ++i) s[i] = cap_scalar(s[i], cap);
}

// ---------------------------------------------------------------------------------------------
// Decode: one (sequence, KV head) task, float32 queries.

inline void softmax_in_place(float* s, int64_t n, float& sum) {
  float m = kNegInf;
  int64_t i = 0;
#ifdef LLMSERVE_VEC_AVX2
  __m256 vm = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
  m = llmserve::hmax8(vm);
#endif
  for (; i < n; ++i) m = std::max(m, s[i]);
  sum = 0.f;
  i = 0;
#ifdef LLMSERVE_VEC_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = llmserve::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = llmserve::hsum8(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
}

// One step of a walk over a sequence's scattered blocks from position pos (< len): the cnt
// consecutive slots of pos's block from pos on, and the first next_cnt slots of the next block
// (next: nullptr and next_cnt 0 past the end), which the walk fetches ahead.
template <typename ct>
struct BlockStep {
  const ct* here;
  int64_t cnt;
  const ct* next;
  int64_t next_cnt;
};

template <typename ct>
inline BlockStep<ct> block_step(const ct* cache, const int32_t* table, int64_t pos, int64_t len, int64_t bs,
                                int64_t row) {
  const int64_t off = pos % bs, cnt = std::min(bs - off, len - pos), after = pos + cnt;
  const int64_t next_cnt = after < len ? std::min(bs, len - after) : 0;
  return {cache + (static_cast<int64_t>(table[pos / bs]) * bs + off) * row, cnt,
          next_cnt ? cache + static_cast<int64_t>(table[after / bs]) * bs * row : nullptr, next_cnt};
}

#ifdef LLMSERVE_VEC_AVX2
// The G query heads of each of nkv consecutive KV heads (qf: [nkv * G, D], scaled; the caches and
// out already offset to the first KV head) against context positions [start, len). With all the KV
// heads of a sequence in one task its K and V rows are read whole, one block after another, which
// the memory system streams far better than one head's slice of every row. Scores are reduced 8
// tokens at a time (one transpose-add instead of 8 horizontal sums; part holds the 8 partial
// vectors of every head); the weighted sum of V keeps G x 32 accumulators in registers per 32-wide
// slice of a head, walked one block at a time (acc: nkv * G * D floats carry the accumulators from
// one block to the next). out: nkv * G rows of D floats.
template <typename ct, int G>
void decode_task(const float* qf, const ct* k_cache, const ct* v_cache, const int32_t* table, int64_t start,
                 int64_t len, int64_t nkv, const Shape& sh, float* scores, __m256* part, float* sums, float* acc,
                 float* out, float* logits) {
  constexpr int64_t kLine = 64 / sizeof(ct);  // cache values per 64-byte line
  const int64_t D = sh.D, row = sh.row, bs = sh.block_size, n = len - start, padded = round_up(n, 8);
  const int64_t span = nkv * D, heads = nkv * G;  // cache values a token's task reads; query heads
  int64_t t = 0;
  for (int64_t pos = start; pos < len;) {
    // The cache is read once per step, from memory, one scattered block after another: fetch the
    // next block's K ahead (the hardware prefetcher loses the stream at every block jump).
    const BlockStep<ct> blk = block_step(k_cache, table, pos, len, bs, row);
    const int64_t cnt = blk.cnt, next_cnt = blk.next_cnt;
    const ct *kb = blk.here, *kn = blk.next;
    for (int64_t j = 0; j < cnt; ++j, ++t) {
      const ct* kp = kb + j * row;
      if (j < next_cnt)
        for (int64_t l = 0; l < span; l += kLine)
          _mm_prefetch(reinterpret_cast<const char*>(kn + j * row + l), _MM_HINT_T0);
      for (int64_t g = 0; g < nkv; ++g) {
        // Each slice of K is widened once and used by the G heads that share it.
        const ct* kg = kp + g * D;
        const float* qg = qf + g * G * D;
        __m256 a[G], b[G];
        for (int h = 0; h < G; ++h) a[h] = b[h] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          __m256 k0, k1;
          load16(kg + d, k0, k1);
          for (int h = 0; h < G; ++h) {
            a[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h * D + d), k0, a[h]);
            b[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h * D + d + 8), k1, b[h]);
          }
        }
        for (int h = 0; h < G; ++h) part[(g * G + h) * 8 + (t & 7)] = _mm256_add_ps(a[h], b[h]);
      }
      if ((t & 7) == 7)
        for (int64_t hh = 0; hh < heads; ++hh)
          _mm256_storeu_ps(scores + hh * padded + (t & ~7), llmserve::transpose_sum8(part + hh * 8));
    }
    pos += cnt;
  }
  if (n & 7) {  // the last, partial group of 8
    for (int64_t hh = 0; hh < heads; ++hh) {
      for (int64_t i = n & 7; i < 8; ++i) part[hh * 8 + i] = _mm256_setzero_ps();
      _mm256_storeu_ps(scores + hh * padded + (n & ~7), llmserve::transpose_sum8(part + hh * 8));
    }
  }
  for (int64_t hh = 0; hh < heads; ++hh) {
    if (sh.cap > 0.f) soft_cap(scores + hh * padded, n, sh.cap);
    if (logits) std::memcpy(logits + hh * sh.logits_len + start, scores + hh * padded, n * sizeof(float));
    softmax_in_place(scores + hh * padded, n, sums[hh]);
  }
  // V the same way, block by block: each (KV head, 32 columns) slice of a block is walked with G x 4
  // accumulators in registers while the same slice of the next block is fetched ahead. (Walking all
  // of the context once per slice instead, with V fetched into L2 during pass 1, was slower: the
  // fetched V did not stay in L2 beside K.) The sums run over the positions in the same order.
  for (int64_t i = 0; i < heads * D; i += 8) _mm256_storeu_ps(acc + i, _mm256_setzero_ps());
  int64_t tt = 0;
  for (int64_t pos = start; pos < len;) {
    const BlockStep<ct> blk = block_step(v_cache, table, pos, len, bs, row);
    const int64_t cnt = blk.cnt, next_cnt = blk.next_cnt;
    const ct *vb = blk.here, *vn = blk.next;
    for (int64_t g = 0; g < nkv; ++g) {
      const float* sg = scores + g * G * padded + tt;
      for (int64_t c = 0; c < D; c += 32) {
        float* ac = acc + g * G * D + c;
        __m256 a[G][4];
        for (int h = 0; h < G; ++h)
          for (int i = 0; i < 4; ++i) a[h][i] = _mm256_loadu_ps(ac + h * D + 8 * i);
        for (int64_t j = 0; j < cnt; ++j) {
          const ct* vp = vb + j * row + g * D + c;
          if (j < next_cnt)
            for (int64_t l = 0; l < 32; l += kLine)
              _mm_prefetch(reinterpret_cast<const char*>(vn + j * row + g * D + c + l), _MM_HINT_T0);
          __m256 v0, v1, v2, v3;
          load16(vp, v0, v1);
          load16(vp + 16, v2, v3);
          for (int h = 0; h < G; ++h) {
            const __m256 p = _mm256_broadcast_ss(sg + h * padded + j);
            a[h][0] = _mm256_fmadd_ps(p, v0, a[h][0]);
            a[h][1] = _mm256_fmadd_ps(p, v1, a[h][1]);
            a[h][2] = _mm256_fmadd_ps(p, v2, a[h][2]);
            a[h][3] = _mm256_fmadd_ps(p, v3, a[h][3]);
          }
        }
        for (int h = 0; h < G; ++h)
          for (int i = 0; i < 4; ++i) _mm256_storeu_ps(ac + h * D + 8 * i, a[h][i]);
      }
    }
    tt += cnt;
    pos += cnt;
  }
  for (int64_t hh = 0; hh < heads; ++hh) {
    const __m256 inv = _mm256_set1_ps(cache_unit<ct>() / sums[hh]);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(out + hh * D + d, _mm256_mul_ps(_mm256_loadu_ps(acc + hh * D + d), inv));
  }
}

template <typename ct>
using DecodeFn = void (*)(const float*, const ct*, const ct*, const int32_t*, int64_t, int64_t, int64_t, const Shape&,
                          float*, __m256*, float*, float*, float*, float*);

template <typename ct>
DecodeFn<ct> decode_for(int64_t G) {
  switch (G) {
    case 1: return decode_task<ct, 1>;
    case 2: return decode_task<ct, 2>;
    case 3: return decode_task<ct, 3>;
    case 4: return decode_task<ct, 4>;
    case 5: return decode_task<ct, 5>;
    case 6: return decode_task<ct, 6>;
    case 7: return decode_task<ct, 7>;
    default: return decode_task<ct, 8>;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Flash-style tiles. Rows come in pairs (a, b); kp/vp point at the float K/V rows of a tile's keys.

inline float dot_scalar(const float* a, const float* b, int64_t D) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // independent sums let the compiler vectorize
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < D; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

// Scores of rows a and b against keys [j0, j1) (j1 rounded up to 4 on the fast path; kp padded).
inline void pair_scores(const float* qa, const float* qb, const float* const* kp, int64_t j0, int64_t j1,
                        int64_t D, bool fast, float* sa, float* sb) {
#ifdef LLMSERVE_VEC_AVX2
  if (fast) {
    for (int64_t j = j0 & ~int64_t{3}; j < j1; j += 4) {
      const float *k0 = kp[j], *k1 = kp[j + 1], *k2 = kp[j + 2], *k3 = kp[j + 3];
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 a = _mm256_loadu_ps(qa + d), b = _mm256_loadu_ps(qb + d);
        const __m256 x0 = _mm256_loadu_ps(k0 + d), x1 = _mm256_loadu_ps(k1 + d);
        const __m256 x2 = _mm256_loadu_ps(k2 + d), x3 = _mm256_loadu_ps(k3 + d);
        acc[0] = _mm256_fmadd_ps(a, x0, acc[0]);
        acc[1] = _mm256_fmadd_ps(a, x1, acc[1]);
        acc[2] = _mm256_fmadd_ps(a, x2, acc[2]);
        acc[3] = _mm256_fmadd_ps(a, x3, acc[3]);
        acc[4] = _mm256_fmadd_ps(b, x0, acc[4]);
        acc[5] = _mm256_fmadd_ps(b, x1, acc[5]);
        acc[6] = _mm256_fmadd_ps(b, x2, acc[6]);
        acc[7] = _mm256_fmadd_ps(b, x3, acc[7]);
      }
      const __m256 s = llmserve::transpose_sum8(acc);
      _mm_storeu_ps(sa + j, _mm256_castps256_ps128(s));
      _mm_storeu_ps(sb + j, _mm256_extractf128_ps(s, 1));
    }
    return;
  }
#endif
  for (int64_t j = j0; j < j1; ++j) {
    sa[j] = dot_scalar(qa, kp[j], D);
    sb[j] = dot_scalar(qb, kp[j], D);
  }
}

// acc_a += sum_j pa[j] * V[j], acc_b likewise, over keys [j0, j1).
inline void pair_values(const float* pa, const float* pb, const float* const* vp, int64_t j0, int64_t j1, int64_t D,
                        bool fast, float* acc_a, float* acc_b) {
#ifdef LLMSERVE_VEC_AVX2
  if (fast) {
    for (int64_t c = 0; c < D; c += 32) {
      __m256 a0 = _mm256_loadu_ps(acc_a + c), a1 = _mm256_loadu_ps(acc_a + c + 8);
      __m256 a2 = _mm256_loadu_ps(acc_a + c + 16), a3 = _mm256_loadu_ps(acc_a + c + 24);
      __m256 b0 = _mm256_loadu_ps(acc_b + c), b1 = _mm256_loadu_ps(acc_b + c + 8);
      __m256 b2 = _mm256_loadu_ps(acc_b + c + 16), b3 = _mm256_loadu_ps(acc_b + c + 24);
      for (int64_t j = j0; j < j1; ++j) {
        const float* v = vp[j] + c;
        const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        const __m256 p = _mm256_broadcast_ss(pa + j), r = _mm256_broadcast_ss(pb + j);
        a0 = _mm256_fmadd_ps(p, v0, a0);
        a1 = _mm256_fmadd_ps(p, v1, a1);
        a2 = _mm256_fmadd_ps(p, v2, a2);
        a3 = _mm256_fmadd_ps(p, v3, a3);
        b0 = _mm256_fmadd_ps(r, v0, b0);
        b1 = _mm256_fmadd_ps(r, v1, b1);
        b2 = _mm256_fmadd_ps(r, v2, b2);
        b3 = _mm256_fmadd_ps(r, v3, b3);
      }
      _mm256_storeu_ps(acc_a + c, a0);
      _mm256_storeu_ps(acc_a + c + 8, a1);
      _mm256_storeu_ps(acc_a + c + 16, a2);
      _mm256_storeu_ps(acc_a + c + 24, a3);
      _mm256_storeu_ps(acc_b + c, b0);
      _mm256_storeu_ps(acc_b + c + 8, b1);
      _mm256_storeu_ps(acc_b + c + 16, b2);
      _mm256_storeu_ps(acc_b + c + 24, b3);
    }
    return;
  }
#endif
  for (int64_t j = j0; j < j1; ++j) {
    const float *v = vp[j], p = pa[j], r = pb[j];
    for (int64_t d = 0; d < D; ++d) {
      acc_a[d] += p * v[d];
      acc_b[d] += r * v[d];
    }
  }
}

// One row's online-softmax step over a tile: s[lo, hi) are the scores of the keys it may see
// (lo < hi). Turns them into e^(s - m_new) in place, zeroes s over [zlo, lo) and [hi, zhi) (the
// rest of the pair's range), updates the running max m and sum l, and returns the factor the
// row's accumulator must be scaled by. s has room up to hi rounded up to 8.
inline float online_softmax(float* s, int64_t lo, int64_t hi, int64_t zlo, int64_t zhi, float cap, float& m,
                            float& l) {
  float sum = 0.f, m_new = m;
#ifdef LLMSERVE_VEC_AVX2
  const int64_t lo8 = lo & ~int64_t{7}, hi8 = round_up(hi, 8);
  if (cap > 0.f) soft_cap(s + lo8, hi8 - lo8, cap);  // entries outside [lo, hi) are overwritten next
  for (int64_t j = lo8; j < lo; ++j) s[j] = kNegInf;
  for (int64_t j = hi; j < hi8; ++j) s[j] = kNegInf;
  __m256 vm = _mm256_set1_ps(kNegInf);
  for (int64_t j = lo8; j < hi8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
  m_new = std::max(m, llmserve::hmax8(vm));
  const __m256 mv = _mm256_set1_ps(m_new);
  for (int64_t j = lo8; j < hi8; j += 8)
    _mm256_storeu_ps(s + j, llmserve::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)));
  // exp8 clamps, so a masked entry came out ~1e-38, not 0: zero them for real.
  for (int64_t j = std::min(zlo, lo8); j < lo; ++j) s[j] = 0.f;
  for (int64_t j = hi; j < std::max(zhi, hi8); ++j) s[j] = 0.f;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = lo8; j < hi8; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(s + j));
  sum = llmserve::hsum8(acc);
#else
  if (cap > 0.f)
    for (int64_t j = lo; j < hi; ++j) s[j] = cap_scalar(s[j], cap);
  for (int64_t j = lo; j < hi; ++j) m_new = std::max(m_new, s[j]);
  for (int64_t j = lo; j < hi; ++j) {
    s[j] = std::exp(s[j] - m_new);
    sum += s[j];
  }
  for (int64_t j = zlo; j < lo; ++j) s[j] = 0.f;
  for (int64_t j = hi; j < zhi; ++j) s[j] = 0.f;
#endif
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// n cache values as float32.
template <typename ct>
inline void widen(const ct* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef LLMSERVE_VEC_AVX2
  if constexpr (vector_readable<ct>()) {
    const __m256 unit = _mm256_set1_ps(cache_unit<ct>());
    for (; i + 8 <= n; i += 8) {
      const __m256 x = load8(src + i);
      _mm256_storeu_ps(dst + i, cache_unit<ct>() == 1.f ? x : _mm256_mul_ps(x, unit));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline int64_t key_tile_for(int64_t D) {
  // ~16 KiB of float K per tile, so a tile's K (and V) stay in L1/L2 while every row pair reads it.
  return std::max<int64_t>(16, std::min<int64_t>(64, 4096 / D / 8 * 8));
}

// Points sc.kp / sc.vp at the float K and V rows of KV head g for positions [t0, t0 + n): in the
// cache itself when it holds float32, else widened into sc.kst / sc.vst.
template <typename ct>
inline void gather_tile(const ct* k_cache, const ct* v_cache, const int32_t* table, int64_t t0, int64_t n, int64_t g,
                        const Shape& sh, Scratch& sc) {
  const int64_t D = sh.D, bs = sh.block_size;
  constexpr bool kConvert = !std::is_same_v<ct, float>;
  if (kConvert && static_cast<int64_t>(sc.kst.size()) < n * D) {
    sc.kst.resize(n * D);
    sc.vst.resize(n * D);
  }
  for (int64_t j = 0, p = t0; j < n;) {
    const int64_t off = p % bs, cnt = std::min(bs - off, n - j);
    const int64_t base = (static_cast<int64_t>(table[p / bs]) * bs + off) * sh.row + g * D;
    for (int64_t i = 0; i < cnt; ++i, ++j) {
      const ct* kr = k_cache + base + i * sh.row;
      const ct* vr = v_cache + base + i * sh.row;
      if constexpr (kConvert) {
        widen(kr, sc.kst.data() + j * D, D);
        widen(vr, sc.vst.data() + j * D, D);
        sc.kp[j] = sc.kst.data() + j * D;
        sc.vp[j] = sc.vst.data() + j * D;
      } else {
        sc.kp[j] = reinterpret_cast<const float*>(kr);
        sc.vp[j] = reinterpret_cast<const float*>(vr);
      }
    }
    p += cnt;
  }
}

inline int64_t query_tile_for(int64_t G) { return std::max<int64_t>(1, 32 / G); }  // ~32 rows a task

// Rows [q0, q1) x the G heads of KV head g of sequence b, whose first query row is row0 in the
// batch and first query position p0 (q0 counted). Output rows go straight into out.
template <typename qt, typename ct>
void flash_task(const Task& task, const qt* q, const ct* k_cache, const ct* v_cache, const int32_t* table,
                int64_t row0, int64_t p0, const Shape& sh, bool fast, Scratch& sc, qt* out) {
  const int64_t G = sh.G, D = sh.D, g = task.g, nq = task.q1 - task.q0, M = nq * G, Mp = round_up(M, 2);
  const int64_t KT = key_tile_for(D), KTp = round_up(KT, 8);
  const int64_t first = p0 + task.q0, last = p0 + task.q1 - 1;  // positions of the tile's queries
  sc.q.resize(Mp * D);
  sc.acc.assign(Mp * D, 0.f);
  sc.m.assign(Mp, kNegInf);
  sc.l.assign(Mp, 0.f);
  sc.s.resize(2 * KTp);
  sc.kp.resize(KTp);
  sc.vp.resize(KTp);
  sc.zeros.assign(D, 0.f);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const qt* src = q + (row0 + task.q0 + i) * sh.q_stride + (g * G + h) * D;
      float* dst = sc.q.data() + (i * G + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * sh.scale;
    }
  if (Mp > M) std::fill(sc.q.begin() + M * D, sc.q.end(), 0.f);  // a padding row; its output is dropped
  // Keys any row of the task may see; a sliding window also cuts the start.
  const int64_t kstart = sh.window > 0 ? std::max<int64_t>(0, first - sh.window + 1) : 0, kend = last + 1;
  for (int64_t t0 = kstart; t0 < kend; t0 += KT) {
    const int64_t n = std::min(KT, kend - t0);
    gather_tile(k_cache, v_cache, table, t0, n, g, sh, sc);
    for (int64_t j = n; j < KTp; ++j) sc.kp[j] = sc.vp[j] = sc.zeros.data();
    for (int64_t r = 0; r < Mp; r += 2) {
      int64_t lo[2], hi[2];
      for (int i = 0; i < 2; ++i) {  // the keys of this tile row r + i may see
        const int64_t p = first + std::min(r + i, M - 1) / G;
        lo[i] = std::max<int64_t>(sh.window > 0 ? p - sh.window + 1 : 0, t0) - t0;
        hi[i] = std::min(p + 1, t0 + n) - t0;
      }
      // Rows go by position, so the pair's spans touch or overlap: [plo, phi) holds no key that
      // neither may see.
      const int64_t plo = std::min(lo[0], lo[1]), phi = std::max(hi[0], hi[1]);
      if (plo >= phi) continue;
      float* sa = sc.s.data();
      float* sb = sa + KTp;
      float* acc_a = sc.acc.data() + r * D;
      float* acc_b = acc_a + D;
      pair_scores(sc.q.data() + r * D, sc.q.data() + (r + 1) * D, sc.kp.data(), plo, phi, D, fast, sa, sb);
      float* srow[2] = {sa, sb};
      if (task.one_query && sh.logits) {  // a decode on this path: its rows r, r + 1 are query heads r, r + 1
        float* lg = logits_row(sh, task.b, g);
        for (int i = 0; i < 2 && r + i < M; ++i)
          for (int64_t j = lo[i]; j < hi[i]; ++j)
            lg[(r + i) * sh.logits_len + t0 + j] = sh.cap > 0.f ? cap_scalar(srow[i][j], sh.cap) : srow[i][j];
      }
      float* arow[2] = {acc_a, acc_b};
      for (int i = 0; i < 2; ++i) {
        if (lo[i] >= hi[i]) {  // this row sees nothing here: no contribution
          std::fill(srow[i] + plo, srow[i] + phi, 0.f);
          continue;
        }
        const float alpha = online_softmax(srow[i], lo[i], hi[i], plo, phi, sh.cap, sc.m[r + i], sc.l[r + i]);
        if (alpha != 1.f)
          for (int64_t d = 0; d < D; ++d) arow[i][d] *= alpha;
      }
      pair_values(sa, sb, sc.vp.data(), plo, phi, D, fast, acc_a, acc_b);
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t h = 0; h < G; ++h) {
      const int64_t r = i * G + h;
      const float inv = 1.f / sc.l[r];
      const float* a = sc.acc.data() + r * D;
      qt* o = out + ((row0 + task.q0 + i) * sh.H + g * G + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<qt>(a[d] * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-query tiles with the query rows across the vector lanes (AVX2). A task's rows (its
// queries x the KV head's query heads) are the columns of Q^T [D][Mp], of the scores S^T [keys][Mp]
// and of the output O^T [D][Mp], so both products are register-blocked GEMMs (keys or dims as
// broadcast scalars, 16 rows as two vectors: 12 accumulators, 8 loads per 12 multiply-adds) and the
// online softmax runs down the keys, one vector of rows at a time, with no horizontal reduction.
#ifdef LLMSERVE_VEC_AVX2

constexpr int64_t kLanes = 16;  // rows a micro-kernel covers: two 8-float vectors

// C[i][0..16) (+)= sum_k A(i, k) * B[k][0..16) for i < R; A(i, k) is a scalar read through `at`.
template <int R, typename At>
inline void mk16(At at, int64_t K, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m256 c0[R], c1[R];
  for (int i = 0; i < R; ++i) {
    c0[i] = accumulate ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
    c1[i] = accumulate ? _mm256_loadu_ps(C + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(at(i, k));
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_ps(C + i * ldc, c0[i]);
    _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
  }
}

// The same over n rows of C (n <= 6), picking the unrolled kernel.
template <typename At>
inline void mk16_rows(int64_t n, At at, int64_t K, const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  switch (n) {
    case 6: return mk16<6>(at, K, B, ldb, C, ldc, acc);
    case 5: return mk16<5>(at, K, B, ldb, C, ldc, acc);
    case 4: return mk16<4>(at, K, B, ldb, C, ldc, acc);
    case 3: return mk16<3>(at, K, B, ldb, C, ldc, acc);
    case 2: return mk16<2>(at, K, B, ldb, C, ldc, acc);
    default: return mk16<1>(at, K, B, ldb, C, ldc, acc);
  }
}

// Query rows a lanes task takes: about 48 (three vectors of 16), whole queries.
inline int64_t lanes_query_tile(int64_t G) { return std::max<int64_t>(1, 48 / G); }

// A multi-query task (rows [q0, q1) x the G heads of KV head g), as flash_task computes it.
template <typename qt, typename ct>
void lanes_task(const Task& task, const qt* q, const ct* k_cache, const ct* v_cache, const int32_t* table,
                int64_t row0, int64_t p0, const Shape& sh, Scratch& sc, qt* out) {
  const int64_t G = sh.G, D = sh.D, g = task.g, nq = task.q1 - task.q0, M = nq * G, Mp = round_up(M, kLanes);
  const int64_t KT = key_tile_for(D);
  const int64_t first = p0 + task.q0, last = p0 + task.q1 - 1;
  sc.q.resize(D * Mp);  // Q^T, scaled
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t rr = std::min(r, M - 1);  // a padding row repeats the last (its output is dropped)
    const qt* src = q + (row0 + task.q0 + rr / G) * sh.q_stride + (g * G + rr % G) * D;
    for (int64_t d = 0; d < D; ++d) sc.q[d * Mp + r] = static_cast<float>(src[d]) * sh.scale;
  }
  sc.acc.assign(D * Mp, 0.f);  // O^T
  sc.m.assign(Mp, kNegInf);
  sc.l.assign(Mp, 0.f);
  sc.s.resize(KT * Mp);  // S^T, then P^T in place
  sc.kp.resize(KT);
  sc.vp.resize(KT);
  std::vector<int32_t>& pos = sc.pos;  // each row's position
  pos.resize(Mp);
  for (int64_t r = 0; r < Mp; ++r) pos[r] = static_cast<int32_t>(first + std::min(r, M - 1) / G);
  const float cap = sh.cap;
  const __m256 neg_inf = _mm256_set1_ps(kNegInf), zero = _mm256_setzero_ps();
  const int64_t kstart = sh.window > 0 ? std::max<int64_t>(0, first - sh.window + 1) : 0, kend = last + 1;
  for (int64_t t0 = kstart; t0 < kend; t0 += KT) {
    const int64_t n = std::min(KT, kend - t0);
    gather_tile(k_cache, v_cache, table, t0, n, g, sh, sc);
    const float* const* kp = sc.kp.data();
    const float* const* vp = sc.vp.data();
    float* s = sc.s.data();
    // S^T = K Q^T over the tile's n keys.
    for (int64_t lb = 0; lb < Mp; lb += kLanes)
      for (int64_t j0 = 0; j0 < n; j0 += 6)
        mk16_rows(std::min<int64_t>(6, n - j0), [&](int i, int64_t d) { return kp[j0 + i] + d; }, D,
                  sc.q.data() + lb, Mp, s + j0 * Mp + lb, Mp, false);
    // Mask, soft cap and the online softmax, eight rows at a time down the keys.
    for (int64_t r = 0; r < Mp; r += 8) {
      const __m256i pr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos.data() + r));
      const __m256i lowest = sh.window > 0 ? _mm256_sub_epi32(pr, _mm256_set1_epi32(static_cast<int32_t>(sh.window)))
                                           : _mm256_set1_epi32(-1);
      __m256 mt = neg_inf;
      for (int64_t j = 0; j < n; ++j) {
        __m256 x = _mm256_loadu_ps(s + j * Mp + r);
        if (cap > 0.f) x = _mm256_mul_ps(_mm256_set1_ps(cap), tanh8(_mm256_mul_ps(x, _mm256_set1_ps(1.f / cap))));
        const __m256i kpos = _mm256_set1_epi32(static_cast<int32_t>(t0 + j));
        // visible: lowest < kpos <= pos
        const __m256i hidden = _mm256_or_si256(_mm256_cmpgt_epi32(kpos, pr), _mm256_cmpgt_epi32(
            _mm256_add_epi32(lowest, _mm256_set1_epi32(1)), kpos));
        x = _mm256_blendv_ps(x, neg_inf, _mm256_castsi256_ps(hidden));
        _mm256_storeu_ps(s + j * Mp + r, x);
        mt = _mm256_max_ps(mt, x);
      }
      const __m256 m_old = _mm256_loadu_ps(sc.m.data() + r), m_new = _mm256_max_ps(m_old, mt);
      const __m256 old_none = _mm256_cmp_ps(m_old, neg_inf, _CMP_EQ_OQ);
      const __m256 new_none = _mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ);
      const __m256 alpha = _mm256_blendv_ps(llmserve::exp8(_mm256_sub_ps(m_old, _mm256_blendv_ps(m_new, zero, new_none))),
                                            zero, old_none);
      const __m256 m_sub = _mm256_blendv_ps(m_new, zero, new_none);
      __m256 sum = zero;
      for (int64_t j = 0; j < n; ++j) {
        const __m256 x = _mm256_loadu_ps(s + j * Mp + r);
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, neg_inf, _CMP_EQ_OQ), llmserve::exp8(_mm256_sub_ps(x, m_sub)));
        _mm256_storeu_ps(s + j * Mp + r, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_storeu_ps(sc.l.data() + r, _mm256_fmadd_ps(_mm256_loadu_ps(sc.l.data() + r), alpha, sum));
      _mm256_storeu_ps(sc.m.data() + r, m_new);
      for (int64_t d = 0; d < D; ++d) {
        float* o = sc.acc.data() + d * Mp + r;
        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), alpha));
      }
    }
    // O^T += V^T P^T over the tile's keys.
    for (int64_t lb = 0; lb < Mp; lb += kLanes)
      for (int64_t d0 = 0; d0 < D; d0 += 6)
        mk16_rows(std::min<int64_t>(6, D - d0), [&](int i, int64_t j) { return vp[j] + d0 + i; }, n, s + lb, Mp,
                  sc.acc.data() + d0 * Mp + lb, Mp, true);
  }
  for (int64_t r = 0; r < M; ++r) {
    const float inv = 1.f / sc.l[r];
    qt* o = out + ((row0 + task.q0 + r / G) * sh.H + g * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<qt>(sc.acc[d * Mp + r] * inv);
  }
}
#endif  // LLMSERVE_VEC_AVX2

// Number of context positions a query at position p sees.
inline int64_t visible(int64_t p, int64_t window) { return window > 0 ? std::min(p + 1, window) : p + 1; }

template <typename qt, typename ct>
void run(const qt* q, const ct* k_cache, const ct* v_cache, const int32_t* qsl, const int32_t* seq_lens,
         const int32_t* tables, int64_t B, const Shape& sh, qt* out) {
  const int64_t G = sh.G, D = sh.D;
  bool fast = false, fast_decode = false;
#ifdef LLMSERVE_VEC_AVX2
  fast = D % 32 == 0;
  fast_decode = fast && std::is_same_v<qt, float> && vector_readable<ct>() && G <= 8;
#endif
  const int64_t QT = query_tile_for(G);
  // Multi-query tasks take the lanes path where it runs (AVX2; any head size, any cache type it reads).
  bool lanes = false;
  int64_t lanes_tile = QT;
#ifdef LLMSERVE_VEC_AVX2
  lanes = vector_readable<ct>();
  lanes_tile = lanes_query_tile(G);
#endif
  // Enough decodes to keep every thread busy: each takes all its KV heads in one task (whole rows).
  int64_t decodes = 0;
  for (int64_t b = 0; b < B; ++b) decodes += qsl[b + 1] - qsl[b] == 1;
  const bool whole_rows = fast_decode && decodes >= 2 * at::get_num_threads();
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = qsl[b + 1] - qsl[b], len = seq_lens[b], p0 = len - qlen;
    if (qlen == 0) continue;
    const int64_t tile = qlen == 1 ? 1 : lanes ? lanes_tile : QT;
    for (int64_t q0 = 0; q0 < qlen; q0 += tile) {
      const int64_t q1 = std::min(qlen, q0 + tile);
      int64_t cost = 64;  // a task's fixed overhead, in row x key units
      for (int64_t i = q0; i < q1; ++i) cost += G * visible(p0 + i, sh.window);
      const bool decode = qlen == 1 && fast_decode;
      const int64_t per_task = decode && whole_rows ? sh.KVH : 1;
      for (int64_t g = 0; g < sh.KVH; g += per_task)
        tasks.push_back({cost * per_task, static_cast<int32_t>(b), static_cast<int32_t>(g), static_cast<int32_t>(q0),
                         static_cast<int32_t>(q1), static_cast<int32_t>(per_task), decode, qlen == 1});
    }
  }
  if (tasks.empty()) return;
  // Longest first from a shared counter: the threads end close together whatever the mix.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch sc;
    for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) {
      const Task& task = tasks[i];
      const int64_t b = task.b, len = seq_lens[b], qlen = qsl[b + 1] - qsl[b], row0 = qsl[b];
      const int32_t* table = tables + b * sh.table_width;
#ifdef LLMSERVE_VEC_AVX2
      if constexpr (std::is_same_v<qt, float> && vector_readable<ct>()) {
        if (task.decode) {
          const int64_t start = sh.window > 0 ? std::max<int64_t>(0, len - sh.window) : 0;
          const int64_t heads = task.nkv * G;
          sc.q.resize(heads * D);
          const float* src = q + row0 * sh.q_stride + task.g * G * D;
          const float qscale = sh.scale * cache_unit<ct>();  // K is read at cache_unit's scale
          for (int64_t j = 0; j < heads * D; ++j) sc.q[j] = src[j] * qscale;
          sc.scores.resize(heads * round_up(len - start, 8));
          sc.part.resize(heads * 8);
          sc.sums.resize(heads);
          sc.acc.resize(heads * D);
          decode_for<ct>(G)(sc.q.data(), k_cache + task.g * D, v_cache + task.g * D, table, start, len, task.nkv, sh,
                            sc.scores.data(), sc.part.data(), sc.sums.data(), sc.acc.data(),
                            out + (row0 * sh.H + task.g * G) * D, logits_row(sh, b, task.g));
          continue;
        }
      }
#endif
#ifdef LLMSERVE_VEC_AVX2
      if constexpr (vector_readable<ct>()) {
        if (lanes && !task.one_query) {
          lanes_task<qt, ct>(task, q, k_cache, v_cache, table, row0, len - qlen, sh, sc, out);
          continue;
        }
      }
#endif
      flash_task<qt, ct>(task, q, k_cache, v_cache, table, row0, len - qlen, sh, fast, sc, out);
    }
  });
}

// The largest finite value of an 8-bit cache format: what is stored for anything larger (e4m3's
// conversion saturates by itself; e5m2's would give infinity, which one outlier would spread
// through a whole softmax).
template <typename ct>
constexpr float fp8_max() {
  return std::is_same_v<ct, c10::Float8_e5m2> ? 57344.f : 448.f;
}

#if defined(LLMSERVE_VEC_AVX2) && defined(__F16C__)
// Eight floats to an 8-bit format, rounded as torch rounds: saturated to the largest finite value,
// scaled into float16's range (e4m3 by 2^-8, as its loads read it), rounded to float16 by
// round-to-odd (truncate, then set the last bit if anything was dropped: a second rounding from
// there is exact), then to nearest even on the bits the format drops; NaN stays NaN.
template <typename ct>
inline void store8_fp8(const float* src, ct* dst) {
  constexpr bool e4m3 = std::is_same_v<ct, c10::Float8_e4m3fn>;
  constexpr int drop = e4m3 ? 7 : 8;  // float16 mantissa bits the format does not keep
  const __m256 top = _mm256_set1_ps(fp8_max<ct>());
  __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), top), _mm256_min_ps(top, _mm256_loadu_ps(src)));
  if constexpr (e4m3) x = _mm256_mul_ps(x, _mm256_set1_ps(1.f / 256.f));
  const __m128i t = _mm256_cvtps_ph(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 dropped = _mm256_cmp_ps(_mm256_cvtph_ps(t), x, _CMP_NEQ_UQ);
  const __m128i sticky = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(dropped)),
                                         _mm256_extracti128_si256(_mm256_castps_si256(dropped), 1));
  const __m128i h = _mm_or_si128(t, _mm_and_si128(sticky, _mm_set1_epi16(1)));
  // NaN's float16 patterns are capped first so the rounding below cannot carry past them.
  __m128i mag = _mm_min_epu16(_mm_and_si128(h, _mm_set1_epi16(0x7FFF)), _mm_set1_epi16(0x7E00));
  const __m128i odd = _mm_and_si128(_mm_srli_epi16(mag, drop), _mm_set1_epi16(1));
  mag = _mm_srli_epi16(_mm_add_epi16(mag, _mm_add_epi16(_mm_set1_epi16((1 << (drop - 1)) - 1), odd)), drop);
  if constexpr (e4m3) mag = _mm_min_epu16(mag, _mm_set1_epi16(0x7F));  // NaN: 0x7F
  const __m128i sign = _mm_srli_epi16(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), 8);
  const __m128i bytes = _mm_packus_epi16(_mm_or_si128(mag, sign), _mm_setzero_si128());
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), bytes);
}
#endif

// n values of src rounded to the cache's type (to nearest, ties to even, as torch's .to() rounds;
// the 8-bit formats saturate at their largest finite value).
template <typename qt, typename ct>
inline void store_row(const qt* src, ct* dst, int64_t n) {
  if constexpr (std::is_same_v<qt, ct>) {
    std::memcpy(dst, src, n * sizeof(ct));
  } else if constexpr (is_fp8<ct>()) {
    constexpr float top = fp8_max<ct>();
    int64_t i = 0;
#if defined(LLMSERVE_VEC_AVX2) && defined(__F16C__)
    if constexpr (std::is_same_v<qt, float>)
      for (; i + 8 <= n; i += 8) store8_fp8(src + i, dst + i);
#endif
    for (; i < n; ++i) {
      const float x = static_cast<float>(src[i]);
      dst[i] = static_cast<ct>(x > top ? top : x < -top ? -top : x);  // NaN stays NaN
    }
  } else {
    int64_t i = 0;
#if defined(LLMSERVE_VEC_AVX2) && defined(__F16C__)
    if constexpr (std::is_same_v<qt, float> && std::is_same_v<ct, c10::Half>) {
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<ct>(static_cast<float>(src[i]));
  }
}

template <typename qt, typename ct>
void write_cache(const qt* k, const qt* v, int64_t k_stride, int64_t v_stride, ct* k_cache, ct* v_cache,
                 const int64_t* slots, int64_t T, int64_t row) {
  for (int64_t t = 0; t < T; ++t) {
    store_row(k + t * k_stride, k_cache + slots[t] * row, row);
    store_row(v + t * v_stride, v_cache + slots[t] * row, row);
  }
}

}  // namespace

// q [T, H, D], k/v [T, KVH, D] (heads contiguous, rows may be strided: slices of a fused qkv),
// caches [num_slots, KVH, D] contiguous, of q's dtype or (float32 q) bfloat16/float16, slot_mapping [T] int64, query_start_loc [B+1] int32,
// seq_lens [B] int32 (context length after this step), block_tables [B, W] int32. Writes every
// token's K/V at its slot first, then sequence b's queries (rows query_start_loc[b] ..
// query_start_loc[b+1]-1, at positions seq_lens[b] - qlen_b + i) attend causally, within
// sliding_window when > 0, with soft_cap * tanh(score / soft_cap) when soft_cap > 0. Rows no
// sequence owns come back as zeros. Returns [T, H, D].
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                              torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, torch::Tensor block_tables, int64_t block_size, double scale,
                              int64_t sliding_window, double soft_cap, std::optional<torch::Tensor> decode_logits) {
  for (const auto& t : {q, k, v, k_cache, v_cache, slot_mapping, query_start_loc, seq_lens, block_tables})
    TORCH_CHECK(t.device().is_cpu(), "paged_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [tokens, heads, head_size]");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "caches must be [slots, kv_heads, head_size] and alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  const auto dtype = q.scalar_type(), cache_dtype = k_cache.scalar_type();
  auto supported = [](c10::ScalarType t) {
    return t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kFloat16;
  };
  const bool fp8_cache = cache_dtype == torch::kFloat8_e4m3fn || cache_dtype == torch::kFloat8_e5m2;
  TORCH_CHECK(supported(dtype) && (supported(cache_dtype) || fp8_cache),
              "paged_attention supports float32, bfloat16 and float16 (and 8-bit float caches)");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k and v must share a dtype");
  TORCH_CHECK(v_cache.scalar_type() == cache_dtype, "the K and V caches must share a dtype");
  TORCH_CHECK(cache_dtype == dtype || dtype == torch::kFloat32,
              "a cache dtype other than the queries' needs float32 queries");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), S = k_cache.size(0);
  TORCH_CHECK(D > 0 && KVH > 0 && H % KVH == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) == D, "cache head size differs from the queries'");
  for (const auto& t : {k, v})
    TORCH_CHECK(t.size(0) == T && t.size(1) == KVH && t.size(2) == D, "k and v must be [tokens, kv_heads, head_size]");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == D, "q, k, v must have contiguous heads");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 && slot_mapping.size(0) == T,
              "slot_mapping must be [tokens] int64");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt32 && seq_lens.dim() == 1, "seq_lens must be [B] int32");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.scalar_type() == torch::kInt32 && query_start_loc.dim() == 1 &&
              (query_start_loc.size(0) == B + 1 || (B == 0 && query_start_loc.size(0) == 0)),
              "query_start_loc must be [B + 1] int32");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 &&
              (B == 0 || (block_tables.dim() == 2 && block_tables.size(0) == B)),
              "block_tables must be [B, max_blocks] int32");
  slot_mapping = slot_mapping.contiguous();
  query_start_loc = query_start_loc.contiguous();
  seq_lens = seq_lens.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < S, "slot_mapping entry out of range");
  const int32_t* qsl = B ? query_start_loc.data_ptr<int32_t>() : nullptr;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t width = B ? block_tables.size(1) : 0, num_blocks = S / block_size;
  const int32_t* tables = B ? block_tables.data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qlen = qsl[b + 1] - qsl[b], len = lens[b];
    TORCH_CHECK(qsl[b] >= 0 && qlen >= 0 && qsl[b + 1] <= T, "query_start_loc must rise within [0, tokens]");
    TORCH_CHECK(len >= qlen, "a sequence's length is shorter than its query");
    if (qlen == 0) continue;
    TORCH_CHECK((len + block_size - 1) / block_size <= width, "block table too narrow for a sequence");
    const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - qlen - sliding_window + 1) : 0;
    for (int64_t blk = first / block_size; blk * block_size < len; ++blk) {  // only the blocks it reads
      const int32_t id = tables[b * width + blk];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block table entry out of range");
    }
  }
  Shape sh{H, KVH, H / KVH, D, KVH * D, block_size, width, q.stride(0), sliding_window,
           static_cast<float>(scale), static_cast<float>(soft_cap)};
  if (decode_logits.has_value()) {
    const auto& lg = *decode_logits;
    TORCH_CHECK(lg.device().is_cpu() && lg.scalar_type() == torch::kFloat32 && lg.is_contiguous() && lg.dim() == 3 &&
                lg.size(0) == B && lg.size(1) == H, "decode_logits must be a contiguous float32 [B, heads, length]");
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(qsl[b + 1] - qsl[b] != 1 || lens[b] <= lg.size(2), "decode_logits too short for a sequence");
    sh.logits = lg.data_ptr<float>();
    sh.logits_len = lg.size(2);
  }
  auto out = torch::empty({T, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  // Rows no sequence owns: before the first sequence's and after the last's.
  const int64_t owned0 = B ? qsl[0] : 0, owned1 = B ? qsl[B] : 0;
  if (owned0 > 0) out.narrow(0, 0, owned0).zero_();
  if (owned1 < T) out.narrow(0, owned1, T - owned1).zero_();
  auto go = [&](auto q_tag, auto cache_tag) {
    using qt = decltype(q_tag);
    using ct = decltype(cache_tag);
    write_cache<qt, ct>(k.data_ptr<qt>(), v.data_ptr<qt>(), k.stride(0), v.stride(0), k_cache.data_ptr<ct>(),
                        v_cache.data_ptr<ct>(), slots, T, KVH * D);
    run<qt, ct>(q.data_ptr<qt>(), k_cache.data_ptr<ct>(), v_cache.data_ptr<ct>(), qsl, lens, tables, B, sh,
                out.data_ptr<qt>());
  };
  if (dtype == torch::kBFloat16) go(c10::BFloat16{}, c10::BFloat16{});
  else if (dtype == torch::kFloat16) go(c10::Half{}, c10::Half{});
  else if (cache_dtype == torch::kBFloat16) go(float{}, c10::BFloat16{});
  else if (cache_dtype == torch::kFloat16) go(float{}, c10::Half{});
  else if (cache_dtype == torch::kFloat8_e4m3fn) go(float{}, c10::Float8_e4m3fn{});
  else if (cache_dtype == torch::kFloat8_e5m2) go(float{}, c10::Float8_e5m2{});
  else go(float{}, float{});
  return out;
}
