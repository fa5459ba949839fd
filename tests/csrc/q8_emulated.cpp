// The q8 kernels' entry points, for a test build of gguf_q8act.cpp with LLMSERVE_EMULATE_VNNI
// and LLMSERVE_EMULATE_AMX (tests/emulated_kernels.py): the same functions as llmserve's own module,
// VNNI and AMX paths included.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_q8_pack", &gguf_q8_pack);
  m.def("gguf_linear_q8", &gguf_linear_q8);
  m.def("gguf_q8_weight_rows", &gguf_q8_weight_rows);
  m.def("gguf_quantize_activations", &gguf_quantize_activations);
  m.def("gguf_q8_paths", &gguf_q8_paths);
}
