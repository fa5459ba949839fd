// Sampling a batch of rows by inverse CDF without materializing a float64 CDF: per row, one pass
// for the max (and argmax), one for the weights e^(x/T - max/T) and their partial sums, and a walk
// over the partial sums to the chunk where u * total falls, then inside it. In torch the same is six
// passes over [rows, vocab] (copy, divide, softmax, widen to float64, cumsum, search), the cumsum
// single-threaded: at 64 rows x 49k it cost more than the logits head.
//
// Truncation without a sort: top-k keeps the logits >= the k-th largest (nth_element); top-p keeps
// the smallest most-likely set whose mass reaches p (a token stays while the mass of the tokens
// before it, most likely first, is < p x total): the weights are binned by their float bits (16
// bins an octave, so bin order is value order), whole bins are kept from the top while the mass
// stays under, and only the bin where it crosses is sorted; min-p drops weights < min_p x the
// largest. torch sorted the whole row for top-p (126 ms at 64 x 49k).
//
// Sums are float64 (as the torch path's cumsum), so even the smallest weights keep intervals of
// their true width; the total is the sum of the same partial sums the walk adds, so u * total < total
// always lands on a token. A weight is 0 exactly where x/T - max/T < -87 (e^-87 ~ 1e-38, below any
// probability float32 represents in a softmax), and so for every -inf logit: a truncated or banned
// token is never drawn.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <utility>
#include <limits>
#include <optional>
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

// The k-th largest of x (1 <= k < V): a min-heap of the k largest so far, which most values pass
// by with one comparison; nth_element on a copy when k is a large share of the row.
float kth_largest(const float* x, int64_t V, int64_t k, std::vector<float>& scratch) {
  if (k * 16 > V) {
    scratch.assign(x, x + V);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    return scratch[k - 1];
  }
  scratch.assign(x, x + k);
  std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
  for (int64_t i = k; i < V; ++i)
    if (x[i] > scratch.front()) {
      std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
      scratch.back() = x[i];
      std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
    }
  return scratch.front();
}

constexpr int kBinShift = 19;  // float bits >> 19: the exponent and 4 mantissa bits
constexpr int kBins = 1 << (31 - kBinShift);

inline int bin_of(float w) {
  int32_t bits;
  std::memcpy(&bits, &w, sizeof(bits));
  return bits >> kBinShift;  // w > 0: the sign bit is 0
}

// Zeroes the weights top-p drops: the smallest most-likely set whose mass reaches target stays.
void top_p_cut(float* w, int64_t V, double target, std::vector<double>& bins,
               std::vector<std::pair<float, int64_t>>& edge) {
  bins.assign(kBins, 0.0);
  for (int64_t i = 0; i < V; ++i)
    if (w[i] > 0.f) bins[bin_of(w[i])] += w[i];
  double cum = 0.0;
  int cut = -1;
  for (int b = kBins - 1; b >= 0 && cut < 0; --b) {
    if (bins[b] == 0.0) continue;
    if (cum + bins[b] < target) {  // even its last token has less than target before it
      cum += bins[b];
      continue;
    }
    edge.clear();
    for (int64_t i = 0; i < V; ++i)
      if (w[i] > 0.f && bin_of(w[i]) == b) edge.emplace_back(w[i], i);
    std::sort(edge.begin(), edge.end(), [](const auto& a, const auto& c) {
      return a.first > c.first || (a.first == c.first && a.second < c.second);
    });
    for (const auto& [wi, i] : edge) {
      if (cum < target) {
        cum += wi;
      } else {
        w[i] = 0.f;
      }
    }
    if (cum >= target) cut = b;  // rounding can leave it short: then the next bin is walked too
  }
  if (cut < 0) return;
  for (int64_t i = 0; i < V; ++i)
    if (w[i] > 0.f && bin_of(w[i]) < cut) w[i] = 0.f;
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
// positive) or empty for 1; u [R] float64 in [0, 1); top_k [R] int64 (>= V: none), top_p [R] float32
// in (0, 1] and min_p [R] float32 in [0, 1], each empty when no row truncates that way. Returns
// (argmax [R], sampled [R]) int64. vec = false forces the portable code (for tests).
std::tuple<torch::Tensor, torch::Tensor> sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor u,
                                                     std::optional<torch::Tensor> top_k_opt,
                                                     std::optional<torch::Tensor> top_p_opt,
                                                     std::optional<torch::Tensor> min_p_opt, bool vec) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
              "sample_rows takes [rows, vocab] float32 CPU logits");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "an empty vocabulary");
  TORCH_CHECK(u.scalar_type() == torch::kFloat64 && u.dim() == 1 && u.size(0) == R, "u must be [rows] float64");
  auto per_row = [R](const std::optional<torch::Tensor>& t, c10::ScalarType type, const char* name) {
    if (!t.has_value() || t->numel() == 0) return torch::empty({0}, type);
    TORCH_CHECK(t->scalar_type() == type && t->dim() == 1 && t->numel() == R, name, " must be [rows] ",
                c10::toString(type), " or empty");
    return t->contiguous();
  };
  temperature = per_row(temperature, torch::kFloat32, "temperature");
  const auto top_k = per_row(top_k_opt, torch::kInt64, "top_k");
  const auto top_p = per_row(top_p_opt, torch::kFloat32, "top_p");
  const auto min_p = per_row(min_p_opt, torch::kFloat32, "min_p");
  logits = logits.contiguous();
  u = u.contiguous();
  auto argmax = torch::empty({R}, torch::kInt64), sampled = torch::empty({R}, torch::kInt64);
  const float* x = logits.data_ptr<float>();
  const float* t = temperature.numel() ? temperature.data_ptr<float>() : nullptr;
  const int64_t* tk = top_k.numel() ? top_k.data_ptr<int64_t>() : nullptr;
  const float* tp = top_p.numel() ? top_p.data_ptr<float>() : nullptr;
  const float* mp = min_p.numel() ? min_p.data_ptr<float>() : nullptr;
  const double* up = u.data_ptr<double>();
  int64_t* am = argmax.data_ptr<int64_t>();
  int64_t* sp = sampled.data_ptr<int64_t>();
  const int64_t num_chunks = (V + kChunk - 1) / kChunk;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(V), kth_scratch;
    std::vector<double> chunks(num_chunks), bins;
    std::vector<std::pair<float, int64_t>> edge;
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * V;
      float best;
      am[r] = argmax_row(xr, V, vec, best);
      const float inv_t = 1.f / (t ? t[r] : 1.f);
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t lo = c * kChunk;
        chunks[c] = weights_chunk(xr + lo, w.data() + lo, std::min(kChunk, V - lo), inv_t, best * inv_t, vec);
      }
      bool cut = false;
      if (tk && tk[r] > 0 && tk[r] < V) {  // keep logits >= the k-th largest (ties at it stay)
        const float kth = kth_largest(xr, V, tk[r], kth_scratch);
        for (int64_t i = 0; i < V; ++i)
          if (xr[i] < kth) w[i] = 0.f;
        cut = true;
      }
      if (tp && tp[r] < 1.f) {
        double total = 0.0;
        for (int64_t i = 0; i < V; ++i) total += w[i];
        top_p_cut(w.data(), V, static_cast<double>(tp[r]) * total, bins, edge);
        cut = true;
      }
      if (mp && mp[r] > 0.f) {  // the largest weight is the argmax's, which every cut keeps
        const float floor = mp[r] * w[am[r]];
        for (int64_t i = 0; i < V; ++i)
          if (w[i] < floor) w[i] = 0.f;
        cut = true;
      }
      if (cut)
        for (int64_t c = 0; c < num_chunks; ++c) chunks[c] = sum_chunk(w.data() + c * kChunk, std::min(kChunk, V - c * kChunk));
      double total = 0.0;
      for (double s : chunks) total += s;
      sp[r] = std::isfinite(total) && total > 0.0 ? search(w.data(), chunks, V, up[r] * total) : am[r];
    }
  });
  return {argmax, sampled};
}

// The first index of each row's largest value (torch.argmax's choice), rows in parallel.
torch::Tensor argmax_rows(torch::Tensor logits, bool vec) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2 &&
              logits.size(1) > 0, "argmax_rows takes [rows, vocab] float32 CPU logits");
  logits = logits.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, torch::kInt64);
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
    float best;
    for (int64_t r = begin; r < end; ++r) o[r] = argmax_row(x + r * V, V, vec, best);
  });
  return out;
}
