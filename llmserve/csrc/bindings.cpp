// The Python module of llmserve's CPU kernels.
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     int64_t block_size, double scale);
torch::Tensor weight_only_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
  m.def("weight_only_linear", &weight_only_linear, "x @ W^T with int8 or bfloat16 weights (CPU)");
}
