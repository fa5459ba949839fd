// The Python module of llmserve's CPU kernels.
#include <torch/extension.h>

#include "decoder_stack.h"
#include "kernels.h"

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
  m.def("gguf_linear_tiles", &gguf_linear_tiles,
        "x @ W^T in float32 with W as gguf_q8_pack tiles of N outputs of Q4_1 (fmt 0) or Q8_0 (1) blocks: the exact "
        "path over the q8 layout (CPU)", nogil);
  m.def("gguf_linear_q8", &gguf_linear_q8,
        "x @ W^T with W as gguf_q8_pack tiles of N outputs (fmt as gguf_q8_pack) and x quantized to 8 bits per "
        "block of 32; path -1 = best for this CPU, 0 scalar, 1 AVX2, 2 AVX-512 VNNI (CPU)", nogil);
  m.def("gguf_q8_weight_rows", &gguf_q8_weight_rows,
        "float32 weights of the given output rows [R] int64 of gguf_q8_pack tiles (N outputs, K inputs)", nogil);
  m.def("gguf_quantize_activations", &gguf_quantize_activations,
        "x quantized per block of 32 as gguf_linear_q8 does: (int8 q, scale d, d * sum(q))", nogil);
  m.def("gguf_q8_paths", &gguf_q8_paths, "the gguf_linear_q8 paths this CPU can run (0 scalar, 1 AVX2, 2 VNNI, 3 AMX)");
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
  py::class_<StackProjection>(m, "StackProjection", "a GGUF projection of a DecoderStack")
      .def(py::init([](torch::Tensor weight, torch::Tensor bias, int64_t fmt, int64_t out_features, bool q8,
                       int64_t path, bool tiles) {
             TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && weight.dim() == 2,
                         "a stack projection's weight must be contiguous 2-D uint8 blocks or tiles");
             return StackProjection{weight, bias, fmt, out_features, q8, path, q8 || tiles};
           }),
           py::arg("weight"), py::arg("bias"), py::arg("fmt"), py::arg("out_features"), py::arg("q8"),
           py::arg("path"), py::arg("tiles") = false);
  py::class_<StackLayer>(m, "StackLayer", "one Llama decoder layer of a DecoderStack")
      .def(py::init([](torch::Tensor input_norm, double input_eps, torch::Tensor post_norm, double post_eps,
                       StackProjection qkv, StackProjection o, StackProjection gate_up, StackProjection down,
                       int64_t cache, int64_t group, double scale, int64_t sliding_window, double soft_cap) {
             return StackLayer{input_norm, post_norm, input_eps, post_eps, qkv, o, gate_up, down,
                               cache, group, scale, sliding_window, soft_cap};
           }),
           py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("cache"), py::arg("group"), py::arg("scale"),
           py::arg("sliding_window"), py::arg("soft_cap"));
  py::class_<DecoderStack>(m, "DecoderStack",
                           "a Llama model's decoder layers and final norm run in one call, bit for bit the "
                           "Python layers' kernels in their order")
      .def(py::init<int64_t, int64_t, int64_t, torch::Tensor, double>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("final_norm"), py::arg("final_eps"))
      .def("add_layer", &DecoderStack::add_layer)
      .def_property_readonly("num_layers", &DecoderStack::num_layers)
      .def("forward", &DecoderStack::forward, py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("k_caches"),
           py::arg("v_caches"), py::arg("slot_mappings"), py::arg("block_tables"), py::arg("query_start_loc"),
           py::arg("seq_lens"), py::arg("block_size"), nogil);
}
