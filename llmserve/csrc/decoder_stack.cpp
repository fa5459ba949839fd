// A Llama-family model's decoder layers in one call: the same kernels, in the same order, as the
// Python layers in llmserve/model/llama.py call them one by one, so the hidden states come out
// bit for bit the same. At one token a step, the Python between ~10 kernel calls a layer (module
// lookups, views, argument conversion) cost about as much as the kernels of a 135M model.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "decoder_stack.h"
#include "kernels.h"

torch::Tensor StackProjection::operator()(const torch::Tensor& x) const {
  if (q8) return gguf_linear_q8(x, weight, fmt, out_features, bias, path);
  return tiles ? gguf_linear_tiles(x, weight, fmt, out_features, bias) : gguf_linear(x, weight, fmt, bias);
}

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, torch::Tensor final_norm,
                           double final_eps)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), final_norm_(std::move(final_norm)),
      final_eps_(final_eps) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && head_dim > 0 && num_heads % num_kv_heads == 0,
              "bad head counts");
  TORCH_CHECK(final_norm_.scalar_type() == torch::kFloat32 && final_norm_.is_contiguous(),
              "the final norm's weight must be contiguous float32");
}

void DecoderStack::add_layer(const StackLayer& layer) {
  const int64_t hidden = final_norm_.numel(), q = num_heads_ * head_dim_, kv = num_kv_heads_ * head_dim_;
  for (const auto& w : {layer.input_norm, layer.post_norm})
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == hidden,
                "a layer's norm weights must be contiguous float32 [hidden]");
  TORCH_CHECK(layer.qkv.out_features == q + 2 * kv && layer.o.out_features == hidden &&
              layer.down.out_features == hidden && layer.gate_up.out_features % 2 == 0,
              "a layer's projections do not match the stack's shapes");
  TORCH_CHECK(layer.cache >= 0 && layer.group >= 0, "bad cache or group index");
  layers_.push_back(layer);
}

torch::Tensor DecoderStack::forward(torch::Tensor h, torch::Tensor cos, torch::Tensor sin,
                                    const std::vector<torch::Tensor>& k_caches,
                                    const std::vector<torch::Tensor>& v_caches,
                                    const std::vector<torch::Tensor>& slot_mappings,
                                    const std::vector<torch::Tensor>& block_tables, torch::Tensor query_start_loc,
                                    torch::Tensor seq_lens, int64_t block_size) const {
  TORCH_CHECK(!layers_.empty(), "the stack has no layers");
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && h.dim() == 2 && h.size(1) == final_norm_.numel(),
              "h must be [tokens, hidden] float32");
  TORCH_CHECK(k_caches.size() == v_caches.size() && slot_mappings.size() == block_tables.size(),
              "one K and one V cache per cache index, one slot mapping and one block table per group");
  const int64_t T = h.size(0), H = num_heads_, KVH = num_kv_heads_, D = head_dim_;
  h = h.contiguous();
  // The first layer's residual is the embedding itself, normed by the plain op as the Python
  // layer does (F.rms_norm); from then on the fused add-and-norm keeps the residual stream.
  torch::Tensor residual = h;
  torch::Tensor x = at::rms_norm(h, {h.size(1)}, layers_[0].input_norm, layers_[0].input_eps);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const StackLayer& L = layers_[i];
    TORCH_CHECK(L.cache < static_cast<int64_t>(k_caches.size()) &&
                L.group < static_cast<int64_t>(slot_mappings.size()),
                "a layer's cache or group is not among those given");
    if (i > 0) x = add_rms_norm_(h, residual, L.input_norm, L.input_eps);
    torch::Tensor qkv = L.qkv(x).view({T, H + 2 * KVH, D});
    rotary_(qkv, cos, sin, H + KVH);
    torch::Tensor o = paged_attention(qkv.narrow(1, 0, H), qkv.narrow(1, H, KVH), qkv.narrow(1, H + KVH, KVH),
                                      k_caches[L.cache], v_caches[L.cache], slot_mappings[L.group], query_start_loc,
                                      seq_lens, block_tables[L.group], block_size, L.scale, L.sliding_window,
                                      L.soft_cap, std::nullopt);
    h = L.o(o.reshape({T, H * D}));
    x = add_rms_norm_(h, residual, L.post_norm, L.post_eps);
    h = L.down(silu_mul(L.gate_up(x)));
  }
  return add_rms_norm_(h, residual, final_norm_, final_eps_);
}
