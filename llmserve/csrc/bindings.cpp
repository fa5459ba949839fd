// The Python module of llmserve's CPU kernels.
#include <torch/extension.h>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                              torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, torch::Tensor block_tables, int64_t block_size, double scale,
                              int64_t sliding_window, double soft_cap, std::optional<torch::Tensor> decode_logits);
torch::Tensor weight_only_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t fmt, torch::Tensor bias);
torch::Tensor gguf_dequantize(torch::Tensor weight, int64_t fmt, int64_t K);
torch::Tensor gguf_dequantize_portable(torch::Tensor weight, int64_t fmt, int64_t K);
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

// Every kernel releases the GIL while it runs: the server's event loop (SSE writes, new requests)
// then runs beside the engine thread instead of waiting for it at every switch interval.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_attention", &paged_attention,
        "write a step's K/V into the paged cache, then attention for decodes, verifies and prefill chunks (CPU); "
        "decode_logits [B, heads, length], when given, receives each decode row's attention logits",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("block_tables"), py::arg("block_size"),
        py::arg("scale"), py::arg("sliding_window"), py::arg("soft_cap"), py::arg("decode_logits") = py::none(),
        nogil);
  m.def("weight_only_linear", &weight_only_linear, "x @ W^T with int8 or bfloat16 weights (CPU)", nogil);
  m.def("gguf_linear", &gguf_linear, "x @ W^T with W in GGUF blocks: Q4_1 (fmt 0), Q8_0 (1), Q5_0 (2), Q4_K (3), "
        "Q5_K (4), Q6_K (5) (CPU)", nogil);
  m.def("gguf_dequantize", &gguf_dequantize, "float32 weights of GGUF blocks (fmt as gguf_linear)", nogil);
  m.def("gguf_dequantize_portable", &gguf_dequantize_portable,
        "gguf_dequantize of Q5_0/Q4_K/Q5_K/Q6_K through the portable code (for tests)", nogil);
  m.def("gguf_q8_pack", &gguf_q8_pack,
        "GGUF Q4_1 (0), Q8_0 (1), Q5_0 (2) or Q4_1F (3) blocks [N, K / 32 * bytes] repacked into the tiles "
        "gguf_linear_q8 reads", nogil);
  m.def("gguf_linear_q8", &gguf_linear_q8,
        "x @ W^T with W as gguf_q8_pack tiles of N outputs (fmt as gguf_q8_pack) and x quantized to 8 bits per "
        "block of 32; path -1 = best for this CPU, 0 scalar, 1 AVX2, 2 AVX-512 VNNI (CPU)", nogil);
  m.def("gguf_q8_weight_rows", &gguf_q8_weight_rows,
        "float32 weights of the given output rows [R] int64 of gguf_q8_pack tiles (N outputs, K inputs)", nogil);
  m.def("gguf_quantize_activations", &gguf_quantize_activations,
        "x quantized per block of 32 as gguf_linear_q8 does: (int8 q, scale d, d * sum(q))", nogil);
  m.def("gguf_q8_paths", &gguf_q8_paths, "the gguf_linear_q8 paths this CPU can run (0 scalar, 1 AVX2, 2 VNNI)");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; return rms_norm(residual) * weight (float32)", nogil);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] projection (float32)", nogil);
  m.def("sample_rows", &sample_rows,
        "(argmax, inverse-CDF sample) per row of float32 logits at temperature, after top-k, top-p and min-p "
        "(each [rows] or empty: none), u [rows] float64; vec=False: the portable code",
        py::arg("logits"), py::arg("temperature"), py::arg("u"), py::arg("top_k") = py::none(),
        py::arg("top_p") = py::none(), py::arg("min_p") = py::none(), py::arg("vec") = true, nogil);
  m.def("argmax_rows", &argmax_rows, "the first index of each row's largest value (float32 CPU logits)",
        py::arg("logits"), py::arg("vec") = true, nogil);
  m.def("rotary_", &rotary_, "rotate the first heads of a [T, heads, D] tensor in place (float32)", nogil);
}
