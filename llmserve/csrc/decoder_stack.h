// The decoder stack's parts (decoder_stack.cpp): built once from a loaded model, then called per step.
#pragma once

#include <torch/extension.h>

#include <vector>

// A projection over GGUF blocks (gguf_linear) or the tiles packed from them (gguf_linear_q8, or
// gguf_linear_tiles for float32 activations).
struct StackProjection {
  torch::Tensor weight;  // blocks [N, K / 32 * block bytes], or tiles
  torch::Tensor bias;    // [N] float32, or empty
  int64_t fmt = 0;       // gguf_linear's fmt, or gguf_linear_q8's when q8
  int64_t out_features = 0;
  bool q8 = false;
  int64_t path = -1;  // gguf_linear_q8's path (-1: the best this CPU has)
  bool tiles = false;  // weight holds gguf_q8_pack tiles (always under q8; exact: gguf_linear_tiles)

  torch::Tensor operator()(const torch::Tensor& x) const;
};

// One Llama decoder layer: pre-norm attention with fused QKV and full rotary, pre-norm SiLU MLP
// with fused gate/up.
struct StackLayer {
  torch::Tensor input_norm, post_norm;
  double input_eps = 1e-6, post_eps = 1e-6;
  StackProjection qkv, o, gate_up, down;
  int64_t cache = 0;  // which (K, V) cache
  int64_t group = 0;  // which KV group's slot mapping and block tables
  double scale = 1.0;
  int64_t sliding_window = 0;  // 0: none
  double soft_cap = 0.0;       // 0: none
};

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, torch::Tensor final_norm, double final_eps);
  void add_layer(const StackLayer& layer);
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // h: the embeddings [T, hidden] (taken as the first residual, updated in place); cos/sin: the
  // rotary tables [T, head_dim] as rotary_ takes them; the rest as paged_attention takes them, per
  // cache index and per KV group. Returns the final norm's output [T, hidden].
  torch::Tensor forward(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, const std::vector<torch::Tensor>& slot_mappings,
                        const std::vector<torch::Tensor>& block_tables, torch::Tensor query_start_loc,
                        torch::Tensor seq_lens, int64_t block_size) const;

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  torch::Tensor final_norm_;
  double final_eps_;
  std::vector<StackLayer> layers_;
};
