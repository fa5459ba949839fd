// The kernels' C++ entry points: what bindings.cpp hands to Python, and what kernels built of
// other kernels (decoder_stack.cpp) call directly.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                              torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, torch::Tensor block_tables, int64_t block_size, double scale,
                              int64_t sliding_window, double soft_cap, std::optional<torch::Tensor> decode_logits);
torch::Tensor weight_only_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t fmt, torch::Tensor bias);
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t fmt, int64_t K);
torch::Tensor gguf_dequantize_portable(torch::Tensor weight, int64_t fmt, int64_t K);
torch::Tensor gguf_linear_tiles(torch::Tensor x, torch::Tensor tiles, int64_t fmt, int64_t N, torch::Tensor bias);
torch::Tensor gguf_q8_pack(torch::Tensor weight, int64_t fmt);
torch::Tensor gguf_linear_q8(torch::Tensor x, torch::Tensor tiles, int64_t fmt, int64_t N, torch::Tensor bias,
                             int64_t path);
torch::Tensor gguf_q8_weight_rows(torch::Tensor tiles, int64_t fmt, int64_t N, int64_t K, torch::Tensor rows);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> gguf_quantize_activations(torch::Tensor x, int64_t path);
std::vector<int64_t> gguf_q8_paths();
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor x);
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads);
std::tuple<torch::Tensor, torch::Tensor> sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor u,
                                                     std::optional<torch::Tensor> top_k, std::optional<torch::Tensor> top_p,
                                                     std::optional<torch::Tensor> min_p, bool vec);
torch::Tensor argmax_rows(torch::Tensor logits, bool vec);
