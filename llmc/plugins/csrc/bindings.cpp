// The Python module of llmc's CPU kernels: one function per kernel file.
#include <torch/extension.h>

at::Tensor paged_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                           at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor seq_lens,
                           at::Tensor query_start_loc, double scale, int64_t sliding_window,
                           c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
                           c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin, bool rotary_interleaved);
at::Tensor prepacked_linear(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias, int64_t out_features);
at::Tensor fp8_prepacked_linear(at::Tensor x, at::Tensor w, at::Tensor w_scale, c10::optional<at::Tensor> in_scale,
                                c10::optional<at::Tensor> bias, int64_t out_features);
at::Tensor nvfp4_prepacked_linear(at::Tensor x, at::Tensor w, at::Tensor w_scale, at::Tensor w_global_scale,
                                  c10::optional<at::Tensor> in_global_scale, c10::optional<at::Tensor> bias,
                                  int64_t out_features);
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
at::Tensor rotary_embedding(at::Tensor x, at::Tensor cos, at::Tensor sin, bool interleaved);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor w, double eps);
std::tuple<at::Tensor, at::Tensor> add_layer_norm(at::Tensor x, at::Tensor residual, at::Tensor w, at::Tensor b, double eps);
at::Tensor gated_activation(at::Tensor gate, at::Tensor up, const std::string& act);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_cache"), py::arg("layer"),
        py::arg("slot_mapping"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"),
        py::arg("sliding_window"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        py::arg("cos") = py::none(), py::arg("sin") = py::none(), py::arg("rotary_interleaved") = false);
  m.def("prepacked_linear", &prepacked_linear);
  m.def("fp8_prepacked_linear", &fp8_prepacked_linear);
  m.def("nvfp4_prepacked_linear", &nvfp4_prepacked_linear);
  m.def("rms_norm", &rms_norm);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("add_layer_norm", &add_layer_norm);
  m.def("gated_activation", &gated_activation);
}
