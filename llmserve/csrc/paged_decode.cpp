// Decode attention that reads K/V straight out of the paged cache: no gathered copy of the
// context is ever made. One task per sequence; every query head is scored against each token's
// K/V row (all KV heads, contiguous in the cache) while it is in cache, so each row is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode_attention(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                      const int32_t* block_tables, const int32_t* seq_lens, scalar_t* out,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t max_blocks, int64_t block_size, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t D = head_dim, H = num_heads, row = num_kv_heads * D;  // one token's K (or V) row
  // One task per sequence: each token's K and V rows (all KV heads, contiguous) are read once.
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), kv(row), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = seq_lens[b];
      const int32_t* table = block_tables + b * max_blocks;
      for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[b * H * D + i]) * scale;
      scores.assign(H * len, 0.f);
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      // Pass 1: scores of every context token for every query head, block by block (a block's
      // tokens are consecutive slots, so there is no per-token division).
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * block_size, n = std::min(block_size, len - first);
        const scalar_t* kb = k_cache + static_cast<int64_t>(table[blk]) * block_size * row;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* kp = kb + j * row;
          for (int64_t i = 0; i < row; ++i) kv[i] = static_cast<float>(kp[i]);
          for (int64_t h = 0; h < H; ++h) {
            const float* qh = qf.data() + h * D;
            const float* kh = kv.data() + (h / group) * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
            scores[h * len + first + j] = s;
          }
        }
      }
      // Softmax per head, in float32.
      for (int64_t h = 0; h < H; ++h) {
        float* sh = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = sh[t] > m ? sh[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - m);
          sum += sh[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      // Pass 2: weighted sum of V rows.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t first = blk * block_size, n = std::min(block_size, len - first);
        const scalar_t* vb = v_cache + static_cast<int64_t>(table[blk]) * block_size * row;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* vp = vb + j * row;
          for (int64_t i = 0; i < row; ++i) kv[i] = static_cast<float>(vp[i]);
          for (int64_t h = 0; h < H; ++h) {
            const float p = scores[h * len + first + j];
            const float* vh = kv.data() + (h / group) * D;
            float* ah = acc.data() + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
          }
        }
      }
      for (int64_t i = 0; i < H * D; ++i) out[b * H * D + i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

}  // namespace

// q: [B, H, D] (any strides with a contiguous last dim are made contiguous); caches: [slots, KVH, D];
// block_tables: [B, max_blocks] int32; seq_lens: [B] int32. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "block tables and sequence lengths must be int32");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D, "head shapes do not match the cache");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(),
                                  "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                               block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                               B, H, KVH, D, block_tables.size(1), block_size, static_cast<float>(scale));
  });
  return out;
}

