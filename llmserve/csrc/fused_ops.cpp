// Small fused float32 ops for the CPU decode path. At one token per sequence each of these is
// a few microseconds of math but several aten dispatches when written in torch; one call each.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec_math.h"

// residual += x; returns rms_norm(residual) * weight. x, residual: [T, H] float32 contiguous.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && residual.scalar_type() == torch::kFloat32 &&
              weight.scalar_type() == torch::kFloat32, "add_rms_norm_ takes float32 tensors");
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous(), "residual and weight must be contiguous");
  x = x.contiguous();
  const int64_t H = residual.size(-1), T = residual.numel() / H;
  auto out = torch::empty_like(residual);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* r = residual.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* rt = r + t * H;
      const float* xt = xp + t * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        rt[i] += xt[i];
        ss += rt[i] * rt[i];
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      float* ot = o + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) ot[i] = w[i] * (rt[i] * inv);
    }
  });
  return out;
}

// silu(x[:, :I]) * x[:, I:] for x = [T, 2I] float32.
torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2, "silu_mul takes a 2-D float32 tensor");
  x = x.contiguous();
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = xp + t * 2 * I;
      const float* u = g + I;
      float* ot = o + t * I;
      int64_t i = 0;
#ifdef LLMSERVE_VEC_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = llmserve::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(ot + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) ot[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// Rotates the first `num_heads` heads of qkv ([T, heads, D] float32, contiguous) in place, with
// full-width tables cos/sin [T, D] laid out as in llmserve.model.layers.rotary_tables
// (sin carries the sign of the first half): x = x * cos + roll(x, D/2) * sin.
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.is_contiguous() && qkv.dim() == 3, "bad qkv");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t T = qkv.size(0), heads = qkv.size(1), D = qkv.size(2), half = D / 2;
  float* q = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + t * D;
      const float* st = s + t * D;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* x = q + (t * heads + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * ct[i] + b * st[i];
          x[i + half] = b * ct[i + half] + a * st[i + half];
        }
      }
    }
  });
}
