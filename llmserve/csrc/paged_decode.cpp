// Paged attention for the decode part of a step, reading K/V straight out of the paged cache (no
// gathered copy of a context is ever made), with the step's cache writes in the same call.
//
// One task per (sequence, KV head): the task scores its group of query heads against each
// context token's K row for that head (read once for the whole group), takes a softmax with a
// vector exp, and sums the V rows. At one sequence the KV heads still spread over the cores.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

template <typename scalar_t>
inline void axpy(float p, const scalar_t* v, float* acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
}

inline void softmax_unnormalized(float* s, int64_t n, float& sum) {
  float m = -std::numeric_limits<float>::infinity();
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

#ifdef LLMSERVE_VEC_AVX2
template <>
inline float dot<float>(const float* q, const float* k, int64_t D) {
  int64_t d = 0;
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), b);
  }
  float s = llmserve::hsum8(_mm256_add_ps(a, b));
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

template <>
inline void axpy<float>(float p, const float* v, float* acc, int64_t D) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] += p * v[d];
}
#endif

#ifdef LLMSERVE_VEC_AVX2
// One (sequence, KV head) task over a float32 cache, for G query heads and D % 32 == 0. Scores
// are reduced 8 tokens at a time (one transpose-add instead of 8 horizontal sums); the weighted
// sum of V keeps G x 32 accumulators in registers per 32-wide slice of the head.
template <int G>
void decode_task_f32(const float* qf, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t len, int64_t block_size, int64_t row, int64_t D, float* scores, float* out) {
  // Pass 1: scores[h * padded + t].
  const int64_t padded = (len + 7) / 8 * 8;
  __m256 part[G][8];
  int64_t t = 0;
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t n = std::min(block_size, len - blk * block_size);
    const float* kb = k_cache + static_cast<int64_t>(table[blk]) * block_size * row;
    for (int64_t j = 0; j < n; ++j, ++t) {
      const float* kp = kb + j * row;
      for (int h = 0; h < G; ++h) {
        const float* qh = qf + h * D;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kp + d), a);
          b = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_loadu_ps(kp + d + 8), b);
        }
        part[h][t & 7] = _mm256_add_ps(a, b);
      }
      if ((t & 7) == 7)
        for (int h = 0; h < G; ++h) _mm256_storeu_ps(scores + h * padded + (t & ~7), llmserve::transpose_sum8(part[h]));
    }
  }
  if (len & 7) {  // the last, partial group of 8
    for (int h = 0; h < G; ++h) {
      for (int64_t i = len & 7; i < 8; ++i) part[h][i] = _mm256_setzero_ps();
      _mm256_storeu_ps(scores + h * padded + (len & ~7), llmserve::transpose_sum8(part[h]));
    }
  }
  float sums[G];
  for (int h = 0; h < G; ++h) softmax_unnormalized(scores + h * padded, len, sums[h]);
  // Pass 2, one 32-wide slice of the head at a time.
  for (int64_t c = 0; c < D; c += 32) {
    __m256 acc[G][4];
    for (int h = 0; h < G; ++h)
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_setzero_ps();
    int64_t tt = 0;
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      const int64_t n = std::min(block_size, len - blk * block_size);
      const float* vb = v_cache + static_cast<int64_t>(table[blk]) * block_size * row + c;
      for (int64_t j = 0; j < n; ++j, ++tt) {
        const float* vp = vb + j * row;
        const __m256 v0 = _mm256_loadu_ps(vp), v1 = _mm256_loadu_ps(vp + 8);
        const __m256 v2 = _mm256_loadu_ps(vp + 16), v3 = _mm256_loadu_ps(vp + 24);
        for (int h = 0; h < G; ++h) {
          const __m256 p = _mm256_broadcast_ss(scores + h * padded + tt);
          acc[h][0] = _mm256_fmadd_ps(p, v0, acc[h][0]);
          acc[h][1] = _mm256_fmadd_ps(p, v1, acc[h][1]);
          acc[h][2] = _mm256_fmadd_ps(p, v2, acc[h][2]);
          acc[h][3] = _mm256_fmadd_ps(p, v3, acc[h][3]);
        }
      }
    }
    for (int h = 0; h < G; ++h) {
      const __m256 inv = _mm256_set1_ps(1.f / sums[h]);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + h * D + c + 8 * i, _mm256_mul_ps(acc[h][i], inv));
    }
  }
}

using TaskFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                        int64_t, float*, float*);
constexpr TaskFn kTasks[] = {nullptr, decode_task_f32<1>, decode_task_f32<2>, decode_task_f32<3>,
                             decode_task_f32<4>, decode_task_f32<5>, decode_task_f32<6>, decode_task_f32<7>,
                             decode_task_f32<8>};
#endif

// The fast path for float32 caches where it applies (AVX2, <= 8 query heads per KV head, head
// size a multiple of 32); false if the caller must use the generic loop.
bool decode_attention_fast(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                           const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t B, int64_t H,
                           int64_t KVH, int64_t D, int64_t max_blocks, int64_t block_size, float scale) {
#ifdef LLMSERVE_VEC_AVX2
  const int64_t G = H / KVH, row = KVH * D;
  if (G > 8 || D % 32 != 0) return false;
  const TaskFn task_fn = kTasks[G];
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH, len = seq_lens[b];
      for (int64_t i = 0; i < G * D; ++i) qf[i] = q[b * q_stride + g * G * D + i] * scale;
      scores.resize(G * ((len + 7) / 8 * 8));
      task_fn(qf.data(), k_cache + g * D, v_cache + g * D, block_tables + b * max_blocks, len, block_size, row, D,
              scores.data(), out + (b * H + g * G) * D);
    }
  });
  return true;
#else
  return false;
#endif
}

template <typename scalar_t>
void write_cache(const scalar_t* k, const scalar_t* v, int64_t k_stride, int64_t v_stride, scalar_t* k_cache,
                 scalar_t* v_cache, const int64_t* slots, int64_t T, int64_t row) {
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(scalar_t));
    std::memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(scalar_t));
  }
}

template <typename scalar_t>
void decode_attention(const scalar_t* q, int64_t q_stride, const scalar_t* k_cache, const scalar_t* v_cache,
                      const int32_t* block_tables, const int32_t* seq_lens, scalar_t* out, int64_t B,
                      int64_t H, int64_t KVH, int64_t D, int64_t max_blocks, int64_t block_size, float scale) {
  const int64_t G = H / KVH, row = KVH * D;  // query heads per KV head; one token's K (or V) row
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH, len = seq_lens[b];
      const int32_t* table = block_tables + b * max_blocks;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[b * q_stride + g * G * D + i]) * scale;
      scores.resize(G * len);
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      // Scores of every context token for the group's query heads, block by block (a block's
      // tokens are consecutive slots: no per-token division).
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * block_size, n = std::min(block_size, len - first);
        const scalar_t* kb = k_cache + static_cast<int64_t>(table[blk]) * block_size * row + g * D;
        for (int64_t j = 0; j < n; ++j)
          for (int64_t h = 0; h < G; ++h) scores[h * len + first + j] = dot(qf.data() + h * D, kb + j * row, D);
      }
      float sums[64];
      for (int64_t h = 0; h < G; ++h) softmax_unnormalized(scores.data() + h * len, len, sums[h]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * block_size, n = std::min(block_size, len - first);
        const scalar_t* vb = v_cache + static_cast<int64_t>(table[blk]) * block_size * row + g * D;
        for (int64_t j = 0; j < n; ++j)
          for (int64_t h = 0; h < G; ++h) axpy(scores[h * len + first + j], vb + j * row, acc.data() + h * D, D);
      }
      scalar_t* o = out + (b * H + g * G) * D;
      for (int64_t h = 0; h < G; ++h) {
        const float inv = 1.f / sums[h];
        for (int64_t d = 0; d < D; ++d) o[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv);
      }
    }
  });
}

}  // namespace

// Writes the step's new K/V (k, v: [T, KVH, D], heads contiguous; rows may be strided, as slices
// of a fused qkv are) into the caches ([slots, KVH, D]) at slot_mapping ([T] int64), then runs
// decode attention for the first B = seq_lens.size(0) queries of q ([T, H, D], same layout):
// block_tables [B, max_blocks] int32, seq_lens [B] int32. Every write lands before any read, so a
// sequence can attend to K/V that another sequence wrote this step. Returns [B, H, D].
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables,
                                     torch::Tensor seq_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_attention_decode runs on CPU tensors");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k.scalar_type() == k_cache.scalar_type() &&
              v.scalar_type() == k_cache.scalar_type(), "q, k, v and the caches must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.size(0) == k.size(0), "bad slot mapping");
  const int64_t B = seq_lens.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && H / KVH <= 64 && k_cache.size(2) == D, "head shapes do not match the cache");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == D, "q, k, v must have contiguous heads");
  TORCH_CHECK(B == 0 || (block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32 &&
                         block_tables.size(0) == B && B <= q.size(0)), "bad block tables or sequence lengths");
  slot_mapping = slot_mapping.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(),
                                  "paged_attention_decode", [&] {
    write_cache<scalar_t>(k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.stride(0), v.stride(0),
                          k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slot_mapping.data_ptr<int64_t>(),
                          k.size(0), KVH * D);
    if (B == 0) return;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (decode_attention_fast(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), out.data_ptr<float>(),
                                B, H, KVH, D, block_tables.size(1), block_size, static_cast<float>(scale)))
        return;
    }
    decode_attention<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k_cache.data_ptr<scalar_t>(),
                                 v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                 seq_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D,
                                 block_tables.size(1), block_size, static_cast<float>(scale));
  });
  return out;
}
