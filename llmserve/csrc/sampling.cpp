// Sampling a batch of rows by inverse CDF without materializing a float64 CDF: per row, one pass
// for the max (and argmax), one for the weights e^(x/T - max/T) and their partial sums, and a walk
// over the partial sums to the chunk where u * total falls, then inside it. In torch the same is six
// passes over [rows, vocab] (copy, divide, softmax, widen to float64, cumsum, search), the cumsum
// single-threaded: at 64 rows x 49k it cost more than the logits head.
//
// Sums are float64 (as the torch path's cumsum), so even the smallest weights keep intervals of
// their true width; the total is the sum of the same partial sums the walk adds, so u * total < total
// always lands on a token. A weight is 0 exactly where x/T - max/T < -87 (e^-87 ~ 1e-38, below any
// probability float32 represents in a softmax), and so for every -inf logit: a truncated or banned
// token is never drawn.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kChunk = 64;  // weights per partial sum
constexpr float kFloor = -87.f;  // below this exponent a weight is 0

// The first index of the row's largest value, and that value.
int64_t argmax_row(const float* x, int64_t V, bool vec, float& best) {
  best = -std::numeric_limits<float>::infinity();
  int64_t idx = 0, i = 0;
#ifdef LLMSERVE_VEC_AVX2
  if (vec && V >= 8) {
    __m256 bv = _mm256_loadu_ps(x);
    __m256i bi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = bi;
    const __m256i step = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= V; i += 8) {
      cur = _mm256_add_epi32(cur, step);
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);  // strictly greater: each lane keeps its first
      bv = _mm256_blendv_ps(bv, v, gt);
      bi = _mm256_blendv_epi8(bi, cur, _mm256_castps_si256(gt));
    }
    alignas(32) float vals[8];
    alignas(32) int32_t ids[8];
    _mm256_store_ps(vals, bv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ids), bi);
    best = vals[0];
    idx = ids[0];
    for (int l = 1; l < 8; ++l)
      if (vals[l] > best || (vals[l] == best && ids[l] < idx)) {
        best = vals[l];
        idx = ids[l];
      }
  }
#endif
  for (; i < V; ++i)
    if (x[i] > best) {
      best = x[i];
      idx = i;
    }
  return idx;
}

// w[i] = e^(x[i] * inv_t - shift) (0 under the floor) for i in [0, n), n <= kChunk; returns their sum.
double weights_chunk(const float* x, float* w, int64_t n, float inv_t, float shift, bool vec) {
  int64_t i = 0;
  double sum = 0.0;
#ifdef LLMSERVE_VEC_AVX2
  if (vec) {
    const __m256 it = _mm256_set1_ps(inv_t), sh = _mm256_set1_ps(shift), floor = _mm256_set1_ps(kFloor);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
      const __m256 y = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), it, sh);
      const __m256 e = _mm256_and_ps(llmserve::exp8(y), _mm256_cmp_ps(y, floor, _CMP_GE_OQ));
      _mm256_storeu_ps(w + i, e);
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
    sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
#endif
  for (; i < n; ++i) {
    const float y = std::fma(x[i], inv_t, -shift);
    w[i] = y >= kFloor ? std::exp(y) : 0.f;
    sum += w[i];
  }
  return sum;
}

double sum_chunk(const float* p, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += p[i];
  return sum;
}

// The first index whose running float64 sum of w exceeds target, walking the chunk sums first.
// Rounding can leave the walk inside a chunk short of target: then the chunk's last positive weight.
int64_t search(const float* w, const std::vector<double>& chunks, int64_t V, double target) {
  double run = 0.0;
  const int64_t num = static_cast<int64_t>(chunks.size());
  for (int64_t c = 0; c < num; ++c) {
    if (run + chunks[c] <= target) {
      run += chunks[c];
      continue;
    }
    const int64_t lo = c * kChunk, hi = std::min(V, lo + kChunk);
    int64_t last = -1;
    for (int64_t i = lo; i < hi; ++i) {
      if (w[i] <= 0.f) continue;
      run += w[i];
      last = i;
      if (run > target) return i;
    }
    if (last >= 0) return last;
  }
  for (int64_t i = V - 1; i >= 0; --i)  // target at the total itself: the last token with weight
    if (w[i] > 0.f) return i;
  return 0;
}

}  // namespace

// logits [R, V] float32; temperature [R] float32 (> 0; rows that are greedy may hold anything
// positive) or empty for 1; u [R] float64 in [0, 1). Returns (argmax [R], sampled [R]) int64. With
// from_probs, the rows are nonnegative weights already (e.g. after top-k/top-p/min-p) and are
// sampled as they are, temperature unused. vec = false forces the portable code (for tests).
std::tuple<torch::Tensor, torch::Tensor> sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor u,
                                                     bool from_probs, bool vec) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
              "sample_rows takes [rows, vocab] float32 CPU logits");
  TORCH_CHECK(u.scalar_type() == torch::kFloat64 && u.dim() == 1 && u.size(0) == logits.size(0),
              "u must be [rows] float64");
  const bool has_t = temperature.numel() > 0;
  TORCH_CHECK(!has_t || (temperature.scalar_type() == torch::kFloat32 && temperature.numel() == logits.size(0)),
              "temperature must be [rows] float32 or empty");
  logits = logits.contiguous();
  temperature = temperature.contiguous();
  u = u.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "an empty vocabulary");
  auto argmax = torch::empty({R}, torch::kInt64), sampled = torch::empty({R}, torch::kInt64);
  const float* x = logits.data_ptr<float>();
  const float* t = has_t ? temperature.data_ptr<float>() : nullptr;
  const double* up = u.data_ptr<double>();
  int64_t* am = argmax.data_ptr<int64_t>();
  int64_t* sp = sampled.data_ptr<int64_t>();
  const int64_t num_chunks = (V + kChunk - 1) / kChunk;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(from_probs ? 0 : V);
    std::vector<double> chunks(num_chunks);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * V;
      float best;
      am[r] = argmax_row(xr, V, vec, best);
      const float* weights = xr;
      if (!from_probs) {
        const float inv_t = 1.f / (t ? t[r] : 1.f);
        for (int64_t c = 0; c < num_chunks; ++c) {
          const int64_t lo = c * kChunk;
          chunks[c] = weights_chunk(xr + lo, w.data() + lo, std::min(kChunk, V - lo), inv_t, best * inv_t, vec);
        }
        weights = w.data();
      } else {
        for (int64_t c = 0; c < num_chunks; ++c) chunks[c] = sum_chunk(xr + c * kChunk, std::min(kChunk, V - c * kChunk));
      }
      double total = 0.0;
      for (double s : chunks) total += s;
      sp[r] = std::isfinite(total) && total > 0.0 ? search(weights, chunks, V, up[r] * total) : am[r];
    }
  });
  return {argmax, sampled};
}
